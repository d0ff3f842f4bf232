"""SessionTimeline: one session's input media time mapped to the monotonic clock; every timing
decision of the session reads it.

    feed task (bytes arrive) ──arrived(pts, at)──▶ SessionTimeline ◀── decide(pts, ready, now): the sender
                                                        │
                          returned frames, fill, audio ◀┘ output_pts(pts): one constant offset

The mapping is anchored on the live edge of the input as it arrives: `offset` (clock − media
time) is the smallest seen over the video's arrivals, so the frame that arrived earliest for its
media time defines "on time", never the first frame of a join backlog (a session joining
mid-segment gets the segment so far in one burst: its newest frame sets the offset, and the older
ones show as late). Arrivals are stamped where the bytes come in (the feed task, media/arrivals.py),
before decoding, so the live edge is known before the backlog is decoded. The offset creeps up by
CREEP (seconds per second) between arrivals, so a publisher whose clock runs slower than ours is
followed rather than judged ever later.

A real discontinuity starts a new epoch, anchored afresh: the media time jumps by more than
RESYNC (a publisher restarting its clock, a splice; the 33-bit PTS wrap is unwrapped, not a
jump), or a frame arrives more than RESYNC later than its media time says (the input stalled and
its timestamps went on where they stopped). Every input timestamp is placed, by the epoch in
force when it arrived, on one session clock that runs on across epochs as the wall clock does:
what the sender sends, the round trip gives back and the output is stamped with is session time.

The sender asks decide() for each frame, in order: it is sent at its media time plus `smoothing`
(the 90th percentile of how late the input's frames arrive behind the live edge known at their
arrival, up to half the budget: bursts and B-frame reordering are spread out, not thinned; a join
backlog adds nothing, since each of its frames was the newest yet when it came); dropped when it
would leave more than `budget` seconds behind the live edge; and, until the first frame of an
epoch is sent, skipped when its bytes arrived more than JOIN_TOLERANCE late (the join backlog,
skipped to the live edge at once), unless the input is read from its start (input_started()).

The output carries the input's timing: output_pts() is a session time plus one constant, set by
the first returned frame so that the output clock starts where the relay's own did (at its
arrival); the audio's input timestamps go through the same two steps (audio_pts(), by the epoch of
the video at the audio's media time).
"""

from __future__ import annotations

import enum
from collections import OrderedDict, deque
from dataclasses import dataclass
from fractions import Fraction
from itertools import pairwise
from typing import NamedTuple

TICKS = 90_000  # per second: MPEG-TS and output timestamps
WRAP = 1 << 33  # MPEG-TS timestamps are 33 bits
RESYNC = 1.0  # seconds of jump (or of lateness on arrival) that start a new epoch
CREEP = 0.002  # seconds per second the offset rises by itself (clock drift up to 2000 ppm)
JOIN_TOLERANCE = 0.15  # seconds an epoch's first frames may have arrived late and still be sent
LATENCY_BUDGET = 0.5  # default seconds a frame may leave behind the live edge
ARRIVALS = 512  # video arrivals remembered (pts → clock time): seconds of input at any rate
SMOOTHING_SAMPLES = 60  # arrival delays the smoothing is the 90th percentile of: 2 s at 30 fps
SMOOTHING_EVERY = 6  # arrivals between two workings-out of that percentile
EPOCHS = 4  # epochs whose media ranges audio is placed by


class Decision(enum.Enum):
    SEND = "send"
    JOIN_SKIPPED = "join_skipped"  # behind the live edge when the epoch began
    LATE = "late"  # would leave more than the budget behind the live edge


@dataclass
class TimelineStats:
    epochs: int = 0  # anchorings: the first, and one per discontinuity
    join_skipped: int = 0  # frames of a backlog skipped to the live edge
    late: int = 0  # frames dropped: they would have left more than the budget late
    arrivals: int = 0  # video access units stamped on arrival


@dataclass
class _Epoch:
    offset: float  # clock seconds minus media seconds: the live edge
    first: int  # unwrapped ticks of its first video arrival
    newest: int  # unwrapped ticks of the newest video arrival
    session: int  # session ticks minus media ticks
    joining: bool = True  # no frame sent yet: frames that came as a backlog are skipped


class _Arrival(NamedTuple):
    at: float
    epoch: _Epoch


class Placed(NamedTuple):
    """A frame on the timeline: when it should leave, and its session time."""

    decision: Decision
    due: float  # clock time (≤ now: at once)
    session: int  # ticks on the session clock


class SessionTimeline:
    """On the event loop (backlog() may be called from any thread). `origin` is the clock time
    of output pts 0."""

    def __init__(self, origin: float, budget: float = LATENCY_BUDGET) -> None:
        if budget <= 0:
            raise ValueError(f"the latency budget must be positive, got {budget:g}")
        self.origin = origin
        self.budget = budget
        self.stats = TimelineStats()
        self._first: _Epoch | None = None  # its offset is the session clock's
        self._epochs: deque[_Epoch] = deque(maxlen=EPOCHS)  # the newest, in force, last
        self._last_arrival = 0.0
        self._arrivals: OrderedDict[int, _Arrival] = OrderedDict()  # by unwrapped media ticks
        self._delays: deque[float] = deque(maxlen=SMOOTHING_SAMPLES)
        self._smoothing = 0.0
        self._since_smoothing = 0  # delays added since the smoothing was worked out
        self._output: int | None = None  # output ticks minus session ticks, once the output began
        self._from_start = False  # the input is read from its start: its first epoch has no backlog

    @property
    def _epoch(self) -> _Epoch | None:
        return self._epochs[-1] if self._epochs else None

    # -- the input ----------------------------------------------------------------------------------

    def input_started(self, from_start: bool) -> None:
        """Before its first bytes: the input is read from its start (its channel appeared after the
        session began, so what came before the first read is no join backlog, only the wait for
        it: sent, if late), or joined while live."""
        self._from_start = from_start

    @property
    def smoothing(self) -> float:
        """Seconds past its media time a frame is sent at: how late the input's frames arrive."""
        return self._smoothing

    def arrived(self, pts: int, at: float) -> None:
        """A video access unit with MPEG-TS timestamp `pts` (90 kHz) arrived at clock time `at`."""
        epoch = self._epoch
        ticks = self.unwrap(pts)
        media = ticks / TICKS
        self.stats.arrivals += 1
        if (
            epoch is None
            or abs(ticks - epoch.newest) > RESYNC * TICKS
            or at - (media + epoch.offset) > RESYNC
        ):
            epoch = self._begin_epoch(ticks, at)
        else:
            epoch.offset += CREEP * max(0.0, at - self._last_arrival)
            delay = at - (media + epoch.offset)  # behind the live edge as known so far
            if delay < 0:
                epoch.offset += delay  # the earliest arrival yet: the new live edge
            self._add_delay(delay)
            epoch.newest = max(epoch.newest, ticks)
        self._last_arrival = at
        arrivals = self._arrivals
        arrivals[ticks] = _Arrival(at, epoch)
        arrivals.move_to_end(ticks)
        if len(arrivals) > ARRIVALS:
            arrivals.popitem(last=False)

    def _begin_epoch(self, ticks: int, at: float) -> _Epoch:
        offset = at - ticks / TICKS
        first = self._first
        # The session clock runs on as the wall clock does: the same session time for the same
        # clock time as in the first epoch.
        session = 0 if first is None else round((offset - first.offset) * TICKS) + first.session
        joining = first is not None or not self._from_start
        epoch = _Epoch(offset, ticks, ticks, session, joining)
        self._epochs.append(epoch)
        if first is None:
            self._first = epoch
        self._delays.clear()
        self._smoothing = 0.0
        self._since_smoothing = 0
        self.stats.epochs += 1
        return epoch

    @property
    def frame_rate(self) -> Fraction | None:
        """The input's average frame rate over the arrivals remembered in this epoch, in
        presentation order, up to the first gap (a step over half again the usual one): with
        B-frames the newest arrivals are P-frames whose B-frames come after them, so the span
        of all of them holds frames yet to come (measured: 18.75 fps for a 30 fps input)."""
        epoch = self._epoch
        ticks = sorted(media for media, arrival in self._arrivals.items() if arrival.epoch is epoch)
        steps = [b - a for a, b in pairwise(ticks)]
        if not steps or ticks[-1] == ticks[0]:
            return None
        usual = sorted(steps)[len(steps) // 2]
        whole = next((i for i, step in enumerate(steps) if step > 1.5 * usual), len(steps)) or len(steps)
        return Fraction(TICKS * whole, ticks[whole] - ticks[0]).limit_denominator(1001)

    def unwrap(self, pts: int) -> int:
        """`pts` (33-bit, or already unwrapped) as ticks continuing the newest arrival's."""
        epoch = self._epoch
        pts %= WRAP
        if epoch is None:
            return pts
        return pts + round((epoch.newest - pts) / WRAP) * WRAP

    def _add_delay(self, delay: float) -> None:
        delays = self._delays
        delays.append(max(0.0, delay))
        self._since_smoothing += 1
        if self._since_smoothing >= SMOOTHING_EVERY:  # a percentile moves slowly: not every frame
            self._since_smoothing = 0
            ordered = sorted(delays)
            self._smoothing = min(ordered[int(0.9 * (len(ordered) - 1))], self.budget / 2)

    def _arrival(self, pts: int, ready: float) -> tuple[int, _Arrival]:
        """`pts` unwrapped, and its arrival; a frame the feed did not see arrive (an input it
        could not stamp) arrived when it was handed over."""
        ticks = self.unwrap(pts)
        arrival = self._arrivals.get(ticks)
        if arrival is None:
            self.arrived(pts, ready)
            ticks = self.unwrap(pts)
            arrival = self._arrivals[ticks]
        return ticks, arrival

    # -- the send leg -------------------------------------------------------------------------------

    def decide(self, pts: int, ready: float, now: float, ahead: float = 0.0) -> Placed:
        """What the sender does with the next frame in order (media time `pts`, 90 kHz; handed
        over at clock time `ready`), whose way to the output is expected to take `ahead` more
        seconds (the frames at a slow processor before it): it is late if it would reach the
        output more than the budget behind the live edge."""
        ticks, (at, epoch) = self._arrival(pts, ready)
        live_edge = ticks / TICKS + epoch.offset
        session = ticks + epoch.session
        if epoch.joining and at - live_edge > JOIN_TOLERANCE:
            self.stats.join_skipped += 1
            return Placed(Decision.JOIN_SKIPPED, now, session)
        if now + ahead - live_edge > self.budget:
            self.stats.late += 1
            return Placed(Decision.LATE, now, session)
        epoch.joining = False
        return Placed(Decision.SEND, live_edge + self._smoothing, session)

    def due(self, pts: int, now: float) -> Placed:
        """When a frame that cannot be let go (an access unit: the ones after it refer to it) is
        due: like a frame decide() sends; at once when it is late."""
        ticks, (_, epoch) = self._arrival(pts, now)
        epoch.joining = False
        return Placed(Decision.SEND, ticks / TICKS + epoch.offset + self._smoothing, ticks + epoch.session)

    def behind(self, pts: int, now: float) -> float:
        """Seconds the frame at `pts` is behind the live edge now."""
        ticks, (_, epoch) = self._arrival(pts, now)
        return now - (ticks / TICKS + epoch.offset)

    def backlog(self, pts: int) -> bool:
        """The unit at `pts` arrived as part of a backlog: more than JOIN_TOLERANCE behind the
        live edge (any thread: it only reads)."""
        epoch = self._epoch
        ticks = self.unwrap(pts)
        arrival = self._arrivals.get(ticks)
        if epoch is None or arrival is None or arrival.epoch is not epoch or not epoch.joining:
            return False
        return arrival.at - (ticks / TICKS + epoch.offset) > JOIN_TOLERANCE

    # -- the output ---------------------------------------------------------------------------------

    @property
    def output_started(self) -> bool:
        return self._output is not None

    def start_output(self, session: int, at: float) -> None:
        """The first returned frame, made from the input frame at session time `session`,
        arrived at clock time `at`: it is output at `at`, and every session time at the same
        offset."""
        if self._output is None:
            self._output = self.clock_pts(at) - session

    def output_pts(self, session: int) -> int | None:
        """The output timestamp (90 kHz) of session time `session`; None before the output began."""
        return None if self._output is None else session + self._output

    def audio_pts(self, pts: int, duration: int = 0, *, final: bool = False) -> int | None:
        """The output timestamp of the input's audio at `pts` lasting `duration` (90 kHz), by the
        epoch of the video at that media time (a packet that ends after an epoch's first frame
        begins belongs to it): the newest whose media times reach it, else an older one whose video
        it is among (muxers write audio up to 0.7 s after the video beside it, so some comes
        after a discontinuity's first frame). None: not yet known, because the output has not
        begun or the audio ends after every video frame come so far (muxers write it up to a few
        hundred ms ahead, in packets as long, and the input may stall right there: its video,
        which then begins a new epoch, decides where it goes). `final`: the input has ended, no
        video will come, and audio after the last picture goes on with it (as it did in the
        input)."""
        epoch = self._epoch
        if epoch is None or self._output is None:
            return None
        ticks = self.unwrap(pts)
        end = ticks + duration

        def reaches(e: _Epoch) -> bool:
            return e.first < end and ticks <= e.newest + RESYNC * TICKS

        if reaches(epoch):
            if end > epoch.newest and not final:
                return None
        else:
            epoch = next((e for e in reversed(self._epochs) if reaches(e)), epoch)
        return ticks + epoch.session + self._output

    def clock_pts(self, at: float) -> int:
        """Clock time `at` on the output's timeline (for frames no input frame is behind)."""
        return round((at - self.origin) * TICKS)
