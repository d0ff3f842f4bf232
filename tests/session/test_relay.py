"""Relay: input channel → processor over WebRTC → output channel, with real peers on loopback.

The source is the live test pattern (1280×720, streamed segment by segment in real time); the
relay letterboxes it to 512×512, so the output's top rows are a letterbox bar: black through a
passthrough processor, near white through an "invert" one.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import av
import numpy as np
import pytest

from relay_server.backoff import Backoff
from relay_server.media.testsource import publish_pattern
from relay_server.processor import Knobs, ProcessorServer
from relay_server.session.paths import VideoMode
from relay_server.session.relay import FillMode, Relay, RelayStats
from relay_server.trickle import Publisher, Subscriber
from relay_server.trickle.server import TrickleServer
from relay_server.webrtc import LinkError, LinkSettings, LinkState
from tests.media.clips import Clip, ClipSpec, make_clip, read_index

INVERT = [{"1": {"class_type": "Invert", "inputs": {}}}]
SIZE = 512
BAR_ROWS = 100  # 1280×720 letterboxed into 512×512 leaves 112 rows of bar at the top
OUR_THREADS = ("decoder", "output-encode", "send-encode")
# Reconnect after half a second: an outage longer than the relay's fill_after, however quickly
# the processor is back.
RECONNECT = LinkSettings(reconnect=Backoff(initial=0.5, factor=1.0, maximum=0.5, attempts=1000, jitter=0.0))


@dataclass
class Output:
    """What the relay published, segment by segment, with a wake-up per finished segment."""

    segments: list[bytes] = field(default_factory=list)
    arrived: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def wait_for(self, count: int, within: float = 20) -> None:
        async with asyncio.timeout(within), self.arrived:
            await self.arrived.wait_for(lambda: len(self.segments) >= count)

    def frames(self) -> list[av.VideoFrame]:
        with av.open(io.BytesIO(b"".join(self.segments)), format="mpegts") as container:
            return list(container.decode(video=0))


@dataclass
class Session:
    server: TrickleServer
    source: Publisher
    output: Output
    relay: Relay
    states: asyncio.Queue[tuple[LinkState, str]]

    async def until_state(self, state: LinkState, within: float = 20) -> str:
        async with asyncio.timeout(within):
            while True:
                seen, reason = await self.states.get()
                if seen is state:
                    return reason


@contextlib.asynccontextmanager
async def session(
    server: TrickleServer, processor_url: str, *, prompts: object = None, **options: object
) -> AsyncIterator[Session]:
    """A relay between two fresh channels, its output collected; stopped and checked at exit."""
    source = Publisher(server.channel_url("in"))
    await source.create_channel()
    output_publisher = Publisher(server.channel_url("out"))
    await output_publisher.create_channel()
    states: asyncio.Queue[tuple[LinkState, str]] = asyncio.Queue()
    relay = Relay(
        server.channel_url("in"),
        output_publisher,
        processor_url,
        width=SIZE,
        height=SIZE,
        prompts=prompts,  # type: ignore[arg-type]
        on_link_state=lambda state, reason: states.put_nowait((state, reason)),
        **options,  # type: ignore[arg-type]
    )
    output = Output()

    async def collect() -> None:
        async with Subscriber(server.channel_url("out"), start_seq=0, startup_grace=30) as subscriber:
            async for segment in subscriber:
                data = b"".join([chunk async for chunk in segment])
                async with output.arrived:
                    output.segments.append(data)
                    output.arrived.notify_all()

    collecting = asyncio.create_task(collect())
    running = asyncio.create_task(relay.run())
    try:
        yield Session(server, source, output, relay, states)
    finally:
        await source.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(running), 30)
        await relay.stop()
        await output_publisher.close()  # DELETE: the collector sees the end of the stream
        await asyncio.wait_for(collecting, 10)
    assert running.done()
    assert not [t.name for t in threading.enumerate() if t.name.startswith(OUR_THREADS)]


def top_bar_luma(frame: av.VideoFrame) -> float:
    return float(frame.to_ndarray(format="gray")[:BAR_ROWS].mean())


@pytest.mark.parametrize(("prompts", "bar"), [(INVERT, "white"), (None, "black")])
async def test_frames_go_through_the_processor_to_the_output(
    trickle_server: TrickleServer, prompts: object, bar: str
) -> None:
    async with ProcessorServer() as processor, session(trickle_server, processor.url, prompts=prompts) as s:
        await publish_pattern(s.source, 1280, 720, frames=60)
        await s.source.close()
    frames = s.output.frames()
    stats = s.relay.stats
    assert stats.frames_decoded == 60
    assert stats.link.connections == 1 and stats.link.losses == 0
    # Every frame is in the output or counted where it went: latest-wins hand-offs let frames go
    # when a stage falls behind (a loaded machine), and the processor's jitter buffer (aiortc's)
    # may keep the very last one.
    dropped = sum(count for reason, count in stats.drops.items() if reason != "audio_not_carried")
    assert 60 - dropped - 2 <= len(frames) <= 60
    assert len(frames) >= 30
    assert {(f.width, f.height) for f in frames} == {(SIZE, SIZE)}
    luma = np.array([top_bar_luma(f) for f in frames])
    assert (luma > 200).all() if bar == "white" else (luma < 40).all()
    pts = [f.pts for f in frames]
    assert all(b > a for a, b in itertools.pairwise(pts))
    # The round trip was measured, and is what a loopback round trip is, not seconds.
    assert 0 < stats.link.latency_p50 < 0.5
    for data in s.output.segments:  # every output segment starts on a keyframe and decodes alone
        with av.open(io.BytesIO(data), format="mpegts") as container:
            packets = [p for p in container.demux(video=0) if p.size]
            assert packets[0].is_keyframe


@pytest.mark.parametrize("fill", [FillMode.REPEAT, FillMode.HOLD])
@pytest.mark.parametrize("video_mode", [VideoMode.TRANSCODE, VideoMode.AUTO])
async def test_a_restarted_processor_brings_the_session_back(
    trickle_server: TrickleServer, fill: FillMode, video_mode: VideoMode
) -> None:
    """AUTO on this input (not the session's size) encodes the send leg and remuxes the output:
    the fill then repeats the processor's last picture, decoded when the gap began."""
    processor = ProcessorServer()
    await processor.start()
    port = processor.port
    publishing: asyncio.Task[int] | None = None
    try:
        options = {"fill": fill, "link": RECONNECT, "video_mode": video_mode}
        async with session(trickle_server, processor.url, prompts=INVERT, **options) as s:
            publishing = asyncio.create_task(publish_pattern(s.source, 1280, 720))
            await s.until_state(LinkState.CONNECTED)
            await s.output.wait_for(1)
            await processor.stop()
            reason = await s.until_state(LinkState.RECONNECTING)
            assert reason
            processor = ProcessorServer(port=port)
            await processor.start()
            await s.until_state(LinkState.CONNECTED)
            after = len(s.output.segments)
            await s.output.wait_for(after + 2)
            publishing.cancel()
            stats = s.relay.stats
    finally:
        if publishing is not None:
            publishing.cancel()
            await asyncio.gather(publishing, return_exceptions=True)
        await processor.stop()
    assert stats.link.losses >= 1 and stats.link.connections >= 2
    assert stats.paths.output == ("remux" if video_mode is VideoMode.AUTO else "encode")
    frames = s.output.frames()
    gaps = np.diff([f.pts for f in frames]) / 90_000
    assert (gaps > 0).all()
    # Prompts survive the reconnection: the output is still inverted after it.
    assert top_bar_luma(frames[-1]) > 200
    # Every frame on the input's 30 fps grid: returned frames at their input frame's media
    # time, repeats on the slots after the last frame output.
    assert np.allclose(gaps * 30, np.round(gaps * 30), atol=0.05), gaps
    if fill is FillMode.REPEAT:
        assert stats.frames_filled > 0
        assert gaps.max() < 0.5  # the timeline never stalled: repeats filled the outage
    else:
        assert stats.frames_filled == 0  # the output held: only what the processor returned


@contextlib.asynccontextmanager
async def failing_relay(trickle_server: TrickleServer, **options: object) -> AsyncIterator[Relay]:
    """A relay on a live input that the test expects to fail; every thread gone at exit."""
    source = Publisher(trickle_server.channel_url("in"))
    await source.create_channel()
    publishing = asyncio.create_task(publish_pattern(source, 1280, 720))  # the offer waits for input
    try:
        async with ProcessorServer() as processor:
            output = trickle_server.channel_url("out")
            yield Relay(source.url, output, processor.url, width=SIZE, height=SIZE, **options)  # type: ignore[arg-type]
    finally:
        publishing.cancel()
        await asyncio.gather(publishing, return_exceptions=True)
        await source.close()
    assert not [t.name for t in threading.enumerate() if t.name.startswith(OUR_THREADS)]


async def test_an_invalid_prompt_fails_the_session_with_the_processors_reason(
    trickle_server: TrickleServer,
) -> None:
    bad = [{"1": {"class_type": "NoSuchNode", "inputs": {}}}]
    async with failing_relay(trickle_server, prompts=bad) as relay:
        with pytest.raises(LinkError, match="500: the prompt names no known effect"):
            await asyncio.wait_for(relay.run(), 20)
        assert relay.link.state is LinkState.FAILED


async def publish_live(publisher: Publisher, clip: Clip, behind: float = 0.0) -> None:
    """Each segment streamed in frame-sized pieces at the clip's frame rate: a live input; its
    first `behind` seconds at once (a relay joining a live channel that far into a segment)."""
    loop = asyncio.get_running_loop()
    start, frame = loop.time() - behind, 0
    for data in clip.segments:
        async with await publisher.segment() as segment:
            pieces = clip.spec.gop
            for piece in range(pieces):
                frame += 1
                await asyncio.sleep(max(0.0, start + frame / clip.spec.fps - loop.time()))
                await segment.write(data[piece * len(data) // pieces : (piece + 1) * len(data) // pieces])


async def test_the_inputs_audio_is_carried_in_sync_with_the_returned_video(
    trickle_server: TrickleServer,
) -> None:
    clip = make_clip(ClipSpec(width=SIZE, height=SIZE, frames=90, gop=15, audio="aac"))
    async with ProcessorServer() as processor, session(trickle_server, processor.url) as s:
        await publish_live(s.source, clip)
        await s.source.close()
    audio_goes_where_its_video_does(clip, s.relay.stats, b"".join(s.output.segments))


def audio_goes_where_its_video_does(clip: Clip, stats: RelayStats, data: bytes) -> None:
    """The input's audio is in the output, each packet where the video of its media time is."""
    with av.open(io.BytesIO(data), format="mpegts") as container:
        video_out = [(read_index(f), f.pts) for f in container.decode(video=0)]
    with av.open(io.BytesIO(data), format="mpegts") as container:
        audio_out = [p.pts for p in container.demux(audio=0) if p.pts is not None]
    with av.open(io.BytesIO(clip.data), format="mpegts") as container:
        audio_in = [p.pts for p in container.demux(audio=0) if p.pts is not None]
    assert stats.audio_carried > 0.9 * clip.audio_packets
    # The output's audio begins with the first input packet the output had room for.
    skipped = stats.segmenter.audio_dropped
    assert len(audio_out) >= 0.9 * clip.audio_packets
    video_offsets = [pts - clip.video_pts[index] for index, pts in video_out]
    audio_offset = audio_out[0] - audio_in[skipped]
    # Audio lands where its video does: within a frame interval (3000 ticks at 30 fps).
    assert abs(audio_offset - float(np.median(video_offsets))) < 3000


async def test_catch_up_without_pacing_sends_every_frame_of_a_burst(
    trickle_server: TrickleServer,
) -> None:
    clip = make_clip(ClipSpec(width=SIZE, height=SIZE, frames=90, gop=30, audio="aac"))
    catch_up = LinkSettings(pace=False)
    # A processor that queues its input, as ComfyStream does (the embedded one otherwise keeps
    # only the newest frame when several arrive at once).
    fifo = ProcessorServer(knobs=Knobs(queue=16))
    async with fifo as processor, session(trickle_server, processor.url, link=catch_up) as s:
        for data in clip.segments:  # as fast as the network takes it: an input that is behind
            async with await s.source.segment() as segment:
                await segment.write(data)
        await s.source.close()
    stats = s.relay.stats
    indices = [read_index(frame) for frame in s.output.frames()]
    # Nothing decoded in vain: decoding waited for the sender, and every frame went through
    # (but the last, which the processor's jitter buffer may keep).
    assert stats.frames_decoded == 90 and stats.drops["input_overflow"] == stats.drops["output_replaced"] == 0
    assert indices == list(range(len(indices))) and len(indices) >= 89
    # Nothing on the audio's side depends on pacing: it is carried too.
    audio_goes_where_its_video_does(clip, stats, b"".join(s.output.segments))


async def test_a_failing_helper_task_ends_the_run_with_its_error(trickle_server: TrickleServer) -> None:
    """The fill and audio tasks run until the relay stops them: one that raises is no error only
    logged, it ends the run and is what run() raises."""
    async with failing_relay(trickle_server) as relay:

        async def broken() -> None:
            raise RuntimeError("the audio task broke")

        relay._audio.run = broken  # type: ignore[method-assign]
        with pytest.raises(RuntimeError, match="the audio task broke"):
            await asyncio.wait_for(relay.run(), 20)
