"""SendTrack: the processor's input, in input order, paced by the session timeline, encoded by our own x264.

aiortc's sender pulls: it awaits recv() and sends whatever comes back at once, so pacing is the
track's job. recv() takes the oldest frame from the FrameQueue hand-off and asks the session
timeline (media/timeline.py) what to do with it: send it when it is due by its media time (a
burst is spread out, not thinned), or let it go, counted there, because it is the backlog of a
join or would leave more than the latency budget behind the live edge. With `max_fps` the frames
are thinned by media time to that rate, counted in `rate_capped`. When the input stalls, the last
frame goes again every `repeat_after` seconds: ComfyStream's track gives up for good after 5 s
without an input frame (`on_resume` is told when fresh frames follow repeats: a remuxed output
asks for a keyframe then, to resume with the processor's first frame). When the input ends, the
last frame goes once more, so that the processor's jitter buffer (aiortc's releases a frame only
when the next one starts) lets the last one out.

recv() returns an encoded av.Packet, which aiortc only packetises (RTCRtpSender calls
encoder.pack()): its own encoder would run x264 at the default preset (~5× the CPU of ultrafast)
and re-create it, with a keyframe, whenever the bandwidth estimate moves by 10%. Ours is a
VideoEncoder (one per peer connection, so each connection starts on an IDR) running on the
link's encode thread; RTCP keyframe requests reach it through request_keyframe().

At most `max_in_flight` frames are out at the processor at once (sent, not yet back): ComfyStream
queues every input frame and a slow pipeline would fall ever further behind; held back, the
frames wait in the hand-off, where the timeline lets those past the budget go, counting the time a
frame sent now would wait at the processor behind the others (InFlight.wait(): its pace).

Zero-transcode: the hand-off may give the input's own encoded access units instead of decoded
frames. They are paced the same way and go out as they are, but never one by one: a unit past
the budget takes the units up to the newest keyframe queued with it (whole GOPs), and goes at
once when none is queued. When the input stalls, the last keyframe is what goes again (a P-frame
repeated would corrupt the picture); so it does at once when a GOP's tail is let go, or the
last unit sent would wait in the processor's jitter buffer for the next GOP. Frames that follow
units start on an IDR of our encoder, so the processor's decoder switches cleanly between the
two streams.

Send timestamps come from the monotonic clock, not from the input: repeats and input jumps keep
one clean RTP timeline, and the round-trip matcher needs the clock's jitter (see roundtrip.py),
which gives each returned frame back the media time of the frame it was made from.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from fractions import Fraction
from typing import TypeVar

import av
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from relay_server.media.encoder import CLOCK, VideoEncoder
from relay_server.media.handoff import FrameQueue, Taken
from relay_server.media.timeline import JOIN_TOLERANCE, TICKS, Decision, SessionTimeline
from relay_server.webrtc.roundtrip import RoundTrip

# Seconds without a new input frame before the last one is sent again: well inside
# ComfyStream's 5 s watchdog, rare enough to cost nothing while the input is live.
REPEAT_AFTER = 0.5
# Frames out at the processor at once: a round trip of ~130 ms at 30 fps. Measured with a
# ComfyStream-like FIFO processor capped at 10 fps it bounds the round trip to about
# (window / 10 fps) instead of letting it grow by two thirds of a second every second.
MAX_IN_FLIGHT = 4
# Of a frame interval at max_fps: how much sooner than that a frame may follow the last one sent
# (variable frame rates and rounded timestamps).
RATE_TOLERANCE = 0.1
# Frames that are late (queued while the processor was being connected, or after a stall) go at
# up to four times their own pace, not all at once: a processor that keeps only its newest frame would
# drop all but the last of a burst.
CATCH_UP = 0.25
# A frame not back after this long is presumed dropped by the processor and stops counting.
IN_FLIGHT_EXPIRY = 1.0
# Returns the processor's pace is taken from (the median time between them while it was busy).
PACE_RETURNS = 10


@dataclass
class SendStats:
    frames: int = 0  # frames sent, fresh and repeated
    forwarded: int = 0  # of which the input's own access units, sent as they are
    repeated: int = 0  # the last frame sent again while the input stalled
    keyframes_requested: int = 0  # RTCP PLI/FIR from the processor
    bytes: int = 0  # encoded bytes handed to aiortc
    paced_seconds: float = 0.0  # time frames were held back until due
    throttled_seconds: float = 0.0  # time spent waiting for the processor to return frames
    # Frames that will not come back: a later one did (the processor let them go), or none
    # within IN_FLIGHT_EXPIRY; no longer waited for.
    presumed_lost: int = 0
    rate_capped: int = 0  # frames not sent: max_fps
    resent: int = 0  # packets sent again: the processor's returns stalled (resend.py)
    pushed: int = 0  # the newest packet sent again after a NACK was answered (resend.py)


class InFlight:
    """Frames sent and not yet returned, oldest first; room() waits until fewer than `limit`
    (0: no limit) are out. One per peer connection."""

    def __init__(
        self, stats: SendStats, limit: int = MAX_IN_FLIGHT, expiry: float = IN_FLIGHT_EXPIRY
    ) -> None:
        self.limit = limit
        self.expiry = expiry
        self._stats = stats
        # (send time, timed: not a repeat), oldest first; bounded by `limit` (room() before send)
        self._sent: deque[tuple[float, bool]] = deque()
        self._returned = asyncio.Event()
        self._paces: deque[float] = deque(maxlen=PACE_RETURNS)
        self._last_return: float | None = None
        self._trip: float | None = None  # the last timed round trip, while the pace is unknown

    def __len__(self) -> int:
        return len(self._sent)

    def sent(self, at: float, timed: bool = True) -> None:
        """A frame went out at `at`; `timed`: its return says how long the processor took (a
        repeat's waits in the processor's jitter buffer for the next frame)."""
        if self.limit:
            self._sent.append((at, timed))

    def returned(self, passed_over: int = 0, sent_at: float | None = None) -> None:
        """A frame came back (sent at `sent_at`, when known), and `passed_over` sent before it
        never will (those already presumed lost by expiry are no longer here). Until the round
        trip matcher knows, the frame back is taken to be the oldest out (a processor returns
        frames in order), unless that was a repeat."""
        now = time.monotonic()
        leaving = min(1 + passed_over, len(self._sent))
        oldest: tuple[float, bool] | None = None
        for _ in range(leaving):
            oldest = self._sent.popleft()
        self._stats.presumed_lost += max(0, leaving - 1)
        if sent_at is None and oldest is not None and oldest[1]:
            sent_at = oldest[0]
        if sent_at is not None:
            self._trip = now - sent_at
            if self._last_return is not None and sent_at < self._last_return:
                self._paces.append(now - self._last_return)  # it waited while the one before was served
        self._last_return = now
        self._returned.set()

    def wait(self) -> float | None:
        """Seconds a frame sent now may take to come back because of the frames still out: the
        processor's pace (the median time between returns while others waited: the time it
        takes for one frame when busy) for each of them and for the frame itself; 0 when none
        is out. Until the pace is known (the second return), the last round trip stands for it:
        a slow processor's first frames do not all go before its pace is known. None before
        any came back."""
        if not self._sent:
            return 0.0
        if self._paces:
            paces = sorted(self._paces)
            return (len(self._sent) + 1) * paces[len(paces) // 2]
        return None if self._trip is None else (len(self._sent) + 1) * self._trip

    async def room(self) -> None:
        """Wait until another frame may go out."""
        if self.limit:
            self._stats.throttled_seconds += await self._until_fewer_than(self.limit)

    async def drained(self) -> None:
        """Wait until every frame sent has come back (or is presumed lost)."""
        await self._until_fewer_than(1)

    async def _until_fewer_than(self, count: int) -> float:
        started = time.monotonic()
        while True:
            now = time.monotonic()
            while self._sent and self._sent[0][0] <= now - self.expiry:
                self._sent.popleft()
                self._stats.presumed_lost += 1
            if len(self._sent) < count:
                return now - started
            self._returned.clear()
            try:
                async with asyncio.timeout(self._sent[0][0] + self.expiry - now):
                    await self._returned.wait()
            except TimeoutError:
                pass


class SendTrack(MediaStreamTrack):
    kind = "video"

    def __init__(
        self,
        frames: FrameQueue,
        encoder: VideoEncoder | None,
        executor: Executor,
        *,
        timeline: SessionTimeline | None,
        roundtrip: RoundTrip,
        in_flight: InFlight,
        clock_origin: float,
        repeat_after: float = REPEAT_AFTER,
        max_fps: float = 0.0,
        stats: SendStats | None = None,
        on_resume: Callable[[], object] | None = None,
    ) -> None:
        super().__init__()
        self._on_resume = on_resume  # a fresh frame goes out after repeats: the input is back
        self.encoder = encoder
        self.stats = stats if stats is not None else SendStats()
        self._frames = frames
        self._executor = executor
        self._timeline = timeline  # None: not paced (catch-up), every frame at once
        self._roundtrip = roundtrip
        self._in_flight = in_flight
        self._origin = clock_origin
        self._repeat_after = repeat_after
        self._min_interval = round((1 - RATE_TOLERANCE) / max_fps / CLOCK) if max_fps else 0
        self._last_media: int | None = None  # of the last fresh frame sent (max_fps)
        self._media: int | None = None  # session time of the input frame sent last
        self._last_sent = -math.inf  # when a frame went out last
        self._flushed = False  # the last frame went out once more after the input ended
        self._repeating = False  # the last frame sent was a repeat
        self._after_units = False  # the last thing sent was an access unit: the next frame is an IDR
        self._push_out = False  # a GOP's tail was let go: the last keyframe goes again at once
        self.sent_all = asyncio.Event()  # the input ended and its last frame went out
        self._encode_loop = asyncio.get_running_loop()

    def request_keyframe(self) -> None:
        """The receiver lost the picture (RTCP PLI or FIR)."""
        self.stats.keyframes_requested += 1
        if self.encoder is not None:
            self.encoder.request_keyframe()

    async def recv(self) -> av.Packet | av.VideoFrame:  # aiortc packs packets, encodes frames
        while self.readyState == "live":
            await self._in_flight.room()
            # Until the first frame there is nothing to repeat: wait for one without a timer.
            timeout = None if self._frames.current is None else self._repeat_after
            if self._push_out:
                # The processor's jitter buffer lets the last unit sent go only when the next
                # frame starts: the last keyframe goes again now, not a GOP (or repeat_after) later.
                self._push_out, timeout = False, 0
            taken = await self._frames.next(timeout)
            if taken is None:
                if not self._frames.ended:
                    continue
                # The input has ended: so does this track, once its last frame is out of the
                # processor's jitter buffer, which releases a frame only when the next one starts.
                current = self._frames.current
                if self._flushed or current is None:
                    self.sent_all.set()
                    break
                self._flushed = True
                taken = Taken(current, False, time.monotonic())
            frame = taken.item
            if taken.fresh:
                media = await self._until_due(taken)
                if media is None:
                    continue  # let go: the timeline or the rate cap counted it
                if self._repeating and self._on_resume is not None:
                    self._on_resume()
                self._media, self._repeating = media, False
            else:
                self.stats.repeated += 1
                self._repeating = True
                media = self._media  # the same picture again, from the same input frame
            pts = round((time.monotonic() - self._origin) / CLOCK)
            if isinstance(frame, av.Packet):
                return self._forward(frame, pts, media)
            if self._after_units:
                self._after_units = False
                if self.encoder is not None:
                    self.encoder.request_keyframe()
            if self.encoder is None:
                return self._sent(pts, media, _stock(frame, pts))
            if (frame.width, frame.height) != (self.encoder.width, self.encoder.height):
                # The session was resized: the encoder follows (an IDR at the new size).
                await self._encode_loop.run_in_executor(
                    self._executor, self.encoder.resize, frame.width, frame.height
                )
            packets = await self._encode_loop.run_in_executor(self._executor, self.encoder.encode, frame, pts)
            if packets:
                packet = _one_packet(packets)
                self.stats.bytes += packet.size
                return self._sent(pts, media, packet)
        raise MediaStreamError

    def _forward(self, unit: av.Packet, pts: int, media: int | None) -> av.Packet:
        """The input's access unit, restamped on the send timeline (aiortc only packetises it)."""
        unit.pts = unit.dts = pts
        unit.time_base = CLOCK
        self._after_units = True
        self.stats.forwarded += 1
        self.stats.bytes += unit.size
        return self._sent(pts, media, unit)

    def _sent(self, pts: int, media: int | None, data: _Sent) -> _Sent:
        sent = self._last_sent = time.monotonic()
        # A repeat's round trip says nothing of the processor's: the one before it waits in the
        # processor's jitter buffer until it comes, half a second later.
        self._roundtrip.sent(pts, sent, media, timed=not self._repeating)
        self._in_flight.sent(sent, timed=not self._repeating)
        self.stats.frames += 1
        return data

    async def _until_due(self, taken: Taken) -> int | None:
        """Wait until the frame is due, and give its session time (the input's media time when
        not paced); None: it is let go instead (counted)."""
        frame, timeline = taken.item, self._timeline
        media = frame.pts
        if media is None:
            return None
        if self._min_interval and not isinstance(frame, av.Packet):
            if self._last_media is not None and 0 <= media - self._last_media < self._min_interval:
                self.stats.rate_capped += 1
                return None
            self._last_media = media
        if timeline is None:
            return media  # catch-up: at once
        now = time.monotonic()
        if isinstance(frame, av.Packet):
            # Units cannot be replaced by newer ones, so the sender keeps within the budget by
            # whole GOPs: a unit more than the budget behind the live edge goes with the units
            # up to the newest keyframe queued; one that would come back later than the budget
            # after it arrived (the processor takes them more slowly than they come) goes with
            # the rest of its GOP. A join's backlog, behind as it arrived, is caught up instead
            # (sent at once: the processor decodes faster than real time).
            units = self._frames.units
            if units is not None and timeline.behind(media, now) > timeline.budget:
                skip = units.newest_keyframe
                if skip is not None:
                    units.skip(skip)
                    timeline.stats.late += 1
                    return None
            if units is not None and self._unit_late(taken, media, now, timeline):
                units.let_gop_go()
                timeline.stats.late += 1
                self._push_out = self._media is not None
                return None
            placed = timeline.due(media, now)
        else:
            # A slow processor's queue counts against the budget too: the frames still out there
            # go first, at its pace (InFlight.wait(); before any came back on this connection,
            # the link's recent round trips stand for the wait). Not a median latency: that
            # remembers a queue long gone, and while frames are held back because of it none
            # comes back to show that it is gone.
            ahead = self._in_flight.wait()
            if ahead is None:
                ahead = self._roundtrip.latencies.recent() if len(self._in_flight) else 0.0
            placed = timeline.decide(media, taken.ready, now, ahead)
            if placed.decision is not Decision.SEND:
                return None
        due = placed.due
        if self._media is not None and 0 < placed.session - self._media < TICKS:
            due = max(due, self._last_sent + CATCH_UP * (placed.session - self._media) / TICKS)
        delay = due - now
        if delay > 0:
            self.stats.paced_seconds += delay
            await asyncio.sleep(delay)
        return placed.session

    def _unit_late(self, taken: Taken, media: int, now: float, timeline: SessionTimeline) -> bool:
        """The unit would come back more than the budget after it was handed over: the time it
        has been held here, and, when it arrived live, the frames at the processor before it at
        its pace. A join's backlog, behind as it arrived, is caught up: only its time here counts."""
        held = now - taken.ready
        if timeline.behind(media, taken.ready) > JOIN_TOLERANCE:
            return held > timeline.budget
        return held + (self._in_flight.wait() or 0.0) > timeline.budget

    async def drain(self) -> None:
        """Wait until an encode this track started has finished (a cancelled recv() leaves it
        running on the encode thread, with the hand-off's frame in use)."""
        await self._encode_loop.run_in_executor(self._executor, _nothing)


_Sent = TypeVar("_Sent", av.Packet, av.VideoFrame)


def _stock(frame: av.VideoFrame, pts: int) -> av.VideoFrame:
    """A copy for aiortc's own encoder, which runs on its executor after recv() returned (and
    could still be reading the hand-off's buffer when the next recv() gives it back)."""
    copy = frame.reformat()
    copy.pts, copy.time_base = pts, CLOCK
    return copy


def _one_packet(packets: list[av.Packet]) -> av.Packet:
    self_contained = packets[0]
    if len(packets) > 1:  # not under zerolatency, but an access unit must go out whole
        self_contained = av.Packet(b"".join(bytes(packet) for packet in packets))
        self_contained.pts = self_contained.dts = packets[0].pts
        self_contained.time_base = Fraction(CLOCK)
    return self_contained


def _nothing() -> None:
    pass
