"""The live source's publish times and the output reader's receive times, on an embedded server."""

from __future__ import annotations

import asyncio
import io
import itertools
import random

import av

from bench.livesource import ArrivalScanner, LiveSource, OutputReader
from relay_server.media.encoder import CLOCK, VideoEncoder
from relay_server.media.segmenter import Segmenter
from relay_server.trickle.server import TrickleServer


class _Memory:
    def __init__(self) -> None:
        self.data = bytearray()
        self.frame_ends: list[int] = []

    def begin(self, index: int) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.data += data

    def end(self, index: int) -> None:
        pass


def _stream(frames: int) -> tuple[bytes, list[int], list[int]]:
    """A 2-segment MPEG-TS stream; the pts of each frame and the offset where its bytes end."""
    encoder = VideoEncoder(64, 64, gop=frames / 2 / 30, threads=1)
    memory = _Memory()
    segmenter = Segmenter(memory, 64, 64)
    pts, ends = [], []
    for index in range(frames):
        frame = av.VideoFrame(64, 64, "yuv420p")
        for plane in frame.planes:
            plane.update(bytes([index * 8 % 256]) * plane.buffer_size)
        stamp = round(index / 30 / CLOCK) + 900
        for packet in encoder.encode(frame, stamp):
            segmenter.mux_video(packet)
        pts.append(stamp)
        ends.append(len(memory.data))
    segmenter.close()
    return bytes(memory.data), pts, ends


def test_the_scanner_stamps_each_frame_when_its_last_byte_arrives() -> None:
    data, pts, ends = _stream(12)
    # Cut anywhere (TS packets split across chunks); the chunk's number is its arrival time.
    rng = random.Random(1)
    cuts = sorted({0, len(data), *(rng.randrange(len(data)) for _ in range(40))})
    scanner = ArrivalScanner()
    chunks = list(itertools.pairwise(cuts))
    for number, (start, end) in enumerate(chunks):
        scanner.feed(data[start:end], float(number))
    assert sorted(scanner.arrivals) == pts
    for stamp, end in zip(pts, ends, strict=True):
        # The chunk that holds the frame's last byte (its last TS packet ends at `end`).
        expected = next(number for number, (start, stop) in enumerate(chunks) if start < end <= stop)
        assert scanner.arrivals[stamp] == expected
    assert scanner.resyncs == 0


def test_the_scanner_agrees_with_the_demuxer_on_pts() -> None:
    data, pts, _ = _stream(6)
    scanner = ArrivalScanner()
    scanner.feed(data, 0.0)
    with av.open(io.BytesIO(data), format="mpegts") as container:
        decoded = [frame.pts for frame in container.decode(video=0)]
    assert decoded == pts == sorted(scanner.arrivals)


async def test_source_to_reader_on_loopback() -> None:
    async with TrickleServer() as server:
        source = LiveSource(server.channel_url("live"), 320, 180, bitrate=500_000, gop=0.5)
        reader = OutputReader(server.channel_url("live"), source.code)
        await source.start()
        reader.start()
        try:
            await asyncio.sleep(1.2)
        finally:
            await source.stop()  # DELETEs the channel: the reader's stream ends
            await reader.ended(3.0)
            await reader.stop()
    results = reader.results()
    indices = [index for index, _, _ in results]
    assert len(indices) >= 20
    assert indices == list(range(len(indices)))  # every frame, in order, each read back
    latencies = [received - source.published[index] for index, received, _ in results]
    # On loopback, receive ≈ publish: never before it, and typically well under a millisecond
    # (the bound leaves room for a loaded machine).
    assert all(latency >= 0 for latency in latencies), latencies
    assert sorted(latencies)[len(latencies) // 2] < 0.010, latencies
    # Decoding releases a frame later than its last byte arrived (the parser waits for the next).
    assert all(decoded >= received for _, received, decoded in results)
