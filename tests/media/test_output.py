"""Output pipeline against the real embedded trickle server, read back by a real Subscriber."""

from __future__ import annotations

import asyncio
import threading

import aiohttp
import av
import pytest

from relay_server.media.encoder import VideoEncoder
from relay_server.media.output import (
    SINK_BUFFER,
    OutputPipeline,
    Policy,
    SegmentPublisherSink,
    _Inbox,
)
from relay_server.media.segmenter import Segmenter, SegmentSink
from relay_server.media.testsource import PatternFrames
from relay_server.trickle import ChannelClosedError, Outcome, Publisher, Subscriber
from relay_server.trickle.server import TrickleServer
from tests.media.test_encoder import HEIGHT, WIDTH, timeline
from tests.media.test_segmenter import RecordingSink, audio_source, decode


async def read_segments(url: str, count: int) -> list[bytes]:
    """The first `count` segments of a channel, each read to its end."""
    segments = []
    async with Subscriber(url, start_seq=0) as subscriber:
        async for segment in subscriber:
            segments.append(b"".join([chunk async for chunk in segment]))
            if len(segments) == count:
                break
    return segments


def assert_nothing_left() -> None:
    assert not [t for t in threading.enumerate() if t.name == "output-encode"]
    ours = ("segment-sink", "segment-close")
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith(ours)]


class Tee:
    """Hands every call to two sinks."""

    def __init__(self, first: SegmentSink, second: SegmentSink) -> None:
        self.sinks = (first, second)

    def begin(self, index: int) -> None:
        for sink in self.sinks:
            sink.begin(index)

    def write(self, data: bytes) -> None:
        for sink in self.sinks:
            sink.write(data)

    def end(self, index: int) -> None:
        for sink in self.sinks:
            sink.end(index)


def produce(sink: SegmentSink, stamps: list[int]) -> None:
    """The encode thread's work, done by hand."""
    encoder = VideoEncoder(WIDTH, HEIGHT, gop=0.5)
    segmenter = Segmenter(sink, WIDTH, HEIGHT)
    pattern = PatternFrames(WIDTH, HEIGHT)
    for index, pts in enumerate(stamps):
        for packet in encoder.encode(pattern.frame(index), pts):
            segmenter.mux_video(packet)
    for packet in encoder.close():
        segmenter.mux_video(packet)
    segmenter.close()


# A budget of one byte: every write waits for the one before it to reach the publisher.
@pytest.mark.parametrize("max_bytes", [SINK_BUFFER, 1])
async def test_sink_publishes_what_the_segmenter_produced(
    trickle_server: TrickleServer, max_bytes: int
) -> None:
    url = trickle_server.channel_url("sink")
    reader = asyncio.create_task(read_segments(url, count=4))
    record = RecordingSink()
    async with Publisher(url) as publisher:
        sink = SegmentPublisherSink(publisher, max_bytes=max_bytes)
        sink.start()
        await asyncio.to_thread(produce, Tee(record, sink), timeline("30fps", seconds=2.0))
        await sink.stop()
        received = await reader
    assert sink.error is None
    assert received == record.ended()  # byte for byte, segment for segment
    assert sink.stats.segments == 4
    assert sink.stats.bytes == sum(map(len, received))
    assert sink.buffered == 0
    assert sink.failed.cancelled()
    assert_nothing_left()


@pytest.mark.parametrize("audio", ["aac", "libopus", "dropped"])
async def test_pipeline_publishes_every_frame_and_audio_packet(
    trickle_server: TrickleServer, audio: str
) -> None:
    url = trickle_server.channel_url("pipeline")
    stamps = timeline("30fps", seconds=2.0)
    info, packets = audio_source("aac" if audio == "dropped" else audio, seconds=2.0)
    reader = asyncio.create_task(read_segments(url, count=2))
    async with Publisher(url) as publisher:
        encoder = VideoEncoder(WIDTH, HEIGHT, gop=1.0)
        pipeline = OutputPipeline(publisher, encoder, policy=Policy.BLOCK, drop_audio=audio == "dropped")
        pipeline.add_audio_stream(info)
        pipeline.start()
        pattern = PatternFrames(WIDTH, HEIGHT)
        for index, pts in enumerate(stamps):
            while packets and packets[0][1] <= pts:
                await pipeline.submit_audio(*packets.pop(0))
            await pipeline.submit(pattern.frame(index), pts)
        for packet, pts in packets:
            await pipeline.submit_audio(packet, pts)
        await pipeline.stop()
        segments = await reader
    assert_nothing_left()

    decoded = [decode(data) for data in segments]
    assert all(d.keyframes[0] for d in decoded)
    assert [pts for d in decoded for pts in d.video_pts] == stamps
    assert pipeline.stats.frames_dropped == 0
    assert pipeline.stats.audio_dropped == 0
    if audio == "dropped":
        assert all(d.audio_streams == 0 for d in decoded)
    else:
        assert sum(len(d.audio_pts) for d in decoded) == pipeline.stats.audio_in
    assert pipeline.sink.stats.segments == 2


async def test_segment_streams_while_it_is_encoded(trickle_server: TrickleServer) -> None:
    url = trickle_server.channel_url("streaming")
    pattern = PatternFrames(WIDTH, HEIGHT)
    async with Publisher(url) as publisher, Subscriber(url, start_seq=0) as subscriber:
        pipeline = OutputPipeline(publisher, VideoEncoder(WIDTH, HEIGHT, gop=1.0), policy=Policy.BLOCK)
        pipeline.start()
        for index in range(3):
            await pipeline.submit(pattern.frame(index), index * 3_000)
        # Segment 0 has 30 frames to go, and yet its first bytes are already at the reader.
        segment = await anext(subscriber)
        first = await segment.read()
        assert segment.seq == 0
        assert first[:1] == b"\x47"  # an MPEG-TS packet
        assert pipeline.sink.stats.segments == 0
        assert pipeline.encoder.stats.frames <= 3
        for index in range(3, 45):
            await pipeline.submit(pattern.frame(index), index * 3_000)
        await pipeline.stop()
        rest = b"".join([chunk async for chunk in segment])
    assert len(decode(first + rest).video_pts) == 30
    assert_nothing_left()


async def test_latest_wins_encodes_the_newest_frame(trickle_server: TrickleServer) -> None:
    url = trickle_server.channel_url("latest")
    pattern = PatternFrames(WIDTH, HEIGHT)
    reader = asyncio.create_task(read_segments(url, count=1))
    async with Publisher(url) as publisher:
        pipeline = OutputPipeline(publisher, VideoEncoder(WIDTH, HEIGHT, gop=10.0))
        pipeline.start()
        for index in range(60):  # far faster than real time: the encoder skips what it must
            await pipeline.submit(pattern.frame(index), index * 3_000)
        await pipeline.stop()
        (segment,) = await reader
    stats = pipeline.stats
    assert stats.frames_in == 60 == pipeline.encoder.stats.frames + stats.frames_dropped
    out = decode(segment).video_pts
    assert len(out) == pipeline.encoder.stats.frames
    assert set(out) <= {index * 3_000 for index in range(60)}
    assert out[-1] == 59 * 3_000  # the newest frame is never the one dropped
    assert_nothing_left()


async def test_inbox_policies() -> None:
    loop = asyncio.get_running_loop()
    frames = [PatternFrames(16, 16).frame(i) for i in range(3)]
    latest = _Inbox(loop, Policy.LATEST, queue_frames=4, queue_audio=2)
    await latest.put(latest.frames, frames[0], 0)
    await latest.put(latest.frames, frames[1], 1)  # replaces the waiting one
    for pts in range(3):
        await latest.put(latest.audio, av.Packet(b"a"), pts)  # the third lets the oldest go
    work = latest.take()
    assert work is not None
    audio, frame = work
    assert [pts for _, pts in audio] == [1, 2]
    assert frame == (frames[1], 1)
    assert (latest.frames.received, latest.frames.dropped, latest.frames.waited) == (2, 1, 0)
    assert (latest.audio.received, latest.audio.dropped, latest.audio.waited) == (3, 1, 0)

    block = _Inbox(loop, Policy.BLOCK, queue_frames=2, queue_audio=2)
    for pts in range(2):
        await block.put(block.frames, frames[pts], pts)
    putting = asyncio.Event()

    async def put_third() -> None:
        putting.set()  # put() runs on from here without a pause until it waits for room
        await block.put(block.frames, frames[2], 2)

    waiting = asyncio.create_task(put_third())
    await putting.wait()
    assert not waiting.done()
    assert await asyncio.to_thread(block.take) == ([], (frames[0], 0))
    await waiting
    assert [pts for _, pts in block.frames.items] == [1, 2]
    assert (block.frames.received, block.frames.dropped, block.frames.waited) == (3, 0, 1)
    block.close()
    with pytest.raises(RuntimeError, match="not running"):
        await block.put(block.frames, frames[0], 3)


async def test_channel_closed_by_the_server_surfaces(trickle_server: TrickleServer) -> None:
    url = trickle_server.channel_url("closing")
    pattern = PatternFrames(WIDTH, HEIGHT)
    async with Publisher(url) as publisher:
        pipeline = OutputPipeline(publisher, VideoEncoder(WIDTH, HEIGHT, gop=0.2), policy=Policy.BLOCK)
        pipeline.start()
        for index in range(12):  # two segments of 6 frames
            await pipeline.submit(pattern.frame(index), index * 3_000)
        await trickle_server.wait_until(lambda: _published(trickle_server) >= 1)
        async with aiohttp.ClientSession() as http, http.delete(url) as response:
            assert response.status == 200
        with pytest.raises(ChannelClosedError):
            for index in range(12, 300):  # until the error comes back
                await pipeline.submit(pattern.frame(index), index * 3_000)
        assert isinstance(await pipeline.failed, ChannelClosedError)
        with pytest.raises(ChannelClosedError):
            await pipeline.stop()
        # The encode side sees it too: the sink refuses more bytes with the same error.
        with pytest.raises(ChannelClosedError):
            await asyncio.to_thread(pipeline.sink.write, b"late")
    assert_nothing_left()


def _published(server: TrickleServer) -> int:
    snapshot = server.snapshot("closing")
    return 0 if snapshot is None else sum(s.closed for s in snapshot.segments.values())


class GatedPublisher:
    """Publisher stand-in whose writes wait for a gate: the one way to hold the network back
    deterministically. (Everything else here runs against the real server.)"""

    url = "gated"
    seq = 0  # as a SegmentWriter: segment() hands out the publisher itself

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.received: list[bytes] = []
        self.error: Exception | None = None

    async def segment(self) -> GatedPublisher:
        return self

    async def write(self, data: bytes) -> None:
        await self.gate.wait()
        if self.error is not None:
            raise self.error
        self.received.append(data)

    async def close(self) -> Outcome:
        return Outcome.PUBLISHED

    async def abort(self) -> Outcome:
        return Outcome.CANCELLED


async def test_a_full_sink_blocks_the_encode_thread_and_loses_nothing() -> None:
    loop = asyncio.get_running_loop()
    publisher = GatedPublisher()
    sink = SegmentPublisherSink(publisher, max_bytes=4)  # type: ignore[arg-type]
    sink.start()
    first_written = asyncio.Event()

    def encode_thread() -> None:
        sink.begin(0)
        sink.write(b"abcd")
        loop.call_soon_threadsafe(first_written.set)
        sink.write(b"efgh")  # 4 + 4 > 4 while "abcd" is held at the gate: waits
        sink.end(0)

    thread = asyncio.create_task(asyncio.to_thread(encode_thread))
    await first_written.wait()
    assert not thread.done()
    publisher.gate.set()
    await thread
    await sink.stop()
    assert publisher.received == [b"abcd", b"efgh"]
    assert sink.stats.blocked == 1
    assert sink.stats.segments == 1


async def test_a_publisher_error_fails_the_sink_and_the_next_write() -> None:
    publisher = GatedPublisher()
    publisher.error = ChannelClosedError("gone")
    publisher.gate.set()
    sink = SegmentPublisherSink(publisher)  # type: ignore[arg-type]
    sink.start()
    await asyncio.to_thread(lambda: (sink.begin(0), sink.write(b"abcd")))
    assert await sink.failed is publisher.error
    with pytest.raises(ChannelClosedError):
        await asyncio.to_thread(sink.write, b"efgh")
    await sink.stop()
    assert sink.error is publisher.error
    assert_nothing_left()


async def test_audio_stream_can_join_after_start_until_the_first_submit(
    trickle_server: TrickleServer,
) -> None:
    url = trickle_server.channel_url("late-audio")
    info, packets = audio_source("aac", seconds=1.0)
    reader = asyncio.create_task(read_segments(url, count=1))
    async with Publisher(url) as publisher:
        pipeline = OutputPipeline(publisher, VideoEncoder(WIDTH, HEIGHT, gop=2.0), policy=Policy.BLOCK)
        pipeline.start()
        pipeline.add_audio_stream(info)  # a live input's audio parameters come with its first packet
        await pipeline.submit_audio(*packets[0])
        with pytest.raises(RuntimeError, match="before the first frame or audio packet"):
            pipeline.add_audio_stream(info)
        await pipeline.submit(PatternFrames(WIDTH, HEIGHT).frame(0), packets[0][1])
        for packet, pts in packets[1:]:
            await pipeline.submit_audio(packet, pts)
        await pipeline.stop()
        (segment,) = await reader
    assert decode(segment).audio_streams == 1
    assert len(decode(segment).audio_pts) == len(packets)
    assert_nothing_left()
