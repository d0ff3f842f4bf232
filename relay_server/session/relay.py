"""Relay: one session's media path, input channel → processor → output channel, on one timeline.

    subscriber ─▶ MediaInput ─▶ FrameQueue ─▶ ProcessorLink ═══ WebRTC ═══ processor
       │          (decode +     (in order)     (paced send,                  │
       │           scale thread)                our x264)                    │
       └─ arrivals ─▶ SessionTimeline ◀── media time of each returned frame ◀┘
                      (media ↔ clock)          │
    publisher ◀── OutputPipeline ◀── returned frames at media time + one offset
                  (encode thread)    (+ the last one repeated while none come)

The session timeline (media/timeline.py) is the one place timing is decided: the feed task
stamps each video frame's arrival (media/arrivals.py), which anchors the input's media time on
the clock at its live edge; the sender sends every frame in order when the timeline says it is
due, and lets go of the join backlog and of frames past the latency budget (counted). A returned
frame is matched to the frame it was made from (webrtc/roundtrip.py) and output at that frame's
media time plus one constant offset: the output has the input's frame timing, whatever the
processor's jitter, and the audio, carried unchanged, keeps its own input timestamps on the same
offset (audio.py). Output timestamps only go forward: a returned frame not after the last one
output (the processor returned a frame twice, say) is let go, counted.

When no frame comes back for `fill_after` seconds (the processor is reconnecting, or slow to
start again), the output either repeats the last good frame on the output's frame grid so that
players downstream never stall (FillMode.REPEAT, the default) or holds: nothing until frames
return (FillMode.HOLD). A repeat never takes the place of a frame still at the processor.

Zero-transcode (paths.py): with `video_mode` PASSTHROUGH or AUTO the decode thread forwards
the input's access units that qualify (the FrameQueue gives them to the sender beside decoded
frames), and the processor's returned access units are muxed into the output as they are
(remux: neither decoded nor encoded). A remuxed output has no decoded frame to repeat: when a
gap begins, the processor's last GOP is decoded once (media/lastpicture.py) for the fill. Its
segments follow the processor's keyframes; when one runs past the gop, the processor is asked
for a keyframe (RTCP PLI), and if none comes after KEYFRAME_REQUESTS asks the output falls back
to decoding and encoding.
"""

from __future__ import annotations

import asyncio
import copy
import enum
import logging
import math
import time
from collections.abc import AsyncIterable, Callable
from dataclasses import dataclass, field
from typing import Any

import av

from relay_server import _fast
from relay_server.media.arrivals import VideoArrivals
from relay_server.media.decoder import DecoderStats
from relay_server.media.encoder import CLOCK, EncoderSettings, EncoderStats
from relay_server.media.feeder import FeedStats
from relay_server.media.h264 import Verdict, is_idr
from relay_server.media.handoff import FrameQueue
from relay_server.media.input import MediaInput
from relay_server.media.lastpicture import LastPicture
from relay_server.media.output import OutputPipeline, PipelineStats, Policy, SinkStats
from relay_server.media.scaler import ScaleMode
from relay_server.media.segmenter import AudioInfo, SegmenterStats
from relay_server.media.timeline import LATENCY_BUDGET, SessionTimeline, TimelineStats
from relay_server.media.units import AccessUnits
from relay_server.session.audio import AudioCarrier
from relay_server.session.paths import InputRoute, NotQualified, PathStats, VideoMode
from relay_server.trickle.publisher import Publisher
from relay_server.waits import until_set
from relay_server.webrtc.link import LinkSettings, LinkState, LinkStats, ProcessorLink

log = logging.getLogger(__name__)

# Seconds without a returned frame before the output fills the gap: a few frame intervals, so
# that a processor's ordinary jitter never triggers it.
FILL_AFTER = 0.25
# How long the last frames may take to come back once the input has ended. aiortc's jitter
# buffers (the processor's and ours) release a frame only when the next one starts, so the very
# last frame may never come back; this bounds the wait for it.
DRAIN_SECONDS = 0.5
# Keyframe requests in a row, each a gop apart, that go unanswered before a remuxed output falls
# back to decoding and encoding the processor's frames.
KEYFRAME_REQUESTS = 3


class FillMode(enum.Enum):
    REPEAT = "repeat"  # the last good frame again, at the output frame rate
    HOLD = "hold"  # nothing: the output resumes when frames return


@dataclass(frozen=True)
class QueueDepth:
    name: str
    depth: int
    capacity: int  # 0: unbounded by design (none is) or not applicable
    unit: str  # "frames" or "bytes"


@dataclass(frozen=True)
class RelayStats:
    implementation: str  # which relay_server._fast build moves the bytes
    elapsed: float  # seconds since run() started
    frames_decoded: int
    frames_dropped: int  # decoded but let go before they could be sent: the hand-off overflowed
    frames_returned: int
    frames_filled: int  # repeated into the output while none came back
    frames_encoded: int
    audio_carried: int  # input audio packets handed to the output
    audio_dropped: int  # input audio packets not carried (see session/audio.py)
    link: LinkStats
    feed: FeedStats = field(default_factory=FeedStats)
    decoder: DecoderStats = field(default_factory=DecoderStats)
    pipeline: PipelineStats = field(default_factory=PipelineStats)
    encoder: EncoderStats = field(default_factory=EncoderStats)
    segmenter: SegmenterStats = field(default_factory=SegmenterStats)
    sink: SinkStats = field(default_factory=SinkStats)
    queues: tuple[QueueDepth, ...] = ()  # every bounded hand-off, in data-flow order
    paths: PathStats = field(default_factory=lambda: PathStats("encode", "", "encode", "", 0, 0))
    units_dropped: int = 0  # input access units not forwarded: the queue overflowed, or a repeat
    units_late: int = 0  # input access units not forwarded: more than the latency budget behind
    timeline: TimelineStats = field(default_factory=TimelineStats)
    returns_behind: int = 0  # returned frames not after the last one output, let go

    @property
    def frames_published(self) -> int:
        """Video frames written to the output, whichever path made them (encoded, remuxed, filled)."""
        return self.segmenter.video_packets

    @property
    def reconnects(self) -> int:
        """Processor connections made after the first one: each follows a loss."""
        return max(0, self.link.connections - 1)

    @property
    def drops(self) -> dict[str, int]:
        """Frames and packets let go, by why (latency over completeness, or bad input)."""
        return {
            "input_corrupt": self.decoder.corrupt_packets,
            "input_units": self.units_dropped + self.paths.units_skipped,  # to resume at a keyframe
            "join_skipped": self.timeline.join_skipped,  # the backlog of a join, skipped to the live edge
            # Would have left more than the latency budget behind (forwarded: whole GOP tails).
            "late": self.timeline.late + self.units_late,
            "input_overflow": self.frames_dropped,  # the hand-off to the sender overflowed
            "rate_capped": self.link.send.rate_capped,  # max_fps
            "processor_lost": self.link.send.presumed_lost,  # sent, never came back
            "returned_behind": self.returns_behind,  # not after the last frame output
            "output_replaced": self.pipeline.frames_dropped,  # newer returned frame before encoding
            "returned_units": self.link.units_dropped + self.pipeline.packets_dropped,
            "audio_not_carried": self.audio_dropped,
        }


class Relay:
    """Runs a session's media path until the input ends, stop() or a failure (run() raises it:
    the input's, the link's LinkError, the output's). `source` is a channel URL or anything a
    Subscriber is; `output` a channel URL or a Publisher (one made here is closed, the channel
    kept). Run once."""

    def __init__(
        self,
        source: str | AsyncIterable[AsyncIterable[bytes]],
        output: str | Publisher,
        processor_url: str,
        *,
        width: int,
        height: int,
        prompts: list[dict[str, Any]] | None = None,
        mode: ScaleMode = ScaleMode.LETTERBOX,
        video_mode: VideoMode = VideoMode.TRANSCODE,
        encoder: EncoderSettings | None = None,
        link: LinkSettings | None = None,
        fill: FillMode = FillMode.REPEAT,
        fill_after: float = FILL_AFTER,
        latency_budget: float = LATENCY_BUDGET,
        drop_audio: bool = False,
        on_link_state: Callable[[LinkState, str], None] | None = None,
        on_data: Callable[[str], None] | None = None,
        buffer_size: int | None = None,
        name: str = "relay",
    ) -> None:
        if width <= 0 or height <= 0:
            raise ValueError(f"the session size must be positive, got {width}x{height}")
        encoding = encoder or EncoderSettings()
        # Paced by the timeline, frames past the latency budget are let go. Not paced (catch-up),
        # every frame goes through: decoding waits for the sender, and the returned frames wait
        # for the encoder (the processor holds at most max_in_flight).
        catch_up = link is not None and not link.pace
        self.name = name
        self.fill = fill
        self.fill_after = fill_after
        self.video_mode = video_mode
        self._fps = encoding.fps
        self._gop = encoding.gop
        zero_transcode = video_mode is not VideoMode.TRANSCODE
        # A frame-rate cap drops frames, which an encoded stream cannot lose (but at its keyframes).
        forwarding = zero_transcode and not (link is not None and link.max_fps)
        why = "transcode mode" if not zero_transcode else "max_fps is set: frames are dropped to it"
        self._send_path, self._send_reason = "encode", "no input yet" if forwarding else why
        self._output_path, self._output_reason = (
            ("remux", "the processor's H.264 muxed as it is") if zero_transcode else ("encode", why)
        )
        self._switches = 0
        self._keyframe_requests = 0  # unanswered, in a row
        self._fatal: BaseException | None = None
        self._user_link_state = on_link_state
        self._returned_count = 0  # frames (or units) back on the current connection
        self._at_loss = (0, 0)  # offers answered and units forwarded when a connection was last lost
        self._publisher = Publisher(output) if isinstance(output, str) else output
        self._owns_publisher = isinstance(output, str)
        self._pipeline = OutputPipeline(
            self._publisher,
            encoding.encoder(width, height, mode),
            policy=Policy.BLOCK if catch_up else Policy.LIVE,
            drop_audio=drop_audio,
            on_keyframe_overdue=self._keyframe_overdue if zero_transcode else None,
        )
        self._units = AccessUnits(wait=catch_up) if forwarding else None
        self._pictures = LastPicture() if zero_transcode else None  # what a remuxed output shows
        self._frames = FrameQueue(width, height, wait=catch_up, units=self._units)
        self._timeline = SessionTimeline(time.monotonic(), latency_budget)
        self._arrivals = VideoArrivals(self._timeline.arrived)
        self._route = (
            InputRoute(
                width,
                height,
                self._units,
                self._on_verdict,
                # A passthrough session forwards a join backlog too: it must not decode.
                backlog=self._timeline.backlog if video_mode is VideoMode.AUTO else None,
                decode_when_late=video_mode is VideoMode.AUTO,
            )
            if self._units is not None
            else None
        )
        self._input = MediaInput(
            source,
            on_frame=self._frames.put,
            # With drop_audio the demuxer leaves audio alone altogether.
            on_audio=None if drop_audio else self._on_audio,
            on_audio_stream=self._on_audio_stream,
            on_video_packet=self._route,
            on_chunk=self._arrived,
            on_start=self._timeline.input_started,
            audio_wait=0,  # the output does not wait for the audio: it joins when it comes
            width=width,
            height=height,
            mode=mode,
            buffer_size=buffer_size,
            name=name,
        )
        self.link = ProcessorLink(
            processor_url,
            self._frames,
            self._returned,
            prompts=prompts,
            settings=link,
            timeline=self._timeline,
            on_data=on_data,
            on_state=self._on_link_state,
            on_unit=self._returned_unit,
            remux=zero_transcode,
            name=name,
        )
        self._audio = AudioCarrier(self._pipeline, self._timeline)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last: av.VideoFrame | None = None  # the last frame the output got
        self._last_return = 0.0
        self._decoded_at: float | None = None  # _last_return when the last picture was decoded
        self._last_out: int | None = None  # pts of the last video output
        self._last_session: int | None = None  # session time of the last frame returned
        self._interval = round(1 / (encoding.fps * CLOCK))  # the output's frame grid, for fills
        self._returns_behind = 0
        self._filled = 0
        self._filling = False  # fill frames went out since the last unit the output took as it is
        self._keyframe_asked = -math.inf  # when a keyframe was last asked for after a gap
        self._started_at: float | None = None
        self._ran = False
        self._stopping = asyncio.Event()
        self._done = asyncio.Event()

    @property
    def stats(self) -> RelayStats:
        decoder = self._input.decoder_stats
        link = self.link.stats
        return RelayStats(
            implementation=_fast.IMPLEMENTATION,
            elapsed=0.0 if self._started_at is None else time.monotonic() - self._started_at,
            frames_decoded=decoder.frames,
            frames_dropped=self._frames.dropped,
            frames_returned=link.frames_returned,
            frames_filled=self._filled,
            frames_encoded=self._pipeline.encoder.stats.frames,
            audio_carried=self._audio.carried,
            audio_dropped=self._audio.dropped,
            link=link,
            feed=copy.copy(self._input.feed_stats),
            decoder=decoder,
            pipeline=self._pipeline.stats,
            encoder=copy.copy(self._pipeline.encoder.stats),
            segmenter=copy.copy(self._pipeline.segmenter.stats),
            sink=copy.copy(self._pipeline.sink.stats),
            queues=self._queues(),
            paths=PathStats(
                self._send_path,
                self._send_reason,
                self._output_path,
                self._output_reason,
                self._switches,
                self._route.skipped if self._route is not None else 0,
            ),
            units_dropped=self._units.dropped if self._units is not None else 0,
            units_late=self._units.late if self._units is not None else 0,
            timeline=copy.copy(self._timeline.stats),
            returns_behind=self._returns_behind,
        )

    def _queues(self) -> tuple[QueueDepth, ...]:
        sink = self._pipeline.sink
        return (
            QueueDepth("input_bytes", *self._input.buffered, "bytes"),
            QueueDepth("decoded_frames", len(self._frames), self._frames.capacity, "frames"),
            *(
                [QueueDepth("input_units", len(self._units), self._units.capacity, "frames")]
                if self._units is not None
                else []
            ),
            QueueDepth("processor_in_flight", *self.link.in_flight, "frames"),
            QueueDepth("returned_frames", *self._pipeline.queued_frames, "frames"),
            QueueDepth("output_bytes", sink.buffered, sink.max_bytes, "bytes"),
        )

    async def run(self) -> None:
        if self._ran:
            raise RuntimeError(f"relay {self.name} runs once")
        self._ran = True
        if self._stopping.is_set():
            self._done.set()
            return
        self._started_at = self._timeline.origin = time.monotonic()
        self._loop = asyncio.get_running_loop()
        log.info("relay %s: hot path %s", self.name, _fast.IMPLEMENTATION)
        source, link, frames = self._input, self.link, self._frames
        linking: asyncio.Task[None] | None = None
        filling: asyncio.Task[None] | None = None
        carrying: asyncio.Task[None] | None = None
        try:
            self._pipeline.start()
            source.start()
            linking = asyncio.create_task(link.run(), name=f"link {self.name}")
            filling = asyncio.create_task(self._fill(), name=f"fill {self.name}")
            carrying = asyncio.create_task(self._audio.run(), name=f"audio {self.name}")
            for helper in (filling, carrying):
                helper.add_done_callback(self._helper_done)
            stopping = asyncio.ensure_future(self._stopping.wait())
            try:
                ending: list[asyncio.Future[Any]] = [source.ended, linking, self._pipeline.failed, stopping]
                await asyncio.wait(ending, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopping.cancel()
            if source.ended.done() and not linking.done():
                frames.end()  # the send track ends; what is at the processor may still come back
                await link.drain(DRAIN_SECONDS)
                self._audio.end()  # the input's last audio packets go with the last pictures
                await until_set(carrying, self._stopping)
        finally:
            await self._shut_down(source, link, linking, (filling, carrying))

    def resize(self, width: int, height: int) -> None:
        """The session's size is width×height from the next frame decoded: frames are scaled to
        it, sent to the processor at it (the send leg's encoder follows), and output at it (a new
        segment; a remuxed output is the processor's, which follows what it is sent). In auto,
        forwarding is decided anew at the next keyframe. The timeline goes on."""
        if width <= 0 or height <= 0 or width % 2 or height % 2:
            raise ValueError(f"the session size must be positive and even, got {width}x{height}")
        self._input.resize(width, height)
        self._frames.resize(width, height)
        if self._route is not None:
            self._route.resize(width, height)
        self._pipeline.resize(width, height)

    async def stop(self) -> None:
        """End the run now (the output is still flushed) and wait until it has cleaned up."""
        self._stopping.set()
        if not self._ran:
            return
        await self._done.wait()

    async def _shut_down(
        self,
        source: MediaInput,
        link: ProcessorLink,
        linking: asyncio.Task[None] | None,
        helpers: tuple[asyncio.Task[None] | None, ...],
    ) -> None:
        """However run() ends: every thread joined, every task awaited, then the root cause raised."""
        try:
            self._frames.release()  # a decode thread waiting to hand a frame over goes on
            await source.stop()
            await link.stop()
            if linking is not None:
                await asyncio.wait([linking])
            for task in helpers:
                if task is not None:
                    task.cancel()
                    await asyncio.wait([task])
            link_error = linking.exception() if linking is not None and not linking.cancelled() else None
            pipeline_error: BaseException | None = None
            try:
                await self._pipeline.stop()
            except Exception as exc:
                pipeline_error = exc
            error = self._fatal or source.feed_error or link_error or pipeline_error or source.decoder_error
            if error is not None:
                raise error
        finally:
            self._frames.close()
            if self._owns_publisher:
                await self._publisher.close(delete_channel=False)
            self._done.set()

    def _arrived(self, chunk: bytes) -> None:
        """On the loop, each input chunk as it comes in: its video frames' arrivals."""
        self._arrivals.feed(chunk, time.monotonic())

    def _helper_done(self, task: asyncio.Task[None]) -> None:
        """The fill or the audio task ended: by cancellation, or by an error that ends the run."""
        if not task.cancelled() and task.exception() is not None:
            self._fatal = self._fatal or task.exception()
            self._stopping.set()

    # -- the decode thread ------------------------------------------------------------------------

    def _on_audio(self, packet: av.Packet) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._audio.put, packet)

    def _on_audio_stream(self, info: AudioInfo) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._audio.add_stream, info)

    def _on_verdict(self, verdict: Verdict) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._send_path_decided, verdict)

    # -- the paths (on the loop) -----------------------------------------------------------------

    def _send_path_decided(self, verdict: Verdict) -> None:
        path = "forward" if verdict.passthrough else "encode"
        if path != self._send_path and self._send_reason != "no input yet":
            self._switches += 1
        self._send_path, self._send_reason = path, verdict.reason
        log.info(
            "relay %s: input %s (%s)",
            self.name,
            "forwarded" if verdict.passthrough else "decoded",
            verdict.reason,
        )
        if self.video_mode is VideoMode.PASSTHROUGH and not verdict.passthrough:
            self._fatal = self._fatal or NotQualified(f"the input cannot be passed through: {verdict.reason}")
            self._stopping.set()

    def _on_link_state(self, state: LinkState, reason: str) -> None:
        if state in (LinkState.RECONNECTING, LinkState.CONNECTING):
            stats = self.link.stats
            answered, forwarded = self._at_loss
            self._at_loss = (stats.connections, stats.send.forwarded)
            if (
                self._route is not None
                and stats.connections > answered
                and stats.send.forwarded > forwarded
                and not self._returned_count
            ):
                # A connection answered, was sent the input as it is, and returned none of it.
                why = f"the processor returned nothing of the input sent as it is ({reason})"
                self._route.refuse(why)
                if self.video_mode is VideoMode.PASSTHROUGH:
                    self._fatal = self._fatal or NotQualified(why)
                    self._stopping.set()
            self._returned_count = 0
        if self._user_link_state is not None:
            self._user_link_state(state, reason)

    def _keyframe_overdue(self) -> None:
        """The remuxed output's segment ran past the gop: ask the processor for a keyframe, and
        give up on remuxing when asking does not help."""
        if self._output_path != "remux":
            return
        self._keyframe_requests += 1
        if self._keyframe_requests <= KEYFRAME_REQUESTS:
            self.link.request_keyframe()
            return
        self._output_path = "encode"
        self._output_reason = (
            f"the processor sent no keyframe in {KEYFRAME_REQUESTS} requests a gop ({self._gop:g} s) apart"
        )
        log.warning("relay %s: output falls back to encoding: %s", self.name, self._output_reason)
        self.link.set_remux(False)

    # -- the output's timeline -------------------------------------------------------------------

    def _output_pts(self, session: int | None, arrival: float) -> int | None:
        """Where a returned frame made from the input frame at `session` (session time, from
        the round trip) goes on the output's timeline: that time plus the session's output
        offset (the first one sets it); None when that is not after the last frame output: a
        repeat sent while the input stalled (the output fills stalls itself), or else counted."""
        timeline = self._timeline
        if session is None:  # more came back than was sent: on the grid after the last one
            pts = timeline.clock_pts(arrival) if self._last_out is None else self._last_out + self._interval
        else:
            if session == self._last_session:
                return None  # the same input frame again, sent while the input stalled: a repeat
            self._last_session = session
            if not timeline.output_started:
                timeline.start_output(session, arrival)
                # Readers take the stream's frame rate from its SPS: the input's, not an encoder's.
                rate = self._input.declared_rate or timeline.frame_rate
                self._pipeline.segmenter.frame_rate = rate
            mapped = timeline.output_pts(session)
            assert mapped is not None
            pts = mapped
        if self._last_out is not None and pts <= self._last_out:
            self._returns_behind += 1
            return None
        self._last_out = pts
        return pts

    def _fill_slot(self) -> int | None:
        """The output frame grid's next slot for a repeat of the last picture, unless that is where
        a frame still at the processor goes (repeats sent while the input stalls show the last
        picture again and do not count)."""
        if self._last_out is None:
            return None
        pts = self._last_out + self._interval
        pending, shown = self.link.pending_media(), self._last_session
        if pending is not None and (shown is None or pending > shown):
            bound = self._timeline.output_pts(pending)
            if bound is not None and pts >= bound:
                return None
        self._last_out = pts
        return pts

    async def _returned_unit(self, unit: bytes, arrival: float, session: int | None) -> None:
        self._returned_count += 1
        packet = av.Packet(unit)
        packet.is_keyframe = is_idr(unit)
        if packet.is_keyframe:
            self._keyframe_requests = 0
        pts = self._output_pts(session, arrival)
        if self._pictures is not None:
            # Repeats too (later units refer to them), but their pictures are not the output's.
            self._pictures.add(unit, packet.is_keyframe, shown=pts is not None)
        if pts is None:
            return
        self._last_return = arrival
        self._audio.frame_returned()
        if self._filling and not packet.is_keyframe and self._pictures is not None:
            # After fill frames the output takes the processor's units again only from a
            # keyframe: until one comes (asked for), the units are decoded and encoded.
            self._ask_keyframe(arrival)
            self._last = await asyncio.to_thread(self._pictures.picture)
            if self._last is not None:
                await self._pipeline.submit(self._last, pts)
            return
        self._filling = False
        self._last = None  # decoded only if a gap needs it
        await self._pipeline.submit_packet(packet, pts)

    def _ask_keyframe(self, now: float) -> None:
        """Ask the processor for a keyframe, at most once per fill_after."""
        if now - self._keyframe_asked >= self.fill_after:
            self._keyframe_asked = now
            self.link.request_keyframe()

    async def _returned(self, frame: av.VideoFrame, arrival: float, session: int | None) -> None:
        self._returned_count += 1
        pts = self._output_pts(session, arrival)
        if pts is None:
            return
        self._filling = False
        self._last, self._last_return = frame, arrival
        self._audio.frame_returned()
        await self._pipeline.submit(frame, pts)

    async def _decode_last_picture(self) -> None:
        """A gap in a remuxed output begins: decode the processor's last units (the GOP is kept:
        a unit that comes back later, alone, still needs it), once per gap, off the loop."""
        returned = self._last_return
        if self._pictures is None or self._decoded_at == returned:
            return
        self._decoded_at = returned
        picture = await asyncio.to_thread(self._pictures.picture)
        if self._last_return == returned:  # nothing newer came back meanwhile
            self._last = picture

    async def _fill(self) -> None:
        """Repeat the last frame into the output while none come back (FillMode.REPEAT). Sleeps
        until the gap would begin; each wake-up either finds a newer frame and sleeps again, or
        fills one slot of the output's frame grid: the one after the last frame output, unless
        that is where a frame still at the processor goes."""
        if self.fill is FillMode.HOLD:
            return
        interval = self._interval * float(CLOCK)
        while True:
            now = time.monotonic()
            if self._frames.ended:
                return  # the input has ended: so does the output, without a tail of repeats
            if self._last is None and now - self._last_return >= self.fill_after:
                await self._decode_last_picture()
            if self._last is None or self._last_out is None:
                wake = now + self.fill_after  # nothing returned yet: nothing to repeat
            elif now - self._last_return < self.fill_after:
                wake = self._last_return + self.fill_after
            else:
                pts = self._fill_slot()
                if pts is not None:
                    self._filled += 1
                    self._filling = True
                    await self._pipeline.submit(self._last, pts)
                wake = now + interval
            await asyncio.sleep(max(0.0, wake - time.monotonic()))
