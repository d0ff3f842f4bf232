"""A synthetic live source: a moving test pattern encoded as H.264 in MPEG-TS segments.

Each segment is one GOP (it starts on a keyframe) and carries its own PAT/PMT, as segments on a
trickle channel do; timestamps run on across segments on the 90 kHz clock.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator

import av
import numpy as np

from relay_server.media.encoder import CLOCK, VideoEncoder
from relay_server.media.output import OutputPipeline, Policy
from relay_server.media.segmenter import Segmenter
from relay_server.trickle.publisher import Publisher


class PatternFrames:
    """Frames of a test pattern: a diagonal gradient sliding by, colour bars, and a frame counter."""

    def __init__(self, width: int, height: int) -> None:
        if width % 2 or height % 2:
            raise ValueError(f"yuv420p needs even sizes, got {width}x{height}")
        self.width = width
        self.height = height
        rows, columns = np.indices((height, width))
        self._diagonal = (rows + columns).astype(np.uint16)
        bars = np.arange(width // 2) * 8 // max(1, width // 2)
        palette_u = np.array([128, 44, 156, 72, 184, 100, 212, 128], np.uint8)
        palette_v = np.array([128, 142, 44, 58, 198, 212, 114, 128], np.uint8)
        self._u = np.broadcast_to(palette_u[bars], (height // 2, width // 2)).copy()
        self._v = np.broadcast_to(palette_v[bars], (height // 2, width // 2)).copy()

    def frame(self, index: int) -> av.VideoFrame:
        frame = av.VideoFrame(self.width, self.height, "yuv420p")
        luma = ((self._diagonal + index * 4) % 220 + 16).astype(np.uint8)
        # A bright box that moves one step per frame makes motion and dropped frames visible.
        box = max(8, self.height // 16)
        x = (index * 4) % max(1, self.width - box)
        luma[:box, x : x + box] = 235
        for plane, pixels in zip(frame.planes, (luma, self._u, self._v), strict=True):
            view = np.frombuffer(memoryview(plane), np.uint8).reshape(-1, plane.line_size)
            view[:, : pixels.shape[1]] = pixels
        return frame


class _Segments:
    """A SegmentSink that keeps each finished segment for the generator to hand out."""

    def __init__(self) -> None:
        self.finished: list[bytes] = []
        self._current = bytearray()

    def begin(self, index: int) -> None:
        self._current = bytearray()

    def write(self, data: bytes) -> None:
        self._current += data

    def end(self, index: int) -> None:
        self.finished.append(bytes(self._current))

    def take(self) -> list[bytes]:
        finished, self.finished = self.finished, []
        return finished


def pattern_segments(
    width: int = 512,
    height: int = 512,
    fps: int = 30,
    segment_seconds: float = 2.0,
    frames: int | None = None,
) -> Iterator[bytes]:
    """MPEG-TS segments of the test pattern (endless unless `frames` is given). CPU-bound: use a thread."""
    pattern = PatternFrames(width, height)
    encoder = VideoEncoder(width, height, gop=segment_seconds, fps=fps, bitrate=1_500_000)
    segments = _Segments()
    segmenter = Segmenter(segments, width, height)
    index = 0
    while frames is None or index < frames:
        for packet in encoder.encode(pattern.frame(index), round(index / fps / CLOCK)):
            segmenter.mux_video(packet)
        yield from segments.take()
        index += 1
    for packet in encoder.close():
        segmenter.mux_video(packet)
    segmenter.close()
    yield from segments.take()


async def publish_pattern(
    publisher: Publisher,
    width: int = 512,
    height: int = 512,
    *,
    fps: int = 30,
    frames: int | None = None,
    segment_seconds: float = 1.0,
    paused: Callable[[int], Awaitable[None]] | None = None,
) -> int:
    """Publish the test pattern live: frames made at `fps` in real time, each segment streamed
    to the channel while its frames are being encoded, as a live encoder upstream does. Endless
    unless `frames` is given; returns the frames published. `paused(index)`, if given, is
    awaited before each frame: a test can stall the source there. The publisher is not closed."""
    encoder = VideoEncoder(width, height, gop=segment_seconds, fps=fps, bitrate=1_500_000)
    pipeline = OutputPipeline(publisher, encoder, policy=Policy.BLOCK)
    pattern = PatternFrames(width, height)
    loop = asyncio.get_running_loop()
    pipeline.start()
    index = 0
    try:
        start = loop.time()
        while frames is None or index < frames:
            frame = await loop.run_in_executor(None, pattern.frame, index)
            if paused is not None:
                stalled = loop.time()
                await paused(index)
                start += loop.time() - stalled  # the media clock runs on across a stall
            # Live pacing: a frame is published at its media time.
            await asyncio.sleep(max(0.0, start + index / fps - loop.time()))
            await pipeline.submit(frame, round(index / fps / CLOCK))
            index += 1
    finally:
        await pipeline.stop()
    return index
