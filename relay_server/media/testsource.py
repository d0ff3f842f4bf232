"""A synthetic live source: a moving test pattern encoded as H.264 in MPEG-TS segments.

Each segment is one GOP (it starts on a keyframe) and carries its own PAT/PMT, as segments on a
trickle channel do; timestamps run on across segments on the 90 kHz clock.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from fractions import Fraction

import av
import numpy as np

CLOCK = Fraction(1, 90_000)


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


class SegmentEncoder:
    """One long-lived libx264 whose GOPs become self-contained MPEG-TS segments."""

    def __init__(
        self,
        width: int,
        height: int,
        fps: int = 30,
        segment_seconds: float = 2.0,
        preset: str = "ultrafast",
        bitrate: int = 1_500_000,
    ) -> None:
        self.fps = fps
        encoder = av.CodecContext.create("libx264", "w")
        encoder.width, encoder.height, encoder.pix_fmt = width, height, "yuv420p"
        encoder.time_base = CLOCK
        encoder.framerate = Fraction(fps)
        encoder.bit_rate = bitrate
        encoder.gop_size = max(1, round(fps * segment_seconds))
        encoder.options = {"preset": preset, "tune": "zerolatency", "bf": "0", "sc_threshold": "0"}
        encoder.open()
        self._encoder = encoder
        self._buffer: io.BytesIO | None = None
        self._muxer: av.container.OutputContainer | None = None
        self._stream: av.VideoStream | None = None

    def encode(self, frame: av.VideoFrame, index: int) -> list[bytes]:
        """Encode frame `index`; returns the segments it completed (usually none)."""
        frame.pts = round(index / self.fps / CLOCK)
        frame.time_base = CLOCK
        return self._mux(self._encoder.encode(frame))

    def flush(self) -> list[bytes]:
        """Drain the encoder and return the last segments."""
        finished = self._mux(self._encoder.encode(None))
        if self._muxer is not None:
            finished.append(self._close_segment())
        return finished

    def _mux(self, packets: list[av.Packet]) -> list[bytes]:
        finished = []
        for packet in packets:
            if packet.is_keyframe and self._muxer is not None:
                finished.append(self._close_segment())
            if self._muxer is None:
                self._open_segment()
            packet.stream = self._stream
            assert self._muxer is not None
            self._muxer.mux(packet)
        return finished

    def _open_segment(self) -> None:
        self._buffer = io.BytesIO()
        self._muxer = av.open(self._buffer, "w", format="mpegts")
        stream = self._muxer.add_stream("h264", rate=self.fps)
        stream.width, stream.height = self._encoder.width, self._encoder.height
        stream.time_base = CLOCK
        self._stream = stream

    def _close_segment(self) -> bytes:
        assert self._muxer is not None and self._buffer is not None
        self._muxer.close()
        data = self._buffer.getvalue()
        self._muxer = self._buffer = self._stream = None
        return data


def pattern_segments(
    width: int = 512,
    height: int = 512,
    fps: int = 30,
    segment_seconds: float = 2.0,
    frames: int | None = None,
) -> Iterator[bytes]:
    """MPEG-TS segments of the test pattern (endless unless `frames` is given). CPU-bound: use a thread."""
    pattern = PatternFrames(width, height)
    encoder = SegmentEncoder(width, height, fps, segment_seconds)
    index = 0
    while frames is None or index < frames:
        yield from encoder.encode(pattern.frame(index), index)
        index += 1
    yield from encoder.flush()
