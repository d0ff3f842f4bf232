"""Output pipeline against the real embedded trickle server, read back by a real Subscriber."""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import Callable
from fractions import Fraction
from itertools import pairwise
from typing import Any

import aiohttp
import av
import numpy as np
import pytest

from relay_server.media.encoder import CLOCK, VideoEncoder
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


async def test_live_lets_the_oldest_frames_go_when_far_behind(trickle_server: TrickleServer) -> None:
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
    live = _Inbox(loop, Policy.LIVE, queue_frames=2, queue_audio=2, on_skip=lambda _: None)
    for pts in range(3):
        await live.put_frame(frames[pts], pts)  # in order; the third lets the oldest go
        await live.put_audio(av.Packet(b"a"), pts)  # so does the audio
    work = live.take()
    assert work is not None
    audio, frame = work
    assert [pts for _, pts in audio] == [1, 2]
    assert frame == (frames[1], 1)
    assert [pts for _, pts in live.video_lane.items] == [2]
    assert (live.frames.received, live.frames.dropped, live.frames.waited) == (3, 1, 0)
    assert (live.audio.received, live.audio.dropped, live.audio.waited) == (3, 1, 0)

    block = _Inbox(loop, Policy.BLOCK, queue_frames=2, queue_audio=2, on_skip=lambda _: None)
    for pts in range(2):
        await block.put_frame(frames[pts], pts)
    putting = asyncio.Event()

    async def put_third() -> None:
        putting.set()  # put() runs on from here without a pause until it waits for room
        await block.put_frame(frames[2], 2)

    waiting = asyncio.create_task(put_third())
    await putting.wait()
    assert not waiting.done()
    assert await asyncio.to_thread(block.take) == ([], (frames[0], 0))
    await waiting
    assert [pts for _, pts in block.video_lane.items] == [1, 2]
    assert (block.frames.received, block.frames.dropped, block.frames.waited) == (3, 0, 1)
    block.close()
    with pytest.raises(RuntimeError, match="not running"):
        await block.put_frame(frames[0], 3)


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


class WaitSignallingCondition(threading.Condition):
    """A condition that says when a thread begins to wait on it: the sink's, so that the test
    knows the encode thread is blocked, rather than guessing when it may be."""

    def __init__(self, on_wait: Callable[[], object]) -> None:
        super().__init__()
        self._on_wait = on_wait

    def wait(self, timeout: float | None = None) -> bool:
        self._on_wait()
        return super().wait(timeout)


async def test_a_full_sink_blocks_the_encode_thread_and_loses_nothing() -> None:
    loop = asyncio.get_running_loop()
    publisher = GatedPublisher()
    sink = SegmentPublisherSink(publisher, max_bytes=4)  # type: ignore[arg-type]
    blocked = asyncio.Event()
    sink._cond = WaitSignallingCondition(lambda: loop.call_soon_threadsafe(blocked.set))
    sink.start()

    def encode_thread() -> None:
        sink.begin(0)
        sink.write(b"abcd")
        sink.write(b"efgh")  # 4 + 4 > 4 while "abcd" is held at the gate: waits
        sink.end(0)

    thread = asyncio.create_task(asyncio.to_thread(encode_thread))
    await blocked.wait()
    assert not thread.done() and publisher.received == []
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
        await pipeline.submit(PatternFrames(WIDTH, HEIGHT).frame(0), packets[0][1])
        for packet, pts in packets[1:]:
            await pipeline.submit_audio(packet, pts)
        await pipeline.stop()
        (segment,) = await reader
    assert decode(segment).audio_streams == 1
    assert len(decode(segment).audio_pts) == len(packets)
    assert_nothing_left()


async def test_audio_that_comes_after_the_video_began_joins_at_once(trickle_server: TrickleServer) -> None:
    """The output does not wait for a live input's audio: when its stream becomes known, a
    keyframe is asked for, and the segment it begins carries the audio."""
    url = trickle_server.channel_url("later-audio")
    info, packets = audio_source("aac", seconds=1.0)
    reader = asyncio.create_task(read_segments(url, count=2))
    frames = PatternFrames(WIDTH, HEIGHT)
    async with Publisher(url) as publisher:
        pipeline = OutputPipeline(
            publisher, VideoEncoder(WIDTH, HEIGHT, gop=10.0), policy=Policy.BLOCK, queue_frames=1
        )
        pipeline.start()
        for index in range(3):
            await pipeline.submit(frames.frame(index), index * STEP)
        # With one frame queued at most, the encode thread has taken frame 1: frame 0 is muxed.
        assert pipeline.segmenter.stats.segments == 1
        pipeline.add_audio_stream(info)
        for index in range(3, 30):
            await pipeline.submit(frames.frame(index), index * STEP)
            while packets and packets[0][1] < index * STEP:
                await pipeline.submit_audio(*packets.pop(0))
        await pipeline.stop()
        first, second = await reader
    # The gop is 10 s: the second segment began because the audio joined.
    assert (decode(first).audio_streams, decode(second).audio_streams) == (0, 1)
    assert decode(second).audio_pts and pipeline.encoder.stats.keyframes == 2
    assert_nothing_left()


# -- encoded packets (passthrough) ------------------------------------------------------------

STEP = 3_000  # one frame at 30 fps on the 90 kHz clock


def processor_stream(count: int, keyint: int) -> tuple[list[av.Packet], list[np.ndarray[Any, Any]]]:
    """What a processor returns in passthrough: `count` access units of libx264 (zerolatency,
    Annex B, an IDR every `keyint` frames) as the owner hands them over (fresh packets with
    is_keyframe set), and each one's picture decoded in order from the first: the reference."""
    codec = av.CodecContext.create("libx264", "w")
    codec.width, codec.height, codec.pix_fmt = WIDTH, HEIGHT, "yuv420p"
    codec.time_base = CLOCK
    codec.framerate = Fraction(30)
    codec.options = {
        "preset": "ultrafast",
        "tune": "zerolatency",
        "x264-params": f"keyint={keyint}:min-keyint={keyint}:scenecut=0",
    }
    pattern = PatternFrames(WIDTH, HEIGHT)
    encoded = []
    for index in range(count):
        frame = pattern.frame(index)
        frame.pts = index * STEP
        encoded += codec.encode(frame)
    encoded += codec.encode(None)
    decoder = av.CodecContext.create("h264", "r")
    pictures = [f.to_ndarray() for packet in encoded for f in decoder.decode(packet)]
    assert len(encoded) == len(pictures) == count
    units = []
    for packet in encoded:
        unit = av.Packet(bytes(packet))
        unit.is_keyframe = packet.is_keyframe
        units.append(unit)
    return units, pictures


def decode_all(segments: list[bytes]) -> list[tuple[int, bool, np.ndarray[Any, Any]]]:
    """(pts, keyframe, picture) of every frame of the segments played back to back."""
    out = []
    with av.open(io.BytesIO(b"".join(segments)), "r", format="mpegts") as container:
        for frame in container.decode(video=0):
            assert frame.pts is not None
            out.append((frame.pts, frame.key_frame, frame.to_ndarray()))
    return out


def assert_each_segment_decodes_alone(segments: list[bytes]) -> None:
    for data in segments:
        decoded = decode(data)
        assert decoded.keyframes[0], decoded.keyframes
        assert not any(decoded.keyframes[1:])  # one GOP per segment


class GatedSegments(GatedPublisher):
    """A GatedPublisher that tells its segments apart; open at once with `open=True`. (The
    server keeps the last RING_SLOTS segments: a test with more reads them here.)"""

    def __init__(self, *, open: bool = False) -> None:
        super().__init__()
        self.starts: list[int] = []
        if open:
            self.gate.set()

    async def segment(self) -> GatedSegments:
        self.starts.append(len(self.received))
        return self

    def segments(self) -> list[bytes]:
        bounds = [*self.starts, len(self.received)]
        return [b"".join(self.received[a:b]) for a, b in pairwise(bounds)]


async def test_packets_are_muxed_as_they_are(trickle_server: TrickleServer) -> None:
    url = trickle_server.channel_url("packets")
    units, pictures = processor_stream(60, keyint=15)
    reader = asyncio.create_task(read_segments(url, count=4))
    async with Publisher(url) as publisher:
        pipeline = OutputPipeline(publisher, VideoEncoder(WIDTH, HEIGHT, gop=1.0), policy=Policy.BLOCK)
        pipeline.start()
        for index, unit in enumerate(units):
            await pipeline.submit_packet(unit, index * STEP)
        await pipeline.stop()
        segments = await reader
    assert_nothing_left()
    assert_each_segment_decodes_alone(segments)
    out = decode_all(segments)
    assert [pts for pts, _, _ in out] == [index * STEP for index in range(60)]
    # The very pictures the processor's stream decodes to: nothing re-encoded, nothing lost.
    assert all(np.array_equal(picture, pictures[pts // STEP]) for pts, _, picture in out)
    assert pipeline.encoder.stats.frames == 0
    stats = pipeline.stats
    assert (stats.packets_in, stats.packets_dropped, stats.keyframes_requested) == (60, 0, 0)


async def test_frames_and_packets_take_turns_and_the_output_stays_decodable() -> None:
    pattern = PatternFrames(WIDTH, HEIGHT)
    # The processor's stream, keyframes every 20 of its frames, joins at slot 38 with its frame
    # 30: slots 38–39 are not after the frames (late), 40–47 wait for its keyframe at slot 48.
    units, pictures = processor_stream(70, keyint=20)
    offset = 8  # slot = processor frame + offset
    submissions: list[tuple[str, int]] = (
        [("frame", slot) for slot in range(40)]
        + [("packet", slot) for slot in range(38, 78)]
        + [("frame", slot) for slot in range(76, 120)]  # 76–77 are not after the packets
    )
    publisher = GatedSegments(open=True)
    encoder = VideoEncoder(WIDTH, HEIGHT, gop=0.5)  # an IDR every 15 frames
    pipeline = OutputPipeline(publisher, encoder, policy=Policy.BLOCK)  # type: ignore[arg-type]
    pipeline.start()
    for kind, slot in submissions:
        if kind == "frame":
            await pipeline.submit(pattern.frame(slot), slot * STEP)
        else:
            await pipeline.submit_packet(units[slot - offset], slot * STEP)
    await pipeline.stop()
    assert_nothing_left()
    segments = publisher.segments()

    # Frame segments at 0, 15, 30; packet segments at the processor's keyframes (48, 68); the
    # first frame after the packets is an IDR (78), then 93, 108.
    assert [decode(data).video_pts[0] // STEP for data in segments] == [0, 15, 30, 48, 68, 78, 93, 108]
    assert_each_segment_decodes_alone(segments)
    out = decode_all(segments)
    slots = [*range(40), *range(48, 78), *range(78, 120)]
    assert [pts for pts, _, _ in out] == [slot * STEP for slot in slots]  # monotonic throughout
    passed = [(pts // STEP, picture) for pts, _, picture in out if 48 <= pts // STEP < 78]
    assert all(np.array_equal(picture, pictures[slot - offset]) for slot, picture in passed)
    stats = pipeline.stats
    assert (stats.packets_in, stats.packets_dropped) == (40, 2 + 8)
    assert (stats.frames_in, stats.frames_late, stats.frames_dropped) == (84, 2, 0)
    # A keyframe was asked for at slot 40 (packets waiting for one) and 63 (a gop after 48).
    assert stats.keyframes_requested == 2
    assert encoder.stats.frames == 40 + 42


async def test_a_packet_stream_joins_at_its_first_keyframe(trickle_server: TrickleServer) -> None:
    url = trickle_server.channel_url("join")
    units, pictures = processor_stream(30, keyint=10)
    loop = asyncio.get_running_loop()
    requests: list[bool] = []  # whether each request came on the event loop
    reader = asyncio.create_task(read_segments(url, count=2))
    async with Publisher(url) as publisher:
        pipeline = OutputPipeline(
            publisher,
            VideoEncoder(WIDTH, HEIGHT, gop=2.0),
            policy=Policy.BLOCK,
            on_keyframe_overdue=lambda: requests.append(asyncio.get_running_loop() is loop),
        )
        pipeline.start()
        for index in range(3, 30):  # joined mid-GOP: 3–9 refer to pictures the output lacks
            await pipeline.submit_packet(units[index], index * STEP)
        await pipeline.stop()
        segments = await reader
    assert_nothing_left()
    assert_each_segment_decodes_alone(segments)
    out = decode_all(segments)
    assert [pts // STEP for pts, _, _ in out] == list(range(10, 30))
    assert all(np.array_equal(picture, pictures[pts // STEP]) for pts, _, picture in out)
    assert (pipeline.stats.packets_in, pipeline.stats.packets_dropped) == (27, 7)
    assert pipeline.segmenter.stats.video_dropped == 0  # none reached the segmenter
    # The first packet that could not be muxed asked for a keyframe at once, and only it.
    assert requests == [True]
    assert pipeline.stats.keyframes_requested == 1


@pytest.mark.parametrize(("keyint", "requests"), [(60, 3), (15, 0), (12, 0)])
async def test_a_keyframe_is_requested_when_a_packet_segment_runs_past_the_gop(
    trickle_server: TrickleServer, keyint: int, requests: int
) -> None:
    url = trickle_server.channel_url("overdue")
    units, _ = processor_stream(60, keyint=keyint)
    calls: list[bool] = []
    loop = asyncio.get_running_loop()
    async with Publisher(url) as publisher:
        pipeline = OutputPipeline(
            publisher,
            VideoEncoder(WIDTH, HEIGHT, gop=0.5),  # 15 frames
            policy=Policy.BLOCK,
            on_keyframe_overdue=lambda: calls.append(asyncio.get_running_loop() is loop),
        )
        pipeline.start()
        for index, unit in enumerate(units):
            await pipeline.submit_packet(unit, index * STEP)
        await pipeline.stop()
    # keyint 60: one segment of 60 frames asks at frames 15, 30 and 45 (once per gop); a
    # keyframe at the gop or before it never needs asking for.
    assert calls == [True] * requests
    assert pipeline.stats.keyframes_requested == requests
    assert pipeline.stats.packets_dropped == 0
    assert pipeline.segmenter.stats.segments == 60 // keyint
    assert_nothing_left()


async def test_inbox_queues_packets_and_skips_to_a_keyframe_when_full() -> None:
    loop = asyncio.get_running_loop()
    skips = asyncio.Event()
    latest = _Inbox(loop, Policy.LIVE, queue_frames=4, queue_audio=2, on_skip=lambda _: skips.set())

    def unit(name: str) -> av.Packet:
        packet = av.Packet(name.encode())
        packet.is_keyframe = name.startswith("K")
        return packet

    def queued() -> list[str]:
        return [
            bytes(item).decode() if isinstance(item, av.Packet) else f"F{pts}"
            for item, pts in latest.video_lane.items
        ]

    for pts, name in enumerate(["K0", "P1", "P2", "P3"]):
        await latest.put_packet(unit(name), pts)
    assert queued() == ["K0", "P1", "P2", "P3"]  # packets queue: none replaces another
    await latest.put_packet(unit("P4"), 4)  # full: P1–P3 go, and P4 refers to them
    assert queued() == ["K0"]
    await asyncio.wait_for(skips.wait(), 5)
    await latest.put_packet(unit("P5"), 5)  # skipped up to the next keyframe
    for pts, name in [(6, "K6"), (7, "P7")]:
        await latest.put_packet(unit(name), pts)
    await latest.put_frame(PatternFrames(16, 16).frame(0), 8)
    await latest.put_frame(PatternFrames(16, 16).frame(1), 9)  # full again: P7 goes
    assert queued() == ["K0", "K6", "F8", "F9"]
    await latest.put_packet(unit("P10"), 10)  # keyframes and frames only: the oldest goes, and P10
    assert queued() == ["K6", "F8", "F9"]
    await latest.put_packet(unit("K11"), 11)
    await latest.put_packet(unit("K12"), 12)  # full: the oldest goes
    assert queued() == ["F8", "F9", "K11", "K12"]
    assert (latest.packets.received, latest.packets.dropped, latest.packets.waited) == (11, 9, 0)
    assert (latest.frames.received, latest.frames.dropped) == (2, 0)

    block = _Inbox(loop, Policy.BLOCK, queue_frames=2, queue_audio=2, on_skip=lambda _: None)
    await block.put_packet(unit("K0"), 0)
    await block.put_frame(PatternFrames(16, 16).frame(0), 1)  # frames and packets share the bound
    putting = asyncio.Event()

    async def put_third() -> None:
        putting.set()
        await block.put_packet(unit("P2"), 2)

    waiting = asyncio.create_task(put_third())
    await putting.wait()
    assert not waiting.done()
    work = await asyncio.to_thread(block.take)
    assert work is not None and work[1] is not None
    first, _ = work[1]
    assert isinstance(first, av.Packet) and bytes(first) == b"K0"
    await waiting
    assert [pts for _, pts in block.video_lane.items] == [1, 2]  # in the order they came
    assert (block.packets.received, block.packets.dropped, block.packets.waited) == (2, 0, 1)


async def test_live_overflow_drops_packets_up_to_a_keyframe_and_the_output_decodes() -> None:
    units, pictures = processor_stream(40, keyint=6)
    publisher = GatedSegments()
    requests: list[None] = []
    pipeline = OutputPipeline(
        publisher,  # type: ignore[arg-type]
        VideoEncoder(WIDTH, HEIGHT, gop=10.0),
        sink_bytes=1,  # with the gate shut the encode thread blocks on its first packet
        on_keyframe_overdue=lambda: requests.append(None),
    )
    pipeline.start()
    for index, unit in enumerate(units):  # Policy.LIVE: never waits
        await pipeline.submit_packet(unit, index * STEP)
    publisher.gate.set()
    await pipeline.stop()
    assert_nothing_left()

    segments = publisher.segments()
    assert_each_segment_decodes_alone(segments)
    muxed = [pts // STEP for pts, _, _ in decode_all(segments)]
    stats = pipeline.stats
    assert stats.packets_dropped > 0
    assert stats.packets_in == 40 == len(muxed) + stats.packets_dropped
    assert muxed == sorted(muxed)
    # Nothing refers to a picture the output lacks: every packet but a keyframe follows the
    # processor frame before it, and decodes to the very picture it did there.
    assert all(units[index].is_keyframe or index - 1 in muxed for index in muxed)
    out = decode_all(segments)
    assert all(np.array_equal(picture, pictures[pts // STEP]) for pts, _, picture in out)
    # Skipping asks for a keyframe: once, though it skipped again and again within the gop.
    assert len(requests) == stats.keyframes_requested == 1
