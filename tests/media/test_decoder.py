"""Decoder: progressive decode of a whole trickle input on one thread, timestamps kept, damage survived."""

from __future__ import annotations

import asyncio
import io
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import av
import pytest
from av.video.frame import PictureType

from relay_server._fast import ChunkQueue
from relay_server.media.decoder import Decoder, InputError
from relay_server.media.feeder import feed
from relay_server.media.scaler import ScaleMode, Scaler
from relay_server.media.segmenter import AudioInfo
from relay_server.trickle import Publisher, Subscriber
from relay_server.trickle.server import TrickleServer
from tests.media.clips import (
    CLOCK,
    ClipSpec,
    chunks,
    make_clip,
    memory_subscriber,
    pattern,
    publish_segments,
    read_index,
    take,
)

TIMEOUT = 20.0
QUEUE_BYTES = 256 * 1024  # smaller than most clips: feeding waits for the decoder now and then
TS_PACKET = 188
VIDEO_PID = 0x100  # FFmpeg's MPEG-TS muxer numbers streams from 0x100; video is the first


@dataclass(frozen=True)
class Decoded:
    pts: int
    index: int  # the frame index the picture shows
    size: tuple[int, int]
    format: str
    pict_type: int


class Sink:
    """What a Decoder delivers, recorded on its thread; the events are set on the test's loop."""

    def __init__(self, content: tuple[int, int] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        self.content = content  # (top, height) of the picture inside letterboxed frames
        self.frames: list[Decoded] = []
        self.audio_pts: list[int] = []
        self.ended = False
        self.error: Exception | None = None
        self.first_frame = asyncio.Event()
        self.done = asyncio.Event()

    def decoder(self, queue: ChunkQueue, **kwargs: Any) -> Decoder:
        kwargs.setdefault("on_audio", self.on_audio)
        return Decoder(
            queue, self.on_frame, on_end=self.on_end, on_error=self.on_error, thread_count=1, **kwargs
        )

    def on_frame(self, frame: av.VideoFrame) -> None:
        assert frame.pts is not None and frame.time_base == CLOCK
        index = read_index(frame, *self.content) if self.content else read_index(frame)
        self.frames.append(
            Decoded(frame.pts, index, (frame.width, frame.height), frame.format.name, frame.pict_type)
        )
        if len(self.frames) == 1:
            self.loop.call_soon_threadsafe(self.first_frame.set)

    def on_audio(self, packet: av.Packet) -> None:
        assert packet.pts is not None and packet.size > 0
        self.audio_pts.append(packet.pts)

    def on_end(self) -> None:
        self.ended = True
        self.loop.call_soon_threadsafe(self.done.set)

    def on_error(self, exc: Exception) -> None:
        self.error = exc
        self.loop.call_soon_threadsafe(self.done.set)

    @property
    def pts(self) -> list[int]:
        return [frame.pts for frame in self.frames]


@pytest.fixture(autouse=True)
def no_thread_left() -> Iterator[None]:
    yield
    assert not [thread.name for thread in threading.enumerate() if thread.name.startswith("decoder")]


async def through_trickle(
    server: TrickleServer, segments: tuple[bytes, ...], sink: Sink, **kwargs: Any
) -> Decoder:
    """Publish `segments` on a channel while a Subscriber feeds them to a decoder; wait until it ends."""
    name = "input"
    url = server.channel_url(name)
    queue = ChunkQueue(QUEUE_BYTES)
    decoder = sink.decoder(queue, **kwargs)
    decoder.start()
    try:
        async with Publisher(url) as publisher:
            writer = await publisher.segment()
            await server.wait_until(lambda: server.snapshot(name) is not None)
            async with Subscriber(url, start_seq=0) as subscriber:
                feeding = asyncio.create_task(feed(take(subscriber, len(segments)), queue))
                await publish_segments(publisher, writer, segments)
                await asyncio.wait_for(feeding, TIMEOUT)
        await asyncio.wait_for(sink.done.wait(), TIMEOUT)
    finally:
        decoder.stop()
    return decoder


async def through_memory(segments: list[bytes], sink: Sink, **kwargs: Any) -> Decoder:
    """Feed `segments` in 64 KiB chunks to a decoder and wait until it ends."""
    queue = ChunkQueue(QUEUE_BYTES)
    decoder = sink.decoder(queue, **kwargs)
    decoder.start()
    try:
        await asyncio.wait_for(feed(memory_subscriber(segments), queue), TIMEOUT)
        await asyncio.wait_for(sink.done.wait(), TIMEOUT)
    finally:
        decoder.stop()
    return decoder


def describe(spec: ClipSpec) -> str:
    fps = "vfr" if spec.variable_fps else f"{spec.fps}fps"
    return f"{spec.width}x{spec.height}-{fps}-bf{spec.b_frames}-{spec.audio or 'silent'}-{spec.cut}"


MATRIX = [
    ClipSpec(512, 512, fps=30, frames=30, gop=15),
    ClipSpec(512, 512, fps=24, frames=36, gop=12, b_frames=2, audio="aac", cut="mid_gop"),
    ClipSpec(512, 512, fps=60, frames=60, gop=30, audio="opus"),
    ClipSpec(512, 512, fps=25, frames=50, gop=25, b_frames=3, variable_fps=True, cut="mid_gop"),
    ClipSpec(1280, 720, fps=25, frames=25, gop=10, b_frames=2, audio="opus"),
    ClipSpec(1280, 720, fps=30, frames=30, gop=15, audio="aac", cut="mid_gop"),
    ClipSpec(1280, 720, fps=60, frames=60, gop=30, b_frames=2),
    ClipSpec(1280, 720, fps=24, frames=24, gop=12, audio="aac"),
]


@pytest.mark.parametrize("spec", MATRIX, ids=describe)
async def test_every_frame_decodes_with_its_pts(trickle_server: TrickleServer, spec: ClipSpec) -> None:
    clip = make_clip(spec)
    sink = Sink()
    decoder = await through_trickle(trickle_server, clip.segments, sink)

    assert sink.ended and sink.error is None and decoder.error is None
    # Every frame, in presentation order, with the pts it was encoded with and its own picture.
    assert sink.pts == list(clip.video_pts)
    assert [clip.video_pts[frame.index] for frame in sink.frames] == sink.pts
    assert {(frame.size, frame.format, frame.pict_type) for frame in sink.frames} == {
        ((spec.width, spec.height), "yuv420p", PictureType.NONE)
    }
    assert len(sink.audio_pts) == clip.audio_packets
    assert sink.audio_pts == sorted(sink.audio_pts)

    stats = decoder.stats
    assert stats.frames == stats.packets == spec.frames
    assert stats.audio_packets == clip.audio_packets
    assert stats.corrupt_packets == stats.damaged_frames == 0
    assert stats.bytes_read == len(clip.data)
    assert (stats.codec, stats.width, stats.height) == ("h264", spec.width, spec.height)
    assert stats.video_demuxer == "split"  # H.264: access units cut out by the VideoSplitter
    assert decoder.splitter_stats is not None and decoder.splitter_stats.units == spec.frames
    assert (stats.reorder_depth > 0) == (spec.b_frames > 0)
    assert stats.first_frame_time is not None and stats.decode_seconds > 0
    if not spec.variable_fps:
        assert stats.frame_rate == spec.fps
    if spec.audio is None:
        assert decoder.audio_stream_info is None
    else:
        info = decoder.audio_stream_info
        assert info is not None
        assert (info.codec, info.sample_rate, info.channels, info.time_base) == (spec.audio, 48_000, 2, CLOCK)
        assert bool(info.extradata) == (spec.audio == "opus")  # AAC in MPEG-TS is ADTS: no extradata


async def test_frames_are_scaled_on_the_decode_thread(trickle_server: TrickleServer) -> None:
    clip = make_clip(ClipSpec(1280, 720, fps=30, frames=30, gop=15, b_frames=2))
    sink = Sink(content=(112, 288))  # 16:9 letterboxed into 512×512
    decoder = await through_trickle(
        trickle_server, clip.segments, sink, scaler=Scaler(512, 512, ScaleMode.LETTERBOX)
    )
    assert sink.pts == list(clip.video_pts)
    assert [clip.video_pts[frame.index] for frame in sink.frames] == sink.pts
    assert {frame.size for frame in sink.frames} == {(512, 512)}
    assert (decoder.stats.width, decoder.stats.height) == (1280, 720)  # the input's size


async def test_first_frame_comes_while_its_segment_is_still_arriving(trickle_server: TrickleServer) -> None:
    clip = make_clip(ClipSpec(512, 512, fps=30, frames=30, gop=30, audio="aac"))
    (data,) = clip.segments
    third = len(data) // 3
    sink = Sink()
    queue = ChunkQueue(QUEUE_BYTES)
    decoder = sink.decoder(queue)
    decoder.start()
    url = trickle_server.channel_url("slow")
    try:
        async with Publisher(url) as publisher:
            writer = await publisher.segment()
            await trickle_server.wait_until(lambda: trickle_server.snapshot("slow") is not None)
            async with Subscriber(url, start_seq=0) as subscriber:
                feeding = asyncio.create_task(feed(take(subscriber, 1), queue))
                async for piece in chunks(data[:third], 4096):
                    await writer.write(piece)
                await asyncio.wait_for(sink.first_frame.wait(), TIMEOUT)
                # Decoded from the first third: the rest of the segment is not even written yet.
                assert queue.bytes_in <= third
                assert sink.frames[0].pts == clip.video_pts[0] and sink.frames[0].index == 0
                async for piece in chunks(data[third:], 4096):
                    await writer.write(piece)
                await writer.close()
                await asyncio.wait_for(feeding, TIMEOUT)
        await asyncio.wait_for(sink.done.wait(), TIMEOUT)
    finally:
        decoder.stop()
    assert sink.pts == list(clip.video_pts)


class PacketSink(Sink):
    """Also records video packets handed to on_video_packet, and the order of packets and frames."""

    def __init__(self, forward: Callable[[av.Packet], bool] = lambda packet: False) -> None:
        super().__init__()
        self.packets: list[av.Packet] = []
        self.events: list[tuple[str, int | None]] = []
        self.forward = forward

    def on_video_packet(self, packet: av.Packet) -> bool:
        self.packets.append(packet)
        self.events.append(("packet", packet.pts))
        return self.forward(packet)

    def on_frame(self, frame: av.VideoFrame) -> None:
        super().on_frame(frame)
        self.events.append(("frame", frame.pts))


async def test_video_packets_are_handed_out_before_they_are_decoded() -> None:
    spec = ClipSpec(512, 512, fps=30, frames=30, gop=10, b_frames=2, audio="opus")
    clip = make_clip(spec)
    sink = PacketSink()
    await through_memory(list(clip.segments), sink, on_video_packet=sink.on_video_packet)
    assert sink.ended and sink.pts == list(clip.video_pts)
    # Every access unit, in decode order, with its own timestamps; keyframes where the GOPs start.
    assert sorted(packet.pts or 0 for packet in sink.packets) == list(clip.video_pts)
    dts = [packet.dts or 0 for packet in sink.packets]
    assert dts == sorted(set(dts))
    assert [packet.pts for packet in sink.packets if packet.is_keyframe] == list(clip.video_pts[:: spec.gop])
    # A frame comes out only after the packet that carries it went to the hook.
    for position, (kind, pts) in enumerate(sink.events):
        if kind == "frame":
            assert ("packet", pts) in sink.events[:position]


async def test_packets_the_hook_takes_are_not_decoded() -> None:
    """Zero-transcode: the hook forwards the second GOP as it is; the decoder decodes the rest,
    starting again cleanly at the third GOP's keyframe."""
    spec = ClipSpec(512, 512, fps=30, frames=30, gop=10)
    clip = make_clip(spec)
    second_gop = set(clip.video_pts[10:20])
    sink = PacketSink(forward=lambda packet: packet.pts in second_gop)
    decoder = await through_memory(list(clip.segments), sink, on_video_packet=sink.on_video_packet)
    assert sink.ended and sink.pts == [pts for pts in clip.video_pts if pts not in second_gop]
    assert decoder.stats.forwarded == 10 and decoder.stats.frames == 20
    assert decoder.stats.corrupt_packets == decoder.stats.damaged_frames == 0


# -- damaged input -------------------------------------------------------------------------------


def truncated(data: bytes, seed: int) -> bytes:
    return data[: len(data) // 2]


def damaged_payload(data: bytes, seed: int, share: float = 0.5) -> bytes:
    """One byte flipped in every video TS packet that continues a PES, over the middle `share` of
    the segment: TS and PES headers stay intact, so every frame there decodes with errors."""
    rng = random.Random(seed)
    out = bytearray(data)
    first = int(len(data) * (1 - share) / 2) // TS_PACKET * TS_PACKET
    last = int(len(data) * (1 + share) / 2) // TS_PACKET * TS_PACKET
    for start in range(first, min(last, len(data) - TS_PACKET + 1), TS_PACKET):
        pid = (out[start + 1] & 0x1F) << 8 | out[start + 2]
        starts_pes, has_adaptation = out[start + 1] & 0x40, out[start + 3] & 0x20
        if pid == VIDEO_PID and not starts_pes and not has_adaptation:
            out[start + 4 + rng.randrange(TS_PACKET - 4)] ^= 0xFF
    return bytes(out)


def garbage_run(data: bytes, seed: int) -> bytes:
    """4000 random bytes in the middle of a segment: TS sync is lost and has to be found again."""
    middle = len(data) // 2
    return data[:middle] + random.Random(seed).randbytes(4000) + data[middle + 4000 :]


@pytest.mark.parametrize("damage", [truncated, damaged_payload, garbage_run])
@pytest.mark.parametrize("b_frames", [0, 2])
async def test_damaged_segment_is_survived(damage: Any, b_frames: int) -> None:
    spec = ClipSpec(512, 512, fps=30, frames=60, gop=15, b_frames=b_frames, audio="aac")
    clip = make_clip(spec)
    segments = list(clip.segments)
    assert len(segments) == 4
    segments[1] = damage(segments[1], b_frames)
    sink = Sink()
    decoder = await through_memory(segments, sink)

    assert sink.ended and sink.error is None and decoder.error is None
    # The segments before and after the damaged one decode completely, timestamps intact.
    shown = {frame.pts: frame.index for frame in sink.frames}
    for index in [*range(15), *range(30, 60)]:
        assert shown.get(clip.video_pts[index]) == index, f"frame {index}"
    assert sink.pts == sorted(set(sink.pts))
    stats = decoder.stats
    if damage is not garbage_run:  # a garbage run can swallow whole packets: frames go missing unseen
        assert stats.corrupt_packets + stats.damaged_frames > 0
    assert stats.frames == len(sink.frames)


async def test_too_much_damage_in_a_row_stops_the_decoder() -> None:
    clip = make_clip(ClipSpec(512, 512, fps=30, frames=60, gop=15))
    ruined = damaged_payload(clip.segments[1], seed=7, share=1.0)
    sink = Sink()
    decoder = await through_memory([clip.segments[0], ruined, *clip.segments[2:]], sink, corrupt_budget=3)
    assert isinstance(decoder.error, InputError) and sink.error is decoder.error
    assert "4 corrupt packets or damaged frames in a row" in str(decoder.error)
    assert not sink.ended
    assert decoder.stats.corrupt_packets + decoder.stats.damaged_frames == 4
    assert len(sink.frames) == 15 + 3  # the good segment, and damaged frames within the budget


# -- start and stop ------------------------------------------------------------------------------


@pytest.mark.parametrize("fed", ["half a PES", "a whole segment"])
async def test_stop_while_waiting_for_input(fed: str) -> None:
    segment = make_clip(ClipSpec()).segments[0]
    data = segment[:1000] if fed == "half a PES" else segment
    # Every put reports "full"; the writable callback then fires once the reader took everything.
    queue = ChunkQueue(1, low_water=0)
    drained = threading.Event()
    queue.set_writable_callback(drained.set)
    sink = Sink()
    decoder = sink.decoder(queue)
    decoder.start()
    try:
        assert queue.put(data)
        assert await asyncio.to_thread(drained.wait, TIMEOUT)
        if data is segment:
            await asyncio.wait_for(sink.first_frame.wait(), TIMEOUT)
    finally:
        await asyncio.to_thread(decoder.stop)
    assert not decoder.running
    assert decoder.error is None and sink.error is None and not sink.ended
    decoder.stop()  # again: nothing happens


async def test_stop_before_start() -> None:
    queue = ChunkQueue(1024)
    decoder = Sink().decoder(queue)
    decoder.stop()
    decoder.stop()
    assert queue.aborted and not decoder.running
    with pytest.raises(RuntimeError):
        decoder.start()


async def test_stop_from_on_frame_delivers_no_more_frames() -> None:
    clip = make_clip(ClipSpec())
    sink = Sink()
    stopped = asyncio.Event()

    def on_frame(frame: av.VideoFrame) -> None:
        sink.on_frame(frame)
        if len(sink.frames) == 3:
            decoder.stop()  # on the decode thread: must not join itself
            sink.loop.call_soon_threadsafe(stopped.set)

    queue = ChunkQueue(QUEUE_BYTES)
    decoder = Decoder(queue, on_frame, on_end=sink.on_end, on_error=sink.on_error, thread_count=1)
    decoder.start()
    try:
        assert not queue.put(clip.data)
        await asyncio.wait_for(stopped.wait(), TIMEOUT)
    finally:
        decoder.stop()
    assert len(sink.frames) == 3 and not sink.ended and sink.error is None


async def test_input_aborted_by_the_feeder_is_an_error() -> None:
    clip = make_clip(ClipSpec())

    async def stalled() -> AsyncIterator[AsyncIterator[bytes]]:
        yield chunks(clip.segments[0])
        await asyncio.Event().wait()  # the next segment never comes

    sink = Sink()
    queue = ChunkQueue(QUEUE_BYTES)
    decoder = sink.decoder(queue)
    decoder.start()
    try:
        feeding = asyncio.create_task(feed(stalled(), queue))
        await asyncio.wait_for(sink.first_frame.wait(), TIMEOUT)
        feeding.cancel()  # the session shuts the input down
        with pytest.raises(asyncio.CancelledError):
            await feeding
        await asyncio.wait_for(sink.done.wait(), TIMEOUT)
    finally:
        decoder.stop()
    assert isinstance(sink.error, InputError) and "aborted" in str(sink.error)


async def test_input_without_video_is_an_error() -> None:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mpegts") as muxer:
        stream = muxer.add_stream("aac", rate=48_000)
        for index in range(20):
            frame = av.AudioFrame(format="fltp", layout="stereo", samples=1024)
            for plane in frame.planes:
                plane.update(bytes(plane.buffer_size))
            frame.sample_rate, frame.pts = 48_000, index * 1024
            muxer.mux(stream.encode(frame))
        muxer.mux(stream.encode(None))
    sink = Sink()
    decoder = await through_memory([buffer.getvalue()], sink)
    assert isinstance(decoder.error, InputError) and "no video" in str(decoder.error)


async def test_stop_without_waiting_then_on_exit() -> None:
    exited = asyncio.Event()
    loop = asyncio.get_running_loop()
    queue = ChunkQueue(QUEUE_BYTES)
    sink = Sink()
    decoder = sink.decoder(queue, on_exit=lambda: loop.call_soon_threadsafe(exited.set))
    decoder.start()
    queue.put(make_clip(ClipSpec()).segments[0])  # then no more input: the thread waits for it
    await asyncio.wait_for(sink.first_frame.wait(), TIMEOUT)
    decoder.stop(wait=False)  # on the loop: ask, do not join
    await asyncio.wait_for(exited.wait(), TIMEOUT)
    decoder.stop()  # the thread is done: returns at once
    assert not decoder.running and decoder.error is None and not sink.ended


@pytest.mark.parametrize("ending", ["end", "error"])
async def test_on_exit_comes_last(ending: str) -> None:
    segment = make_clip(ClipSpec()).segments[0]
    loop = asyncio.get_running_loop()
    calls: list[str] = []
    exited = asyncio.Event()

    def on_exit() -> None:
        calls.append("exit")
        loop.call_soon_threadsafe(exited.set)

    queue = ChunkQueue(QUEUE_BYTES)
    decoder = Decoder(
        queue,
        lambda frame: None,
        on_end=lambda: calls.append("end"),
        on_error=lambda exc: calls.append("error"),
        on_exit=on_exit,
        thread_count=1,
    )
    decoder.start()
    queue.put(segment if ending == "end" else b"\x47" * 188 * 20)  # TS sync bytes, no streams
    queue.close()
    await asyncio.wait_for(exited.wait(), TIMEOUT)
    decoder.stop()
    assert calls == [ending, "exit"]


@pytest.mark.parametrize(
    "spec",
    [
        # B-frames delay the first frame: the short probe ends before AAC's parameters are known.
        ClipSpec(512, 512, fps=25, frames=25, gop=25, b_frames=2, audio="aac"),
        ClipSpec(512, 512, fps=30, frames=30, gop=15, audio="opus"),
    ],
    ids=describe,
)
async def test_audio_stream_comes_before_its_packets_ready_to_mux(spec: ClipSpec) -> None:
    clip = make_clip(spec)
    sink = Sink()
    events: list[AudioInfo | av.Packet] = []

    def on_audio(packet: av.Packet) -> None:
        events.append(packet)
        sink.on_audio(packet)

    await through_memory(list(clip.segments), sink, on_audio=on_audio, on_audio_stream=events.append)
    info, *packets = events
    assert isinstance(info, AudioInfo) and all(isinstance(packet, av.Packet) for packet in packets)
    assert len(packets) == clip.audio_packets
    assert (info.codec, info.sample_rate, info.layout) == (spec.audio, 48_000, "stereo")
    # Another thread muxes the packets with it, unchanged, into a stream a player can decode.
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mpegts") as muxer:
        stream = info.add_to(muxer)
        muxer.start_encoding()
        for packet in packets:
            assert isinstance(packet, av.Packet)
            packet.stream = stream
            muxer.mux(packet)
    with av.open(io.BytesIO(buffer.getvalue()), format="mpegts") as container:
        decoded = list(container.decode(audio=0))
    assert decoded and {(f.sample_rate, f.layout.name) for f in decoded} == {(48_000, "stereo")}


# -- frames as soon as their access unit is in ------------------------------------------------------


def video_pes_ends(data: bytes, pid: int) -> list[tuple[int, int, int]]:
    """(offset of the first TS packet, offset past the last, pts) of each PES on `pid`, in order."""
    found: list[tuple[int, int, int]] = []
    first = last = pts = -1
    for at in range(0, len(data) - TS_PACKET + 1, TS_PACKET):
        if (data[at + 1] & 0x1F) << 8 | data[at + 2] != pid:
            continue
        if data[at + 1] & 0x40:
            if first >= 0:
                found.append((first, last + TS_PACKET, pts))
            first = at
            header = at + 4 + (data[at + 4] + 1 if data[at + 3] & 0x20 else 0)
            h = data[header + 9 : header + 14]
            pts = (h[0] >> 1 & 7) << 30 | h[1] << 22 | (h[2] >> 1) << 15 | h[3] << 7 | h[4] >> 1
        last = at
    found.append((first, last + TS_PACKET, pts))
    return found


def feed_stepwise(data: bytes, step: int, **kwargs: Any) -> tuple[dict[int, int], Decoder]:
    """Feed `data` `step` bytes at a time, each taken and processed before the next: the bytes fed
    when each frame (by pts) came out."""
    queue = ChunkQueue(1 << 24)
    fed = 0
    out: dict[int, int] = {}
    done = threading.Event()

    def on_frame(frame: av.VideoFrame) -> None:
        assert frame.pts is not None
        out[frame.pts] = fed

    decoder = Decoder(queue, on_frame, thread_count=1, on_exit=done.set, **kwargs)
    decoder.start()
    try:
        for offset in range(0, len(data), step):
            queue.put(data[offset : offset + step])
            fed = min(offset + step, len(data))
            deadline = time.monotonic() + TIMEOUT
            while not (queue.size == 0 and queue.waiting):  # the thread has done all it could
                assert time.monotonic() < deadline
                time.sleep(0.0001)
        queue.close()
        assert done.wait(TIMEOUT)
    finally:
        decoder.stop()
    return out, decoder


@pytest.mark.parametrize(
    "spec",
    [
        ClipSpec(512, 512, fps=30, frames=30, gop=15),
        ClipSpec(1280, 720, fps=30, frames=20, gop=10, audio="aac"),
    ],
    ids=describe,
)
def test_each_frame_leaves_with_the_ts_packet_that_completes_it(spec: ClipSpec) -> None:
    """Fed one TS packet at a time: frame k is out before a byte of frame k + 1's PES is in (it was
    a frame interval later through libavformat, which waits for the next PES to start)."""
    data = make_clip(spec).data
    out, decoder = feed_stepwise(data, TS_PACKET, on_audio=lambda packet: None)
    assert decoder.error is None and decoder.stats.video_demuxer == "split"
    video = video_pes_ends(data, VIDEO_PID)
    audio = video_pes_ends(data, VIDEO_PID + 1) if spec.audio else []
    assert sorted(out) == [pts for _, _, pts in video]
    for index, (_, end, pts) in enumerate(video):
        if index == 0 and audio:
            # The first frame waits for the audio stream's parameters: the first audio packet.
            end = max(end, audio[0][1])
        following = video[index + 1][0] + TS_PACKET if index + 1 < len(video) else len(data)
        # At its own end; at the next PES's first packet only for a PES whose last packet is full.
        assert out[pts] in (end, following), f"frame {index}"
    late = sum(out[pts] != end for _, end, pts in video[1:])
    assert late <= 1


async def test_audio_and_video_come_in_input_order() -> None:
    """Big chunks: a frame whose last byte follows an audio packet's comes after it, although the
    splitter saw the whole chunk first. And the audio stream comes before the first frame."""
    spec = ClipSpec(1280, 720, fps=30, frames=30, gop=15, audio="aac")
    clip = make_clip(spec)
    ends = {("video", pts): end for _, end, pts in video_pes_ends(clip.data, VIDEO_PID)}
    ends |= {("audio", pts): end for _, end, pts in video_pes_ends(clip.data, VIDEO_PID + 1)}
    events: list[tuple[str, int]] = []
    sink = PacketSink()

    def on_video_packet(packet: av.Packet) -> None:
        assert packet.pts is not None and packet.time_base == CLOCK
        events.append(("video", packet.pts))

    def on_audio(packet: av.Packet) -> None:
        sink.on_audio(packet)
        assert packet.pts is not None
        events.append(("audio", packet.pts))

    def on_audio_stream(info: AudioInfo) -> None:
        events.append(("stream", 0))

    await through_memory(
        list(clip.segments),
        sink,
        on_video_packet=on_video_packet,
        on_audio=on_audio,
        on_audio_stream=on_audio_stream,
    )
    assert sink.ended and sink.pts == list(clip.video_pts)
    # The first frame waited for the audio stream: it comes first, before any packet.
    assert events[0] == ("stream", 0) and ("stream", 0) not in events[1:]
    packets = events[1:]
    first_audio = next(event for event in packets if event[0] == "audio")
    held = [event for event in packets if event[0] == "video" and ends[event] < ends[first_audio]]
    assert packets[: len(held) + 1] == [first_audio, *held]
    # From then on, each packet when its last byte is in: input order.
    rest = [ends[event] for event in packets[len(held) + 1 :]]
    assert rest == sorted(rest) and len(rest) == len(ends) - len(held) - 1


def without_pid(data: bytes, pid: int) -> bytes:
    return b"".join(
        data[at : at + TS_PACKET]
        for at in range(0, len(data), TS_PACKET)
        if (data[at + 1] & 0x1F) << 8 | data[at + 2] != pid
    )


async def test_audio_listed_but_never_sent_holds_the_first_frames_briefly() -> None:
    spec = ClipSpec(512, 512, fps=30, frames=45, gop=15, audio="aac")
    clip = make_clip(spec)
    silent = [without_pid(segment, VIDEO_PID + 1) for segment in clip.segments]
    sink = Sink()
    decoder = await through_memory(silent, sink)
    assert sink.ended and sink.pts == list(clip.video_pts) and not sink.audio_pts
    assert decoder.audio_stream_info is None


@pytest.mark.parametrize("audio", ["none in the input", "nobody takes it"])
async def test_video_alone_needs_no_libavformat(audio: str, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = ClipSpec(
        512, 512, fps=30, frames=30, gop=15, audio=None if audio == "none in the input" else "aac"
    )
    clip = make_clip(spec)

    def no_open(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("libavformat opened")

    monkeypatch.setattr(av, "open", no_open)
    sink = Sink()
    decoder = await through_memory(list(clip.segments), sink, on_audio=None)
    assert sink.ended and decoder.error is None
    assert sink.pts == list(clip.video_pts) and [clip.video_pts[f.index] for f in sink.frames] == sink.pts
    assert decoder.stats.bytes_read == len(clip.data) and decoder.stats.decode_seconds > 0


def mpeg2_clip(frames: int = 20) -> tuple[bytes, list[int]]:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mpegts") as muxer:
        stream = muxer.add_stream("mpeg2video", rate=30)
        stream.width, stream.height, stream.pix_fmt = 256, 256, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 30)
        for index in range(frames):
            frame = pattern(256, 256, index)
            frame.pts = index
            muxer.mux(stream.encode(frame))
        muxer.mux(stream.encode(None))
    with av.open(io.BytesIO(buffer.getvalue()), format="mpegts") as container:
        pts = sorted(frame.pts for frame in container.decode(video=0))
    return buffer.getvalue(), pts


async def test_other_video_codecs_go_through_libavformat() -> None:
    data, pts = mpeg2_clip()
    sink = Sink()
    decoder = await through_memory([data], sink)
    assert sink.ended and decoder.error is None
    assert sink.pts == pts and [frame.index for frame in sink.frames] == list(range(len(pts)))
    assert (decoder.stats.video_demuxer, decoder.stats.codec) == ("libavformat", "mpeg2video")
    assert decoder.splitter_stats is None


async def test_a_lost_ts_packet_drops_its_frame_and_is_counted() -> None:
    spec = ClipSpec(512, 512, fps=30, frames=60, gop=15, audio="aac")
    clip = make_clip(spec)
    segments = list(clip.segments)
    video = video_pes_ends(segments[1], VIDEO_PID)
    first, end, lost_pts = video[5]
    assert end - first > 4 * TS_PACKET
    middle = first + 2 * TS_PACKET
    while (segments[1][middle + 1] & 0x1F) << 8 | segments[1][middle + 2] != VIDEO_PID:
        middle += TS_PACKET
    segments[1] = segments[1][:middle] + segments[1][middle + TS_PACKET :]
    sink = Sink()
    decoder = await through_memory(segments, sink)
    assert sink.ended and decoder.error is None
    shown = {frame.pts: frame.index for frame in sink.frames}
    assert lost_pts not in shown
    assert lost_pts == clip.video_pts[20]
    # Frames 21-29 refer to it (damaged or not, as the decoder conceals); the rest are intact.
    for index in [*range(20), *range(30, 60)]:
        assert shown.get(clip.video_pts[index]) == index, f"frame {index}"
    assert decoder.stats.corrupt_packets >= 1
    assert decoder.splitter_stats is not None and decoder.splitter_stats.damaged == 1


@pytest.mark.parametrize("audio", [None, "aac"])
async def test_an_error_in_a_callback_inside_the_demuxer_is_the_decoders_error(
    audio: str | None, capfd: pytest.CaptureFixture[str]
) -> None:
    """on_frame runs inside libavformat's read callback now: what it raises still ends the run."""
    clip = make_clip(ClipSpec(512, 512, fps=30, frames=30, gop=15, audio=audio))  # type: ignore[arg-type]
    sink = Sink()
    boom = RuntimeError("boom")

    def on_frame(frame: av.VideoFrame) -> None:
        sink.on_frame(frame)
        if len(sink.frames) == 3:
            raise boom

    queue = ChunkQueue(QUEUE_BYTES)
    decoder = Decoder(
        queue, on_frame, on_audio=sink.on_audio, on_end=sink.on_end, on_error=sink.on_error, thread_count=1
    )
    decoder.start()
    try:
        await asyncio.wait_for(feed(memory_subscriber(clip.segments), queue), TIMEOUT)
        await asyncio.wait_for(sink.done.wait(), TIMEOUT)
    finally:
        decoder.stop()
    assert decoder.error is boom and sink.error is boom and not sink.ended
    assert len(sink.frames) == 3
    assert "exception being dropped" not in capfd.readouterr().err
