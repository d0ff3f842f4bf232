"""The session timeline against input as it really arrives: made by the ffmpeg CLI, written live at
its decode times, a session started before it exists or joining mid-segment, bytes in bursts.

Every figure is over the whole session from the relay's start, nothing left out for settling: the
frames lost are the input frames written after the start (all of them, for a session started
before its input) that no output frame shows (by the index drawn in its pixels); the output is
read as its readers read it (ffmpeg -v error, DTS order, A/V offset at every flash and beep).
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from fractions import Fraction

import pytest

from bench.liveinput import FFMPEG, Figures, InputSpec, LiveInput, Probe, make_input
from relay_server.backoff import Backoff
from relay_server.media.timeline import LATENCY_BUDGET
from relay_server.processor import Knobs, ProcessorServer
from relay_server.session.paths import TOO_SLOW, VideoMode
from relay_server.session.relay import Relay, RelayStats
from relay_server.trickle import Publisher
from relay_server.trickle.server import TrickleServer
from relay_server.webrtc import LinkSettings

pytestmark = pytest.mark.skipif(FFMPEG is None, reason="the ffmpeg CLI is not installed")

SIZE = 512
AV_TOLERANCE = 0.025  # seconds: about one audio frame
MODES = [VideoMode.TRANSCODE, VideoMode.AUTO]


@pytest.fixture(scope="session")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Callable[[InputSpec], LiveInput]:
    directory = tmp_path_factory.mktemp("inputs")
    return lambda spec: LiveInput(make_input(spec, directory), spec)


@dataclass
class Run:
    figures: Figures
    stats: RelayStats
    started: float  # when the relay started
    live: LiveInput
    output: bytes  # the output channel's bytes, from its first segment

    @property
    def published(self) -> list[int]:
        """Input frames written while the relay ran, in index order."""
        return sorted(index for index, at in self.live.sent.items() if at >= self.started)

    @property
    def lost(self) -> list[int]:
        return self.figures.lost(self.published)

    def latencies(self, since: int = 0) -> list[float]:
        """Input frame written → output frame arrived, per input frame from index `since` in
        output order (its first showing: a repeat filling a gap is no later arrival of it)."""
        sent, figures = self.live.sent, self.figures
        first: dict[int, float] = {}
        for index, arrival in zip(figures.indices, figures.arrivals, strict=True):
            if index >= since and index in sent and arrival == arrival:
                first.setdefault(index, arrival - sent[index])
        return list(first.values())

    def summary(self) -> str:
        latencies = sorted(self.latencies())
        quantile = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]  # noqa: E731
        return (
            f"{self.live.spec.name}: {len(self.lost)} lost of {len(self.published)} {self.lost[:10]};"
            f" latency p50 {quantile(0.5) * 1000:.0f} ms p99 {quantile(0.99) * 1000:.0f} ms;"
            f" A/V {[round(o * 1000) for o in self.figures.av_offsets]} ms; drops"
            f" { {k: v for k, v in self.stats.drops.items() if v} }; paths {self.stats.paths.send}"
            f"/{self.stats.paths.output}"
        )

    def check_output(self, markers: bool = True, audio_on_time: bool = True) -> None:
        """What readers need of the output; `markers`: A/V in sync at every flash and beep (a
        session sending only some frames may send no flash); `audio_on_time`: its audio written
        no further behind its video than the input's (not where the input itself held audio back)."""
        figures = self.figures
        assert figures.ffmpeg_errors == "", figures.ffmpeg_errors
        assert figures.dts_increasing and figures.audio_pts_increasing
        assert figures.pts == sorted(set(figures.pts))
        offsets = figures.av_offsets
        if markers and self.live.spec.audio is not None:
            # Every flash has its beep, but maybe the first: the output's audio begins with the
            # first whole audio packet after its first video frame.
            assert len(offsets) >= len(figures.markers) - 1 >= 2, figures.markers
            assert max(abs(offset) for offset in offsets) <= AV_TOLERANCE, offsets
        if self.live.spec.audio is not None:
            # The audio goes on as far as the input's, on the timeline of the last input frame
            # out (a stall begins a new one): its last packet too, which no next packet follows.
            live = self.live
            first_shown = dict(reversed(list(zip(figures.indices, figures.pts, strict=True))))
            last = max(first_shown)  # repeats of it come after its first showing
            offset = (first_shown[last] - live.presentation[last]) / 90_000
            assert figures.audio_end is not None and live.audio_end is not None
            assert abs(figures.audio_end - offset - live.audio_end) <= AV_TOLERANCE, (
                figures.audio_end - offset,
                live.audio_end,
            )
            # A reader waits no longer for the sound to a picture than with the input, give or
            # take a frame: the audio goes frame by frame as the video reaches it.
            allowance = live.audio_behind + 1 / live.spec.rate
            assert figures.audio_behind <= allowance or not audio_on_time, (
                figures.audio_behind,
                live.audio_behind,
            )


@dataclass
class Scene:
    """A relay between channels "in" and "out" through the embedded processor."""

    relay: Relay
    source: Publisher
    processor: ProcessorServer
    runs: list[Run]  # the run, once the scene has ended

    async def restart_processor(self, down: float) -> None:
        """The processor killed, and back on its port `down` seconds later."""
        knobs, port = self.processor.pipeline.knobs, self.processor.port
        await self.processor.stop()
        await asyncio.sleep(down)  # the scenario: how long it is away
        self.processor = ProcessorServer(port=port, knobs=knobs)
        await self.processor.start()


@contextlib.asynccontextmanager
async def relay_for(
    server: TrickleServer, live: LiveInput, *, knobs: Knobs | None = None, **options: object
) -> AsyncIterator[Scene]:
    """A relay from channel "in" to "out" through the embedded processor, the output probed; on
    exit the input channel is closed and the run's figures computed."""
    source = Publisher(server.channel_url("in"))
    output = Publisher(server.channel_url("out"))
    await output.create_channel()
    probe = Probe(server.channel_url("out"), live.code)
    processor = ProcessorServer(knobs=knobs or Knobs())
    await processor.start()
    relay = Relay(
        server.channel_url("in"),
        output,
        processor.url,
        width=SIZE,
        height=SIZE,
        **options,  # type: ignore[arg-type]
    )
    scene = Scene(relay, source, processor, [])
    running = asyncio.create_task(relay.run())
    started = time.monotonic()
    try:
        yield scene
        await source.close()  # the input ends: so does the relay, once its last frames are back
        await asyncio.wait_for(asyncio.shield(running), 30)
    finally:
        await relay.stop()
        await asyncio.gather(running, return_exceptions=True)
        await output.close()
        with contextlib.suppress(TimeoutError):
            await probe.ended()
        await probe.close()
        await scene.processor.stop()
    run = Run(probe.figures, relay.stats, started, live, bytes(probe.data))
    print(run.summary())  # the figures, for a person reading the test's output
    scene.runs.append(run)


async def relayed(
    server: TrickleServer,
    live: LiveInput,
    publish: Callable[[Publisher], Awaitable[None]],
    **options: object,
) -> Run:
    async with relay_for(server, live, **options) as scene:
        await publish(scene.source)
    return scene.runs[0]


# -- a session started before its input exists ------------------------------------------------------


@pytest.mark.parametrize("mode", MODES, ids=lambda mode: mode.value)
async def test_a_session_started_before_its_input_loses_nothing(
    trickle_server: TrickleServer, inputs: Callable[[InputSpec], LiveInput], mode: VideoMode
) -> None:
    live = inputs(InputSpec(seconds=20.0, gop=2.0))

    async def later(source: Publisher) -> None:
        await asyncio.sleep(5.0)  # the scenario: Livepeer starts the job, then the stream
        await live.publish(source)

    run = await relayed(trickle_server, live, later, video_mode=mode)
    assert len(run.published) == live.spec.frames
    assert len(run.lost) <= 3, run.lost
    assert run.stats.link.losses == 0 and run.stats.link.connections == 1
    first_input = min(live.sent.values())
    assert run.figures.arrivals[0] - first_input <= 1.0
    run.check_output()


# -- a session joining a live input mid-segment ---------------------------------------------------


@pytest.mark.parametrize("mode", MODES, ids=lambda mode: mode.value)
async def test_a_session_joining_mid_segment_skips_the_backlog_and_loses_nothing_after(
    trickle_server: TrickleServer, inputs: Callable[[InputSpec], LiveInput], mode: VideoMode
) -> None:
    live = inputs(InputSpec(seconds=10.0, gop=2.0))
    source = Publisher(trickle_server.channel_url("in"))
    publishing = asyncio.create_task(live.publish(source))
    try:
        # The input is live 3 s before the relay starts: 1 s into its second GOP.
        await asyncio.wait_for(live.until_sent(3 * 30), 10)
        async with relay_for(trickle_server, live, video_mode=mode) as scene:
            await asyncio.shield(publishing)
    finally:
        publishing.cancel()
        await asyncio.gather(publishing, return_exceptions=True)
        await source.close()
    run = scene.runs[0]
    assert len(run.lost) <= 3, run.lost
    assert run.stats.timeline.join_skipped + run.stats.decoder.forwarded > 0
    latencies = run.latencies()
    steady = statistics.median(latencies[len(latencies) // 2 :])
    assert latencies[9] <= 1.5 * steady, (latencies[:12], steady)
    run.check_output()


# -- inputs as encoders make them -----------------------------------------------------------------

ENCODERS = {
    "720p60-main-bframes-aac": InputSpec(1280, 720, Fraction(60), 8.0, 2.0, 3, "main", "aac"),
    "1080p-high-bframes-opus": InputSpec(1920, 1080, Fraction(30), 8.0, 2.0, 3, "high", "opus"),
    "29.97": InputSpec(1280, 720, Fraction(30000, 1001), 8.0, 2.0, 2, "high", "aac"),
    "vfr": InputSpec(640, 480, Fraction(30), 8.0, 2.0, 0, "high", "aac", variable=True),
    "720p60-silent": InputSpec(1280, 720, Fraction(60), 8.0, 2.0, 3, "main", None),
    # MP2: what ffmpeg's MPEG-TS muxer takes when no audio codec is named; AC-3: broadcast's.
    "25fps-mp2": InputSpec(1280, 720, Fraction(25), 8.0, 2.0, 3, "high", "mp2"),
    "50fps-ac3": InputSpec(960, 540, Fraction(50), 8.0, 2.0, 3, "high", "ac3"),
    # The 33-bit timestamps wrap 2.3 s in (an input live for 26.5 hours).
    "pts-wrap": InputSpec(640, 360, Fraction(30), 8.0, 2.0, 2, "high", "aac", ts_offset=95_440.0),
    "10-bit": InputSpec(1280, 720, Fraction(30), 8.0, 2.0, 2, "high10", "aac", pix_fmt="yuv420p10le"),
    "1080i": InputSpec(1920, 1080, Fraction(30000, 1001), 8.0, 2.0, 2, "high", "aac", interlaced=True),
    "hevc": InputSpec(1280, 720, Fraction(30), 8.0, 2.0, 3, "main", "aac", codec="libx265"),
}


@pytest.mark.parametrize("name", list(ENCODERS))
async def test_ffmpeg_inputs_go_through_whole_and_in_sync(
    trickle_server: TrickleServer, inputs: Callable[[InputSpec], LiveInput], name: str
) -> None:
    live = inputs(ENCODERS[name])
    run = await relayed(trickle_server, live, live.publish, video_mode=VideoMode.AUTO)
    assert len(run.lost) <= 0.01 * len(run.published), run.lost
    run.check_output()


# -- bytes that arrive in bursts --------------------------------------------------------------------


@pytest.mark.parametrize("burst", [3, 5])
async def test_input_in_bursts_is_smoothed_not_thinned(
    trickle_server: TrickleServer, inputs: Callable[[InputSpec], LiveInput], burst: int
) -> None:
    live = inputs(InputSpec(seconds=8.0, gop=2.0))

    async def bursts(source: Publisher) -> None:
        await live.publish(source, burst=burst)

    run = await relayed(trickle_server, live, bursts, video_mode=VideoMode.TRANSCODE)
    assert len(run.lost) <= 0.01 * len(run.published), run.lost
    run.check_output()


# -- stalls, a processor restarted, a slow processor --------------------------------------------------

RECONNECT = LinkSettings(reconnect=Backoff(initial=0.25, factor=1.0, maximum=0.25, attempts=1000, jitter=0.0))


def resumed_whole(run: Run, at: int) -> None:
    """Every frame from input frame `at` on is in the output, each once, in order, after the
    repeats that filled the gap: the output resumed with the first frame that came back."""
    indices = run.figures.indices
    assert at in indices, indices
    after = indices[indices.index(at) :]
    assert after == sorted(set(after)) and after[-1] == run.live.spec.frames - 1


@pytest.mark.parametrize("mode", MODES, ids=lambda mode: mode.value)
async def test_an_input_stall_of_8_s_then_the_output_resumes_in_sync(
    trickle_server: TrickleServer, inputs: Callable[[InputSpec], LiveInput], mode: VideoMode
) -> None:
    live = inputs(InputSpec(seconds=6.0, gop=1.0))

    async def stalling(source: Publisher) -> None:
        await live.publish(source, stall=(3.0, 8.0))  # the timestamps go on where they stopped

    run = await relayed(trickle_server, live, stalling, video_mode=mode, link=RECONNECT)
    assert len(run.lost) <= 0.01 * len(run.published), run.lost
    assert run.stats.frames_filled > 0  # the output repeated its last picture meanwhile
    assert run.stats.link.losses == 0  # the processor was kept fed: its watchdog never fired
    resumed_whole(run, 90)
    # The first frame after the stall is out as soon as any: no later than 100 ms past the rest.
    assert run.latencies(since=90)[0] <= statistics.median(run.latencies()) + 0.1
    # The input's audio PES come after the video beside them (its muxer writes each once full),
    # so the stall holds the last ones before it back 8 s at the source: they come that late.
    run.check_output(audio_on_time=False)


@pytest.mark.parametrize("mode", MODES, ids=lambda mode: mode.value)
async def test_a_processor_killed_and_restarted_and_the_output_resumes_in_sync(
    trickle_server: TrickleServer, inputs: Callable[[InputSpec], LiveInput], mode: VideoMode
) -> None:
    live = inputs(InputSpec(seconds=8.0, gop=1.0))
    async with relay_for(trickle_server, live, video_mode=mode, link=RECONNECT) as scene:
        publishing = asyncio.create_task(live.publish(scene.source))
        await asyncio.wait_for(live.until_sent(90), 10)
        await scene.restart_processor(down=1.0)
        await publishing
    run = scene.runs[0]
    assert run.stats.link.losses == 1 and run.stats.link.connections == 2
    assert run.stats.frames_filled > 0
    # Frames written while the processor was away are lost (fills took their place); from the
    # first one the new connection sent, every frame is in the output.
    first_back = next(index for index in run.figures.indices if index > 90 + 30)
    resumed_whole(run, first_back)
    run.check_output()


@pytest.mark.parametrize("mode", list(VideoMode), ids=lambda mode: mode.value)
async def test_a_slow_processor_gets_what_it_takes_and_the_rest_is_counted_late(
    trickle_server: TrickleServer, inputs: Callable[[InputSpec], LiveInput], mode: VideoMode
) -> None:
    """A processor that takes 10 frames a second, FIFO like ComfyStream: the relay sends what it
    takes and lets the rest go as late, counted, judging a frame by when it would come back (the
    frames at the processor before it, at its pace); no queue grows. Forwarded, the input can only
    be thinned by whole GOP tails (passthrough), and auto decodes it from the next keyframe."""
    live = inputs(InputSpec(seconds=8.0, gop=2.0))
    budget = 0.3
    run = await relayed(
        trickle_server,
        live,
        live.publish,
        knobs=Knobs(max_fps=10, queue=16),
        video_mode=mode,
        latency_budget=budget,
    )
    stats = run.stats
    assert stats.drops["late"] > 0.5 * len(run.published)
    assert stats.drops["input_units"] == stats.drops["input_overflow"] == 0  # no queue overflowed
    sent_in_time = stats.link.send.frames - stats.link.send.repeated
    assert sent_in_time + stats.drops["late"] >= len(run.published) - 1
    assert stats.paths.send == ("forward" if mode is VideoMode.PASSTHROUGH else "encode")
    if mode is VideoMode.AUTO:
        assert stats.paths.send_reason == TOO_SLOW and stats.paths.switches == 1
    # Latency: the budget, and a frame's time at the processor (0.1 s), with room for a busy
    # machine, over the whole session: also its first frames, judged by the first round trip
    # until the processor's pace shows, and the last unit sent of a GOP whose tail went late
    # (it waited in the processor's jitter buffer, which lets a frame go when the next one
    # starts, until the last keyframe went again half a second later, and in our muxer until
    # the next frame came).
    latencies = sorted(run.latencies())
    assert latencies[len(latencies) // 2] <= budget + 0.1 + 0.05, latencies
    assert latencies[-1] <= budget + 0.1 + 0.15, latencies[-10:]
    assert all(depth.depth <= depth.capacity for depth in stats.queues)
    run.check_output(markers=False)


# -- a session resized mid-stream ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES, ids=lambda mode: mode.value)
async def test_a_session_resized_mid_stream_goes_on_at_the_new_size_whole_and_in_sync(
    trickle_server: TrickleServer, inputs: Callable[[InputSpec], LiveInput], mode: VideoMode
) -> None:
    live = inputs(InputSpec(seconds=6.0, gop=1.0))
    async with relay_for(trickle_server, live, video_mode=mode) as scene:
        publishing = asyncio.create_task(live.publish(scene.source))
        await asyncio.wait_for(live.until_sent(75), 10)
        scene.relay.resize(640, 360)
        await publishing
    run = scene.runs[0]
    sizes = run.figures.sizes
    assert sizes[0] == (SIZE, SIZE) and sizes[-1] == (640, 360)
    changed = sizes.index((640, 360))
    assert set(sizes[changed:]) == {(640, 360)}  # once, for good
    assert len(run.lost) <= 1, run.lost
    assert run.stats.timeline.epochs == 1  # the timeline went on
    run.check_output()


# -- a lossy link to the processor ----------------------------------------------------------------


@pytest.mark.parametrize("loss", [0.01, 0.03], ids=lambda loss: f"{loss:.0%}")
@pytest.mark.parametrize("mode", MODES, ids=lambda mode: mode.value)
async def test_packets_lost_on_the_processor_link_come_again_within_the_budget(
    trickle_server: TrickleServer, inputs: Callable[[InputSpec], LiveInput], mode: VideoMode, loss: float
) -> None:
    """The processor on another machine, the network between losing `loss` of the RTP packets
    each way (the embedded processor drops them). A lost packet comes again (NACK; asked again,
    or sent again, where the processor's stock receiver asks once and stalls): no more frames
    lost than packets, no reconnect, the latency's p99 within the budget. The processor queues
    its input as ComfyStream does: a frame held for a retransmission comes out with the next one,
    and one that keeps only its newest frame would drop it (that is its choice, not a loss)."""
    live = inputs(InputSpec(seconds=10.0, gop=2.0))
    async with relay_for(trickle_server, live, knobs=Knobs(loss=loss, queue=16), video_mode=mode) as scene:
        await live.publish(scene.source)
        lossy = [peer.lossy for peer in scene.processor.peers if peer.lossy is not None]
    run = scene.runs[0]
    assert sum(link.dropped_sent for link in lossy) > 0 and sum(link.dropped_received for link in lossy) > 0
    assert len(run.lost) <= loss * len(run.published), run.lost
    assert run.stats.link.losses == 0
    latencies = sorted(run.latencies())
    assert latencies[int(0.99 * len(latencies))] <= LATENCY_BUDGET, latencies[-10:]
    run.check_output()
