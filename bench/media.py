"""Our decode and encode stages against bare PyAV, frames per CPU-second, measured in the same run.

- decode: our Decoder fed through the ChunkQueue in 64 KiB chunks (as feed() does, with the same
  wait-for-writable back-pressure) against a tight `av.open(BytesIO).decode()` loop;
- encode: our VideoEncoder + Segmenter (the encode thread's work: x264 and TS muxing), and the
  whole OutputPipeline publishing to an embedded trickle server in this process, against a tight
  libx264 ultrafast/zerolatency encode loop with the same options.
Both decoders use slice threads with TRICKLE_WORKERS threads, as the Decoder does, so the ratio
shows our overhead rather than a threading difference. CPU is process CPU (time.process_time)
over the measured section, so x264's and libavcodec's own threads count. Content: the test pattern
of relay_server.media.testsource with moving noise, so the codecs work as on camera video.
Medians of interleaved repeats. `python -m bench media [--quick]`.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import threading
import time
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np

from bench import report
from relay_server import _fast, settings
from relay_server._fast import ChunkQueue
from relay_server.media.decoder import Decoder
from relay_server.media.encoder import CLOCK, VideoEncoder
from relay_server.media.output import OutputPipeline, Policy
from relay_server.media.segmenter import Segmenter
from relay_server.media.testsource import PatternFrames
from relay_server.trickle import Publisher
from relay_server.trickle.server import TrickleServer

FPS = 30
CHUNK = 64 * 1024
UNIQUE_FRAMES = 60  # distinct source pictures, cycled: bounds memory at 720p
BITRATE = {512: 1_500_000, 720: 3_000_000}  # a live stream's rates at these sizes
SIZES = [(512, 512), (1280, 720)]


def source_frames(width: int, height: int) -> list[av.VideoFrame]:
    """The test pattern with moving noise: flat synthetic pictures would make the codecs idle."""
    pattern = PatternFrames(width, height)
    noise = np.random.default_rng(0).integers(0, 12, (2 * height, 2 * width), np.uint8)
    frames = []
    for index in range(UNIQUE_FRAMES):
        frame = pattern.frame(index)
        plane = frame.planes[0]
        luma = np.frombuffer(memoryview(plane), np.uint8).reshape(-1, plane.line_size)[:, :width]
        dy, dx = (index * 7) % height, (index * 13) % width
        luma += noise[dy : dy + height, dx : dx + width]
        frames.append(frame)
    return frames


def encoded_stream(frames: list[av.VideoFrame], count: int, bitrate: int) -> bytes:
    """MPEG-TS of `count` frames as a camera encoder would send it (B-frames, 2 s GOPs)."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mpegts") as muxer:
        stream = muxer.add_stream("libx264", rate=FPS, options={"preset": "veryfast", "bf": "2"})
        stream.width, stream.height, stream.pix_fmt = frames[0].width, frames[0].height, "yuv420p"
        stream.bit_rate, stream.codec_context.gop_size = bitrate, 2 * FPS
        for index in range(count):
            frame = frames[index % len(frames)]
            frame.pts, frame.time_base = index, Fraction(1, FPS)
            muxer.mux(stream.encode(frame))
        muxer.mux(stream.encode(None))
    return buffer.getvalue()


def _measured(work: Callable[[], int]) -> float:
    """Frames per CPU-second of `work` (which returns the frames it handled)."""
    started = time.process_time()
    frames = work()
    return frames / (time.process_time() - started)


def decode_raw(data: bytes) -> int:
    with av.open(io.BytesIO(data), "r", format="mpegts") as container:
        codec = container.streams.video[0].codec_context
        codec.thread_type, codec.thread_count = "SLICE", settings.workers()
        frames = 0
        for _ in container.decode(video=0):  # each frame let go at once, as the Decoder does
            frames += 1
        return frames


def decode_ours(data: bytes) -> int:
    queue = ChunkQueue(settings.buffer_size())
    writable, done = threading.Event(), threading.Event()
    queue.set_writable_callback(writable.set)
    frames = 0

    def on_frame(frame: av.VideoFrame) -> None:
        nonlocal frames
        frames += 1

    decoder = Decoder(queue, on_frame, on_end=done.set, on_error=lambda exc: done.set())
    decoder.start()
    try:
        for offset in range(0, len(data), CHUNK):  # what feed() does, without the event loop
            writable.clear()
            if queue.put(data[offset : offset + CHUNK]):
                writable.wait()
        queue.close()
        done.wait()
    finally:
        decoder.stop()
    if decoder.error is not None:
        raise decoder.error
    return frames


def encode_raw(frames: list[av.VideoFrame], count: int, bitrate: int) -> int:
    codec = av.CodecContext.create("libx264", "w")
    codec.width, codec.height, codec.pix_fmt = frames[0].width, frames[0].height, "yuv420p"
    codec.time_base, codec.framerate, codec.bit_rate = CLOCK, Fraction(FPS), bitrate
    codec.thread_count = settings.workers()
    codec.options = {"preset": "ultrafast", "tune": "zerolatency"}
    codec.open()
    for index in range(count):
        frame = frames[index % len(frames)]
        frame.pts, frame.time_base = index * 90_000 // FPS, CLOCK
        codec.encode(frame)
    codec.encode(None)
    return count


class _NullSink:
    def begin(self, index: int) -> None:
        pass

    def write(self, data: bytes) -> None:
        pass

    def end(self, index: int) -> None:
        pass


def encode_ours(frames: list[av.VideoFrame], count: int, bitrate: int) -> int:
    width, height = frames[0].width, frames[0].height
    encoder = VideoEncoder(width, height, bitrate=bitrate, fps=FPS)
    segmenter = Segmenter(_NullSink(), width, height)
    for index in range(count):
        for packet in encoder.encode(frames[index % len(frames)], index * 90_000 // FPS):
            segmenter.mux_video(packet)
    for packet in encoder.close():
        segmenter.mux_video(packet)
    segmenter.close()
    return count


async def _pipeline(server: TrickleServer, frames: list[av.VideoFrame], count: int, bitrate: int) -> int:
    width, height = frames[0].width, frames[0].height
    async with Publisher(server.channel_url("bench")) as publisher:
        encoder = VideoEncoder(width, height, bitrate=bitrate, fps=FPS)
        pipeline = OutputPipeline(publisher, encoder, policy=Policy.BLOCK)
        pipeline.start()
        for index in range(count):
            await pipeline.submit(frames[index % len(frames)], index * 90_000 // FPS)
        await pipeline.stop()
    return count


def _measures(
    loop: asyncio.AbstractEventLoop, server: TrickleServer, width: int, height: int, count: int
) -> dict[str, Callable[[], int]]:
    bitrate = BITRATE[min(height, 720)]
    frames = source_frames(width, height)
    data = encoded_stream(frames, count, bitrate)
    return {
        "decode raw": lambda: decode_raw(data),
        "decode ours": lambda: decode_ours(data),
        "encode raw": lambda: encode_raw(frames, count, bitrate),
        "encode ours": lambda: encode_ours(frames, count, bitrate),
        "encode ours+publish": lambda: loop.run_until_complete(_pipeline(server, frames, count, bitrate)),
    }


def run(quick: bool) -> dict[str, Any]:
    seconds, repeats = (4, 3) if quick else (10, 5)
    count = seconds * FPS
    results: dict[str, Any] = {
        "quick": quick,
        "repeats": repeats,
        "frames": count,
        "workers": settings.workers(),
        "implementation": _fast.IMPLEMENTATION,
        "figures": {},
    }
    loop = asyncio.new_event_loop()
    server = TrickleServer()
    loop.run_until_complete(server.start())
    try:
        for width, height in SIZES:
            measures = _measures(loop, server, width, height, count)
            samples: dict[str, list[float]] = {name: [] for name in measures}
            for _ in range(repeats):  # interleaved: drift in the machine's speed hits all alike
                for name, work in measures.items():
                    samples[name].append(_measured(work))
            results["figures"][f"{width}x{height}"] = {
                name: round(statistics.median(values), 1) for name, values in samples.items()
            }
    finally:
        loop.run_until_complete(server.stop())
        loop.close()
    return results


def main(quick: bool = False) -> Path:
    results = run(quick)
    rows = []
    for size, figures in results["figures"].items():
        for stage, ours, path in (
            ("decode", "decode ours", "Decoder via ChunkQueue"),
            ("encode", "encode ours", "VideoEncoder + Segmenter"),
            ("encode", "encode ours+publish", "OutputPipeline → trickle"),
        ):
            raw = figures[f"{stage} raw"]
            rows.append(
                {
                    "size": size,
                    "stage": stage,
                    "ours": path,
                    "raw fps/cpu-s": raw,
                    "ours fps/cpu-s": figures[ours],
                    "ours/raw": round(figures[ours] / raw, 2),
                }
            )
    notes = f"""
Frames per CPU-second (process CPU, all threads), medians of {results["repeats"]} interleaved repeats
of {results["frames"]} frames at {FPS} fps; `_fast` build: {results["implementation"]};
{results["workers"]} worker threads. decode: our Decoder through the ChunkQueue vs
`av.open(BytesIO).decode()` (both slice threads).
encode: VideoEncoder + Segmenter (TS mux, null sink) vs bare libx264 ultrafast/zerolatency; "ours+publish"
is the whole OutputPipeline streaming to an embedded trickle server in the same process (its CPU counts).
"""
    return report.write("media", "Decode and encode: ours vs bare PyAV", {"results": results}, rows, notes)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer frames and repeats")
    print(main(parser.parse_args().quick).read_text())
