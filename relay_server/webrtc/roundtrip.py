"""Send → return latency: returned frames matched to the frames they were made from, by pts.

A processor that keeps pts (ComfyStream in passthrough, the embedded processor) returns a frame
with the pts it arrived with; but each WebRTC hop rebases RTP timestamps on its first packet, so
a returned pts is the sent one minus an unknown constant. The matcher learns that constant from
the first few returns: candidates are `returned − sent` for every recently sent pts; each further
return keeps only the candidates under which it also matches a sent pts. Send pts come from the
monotonic clock, so their spacing jitters and one candidate remains after a few frames; it is
learnt once it has explained EXPLAINED_TO_LEARN returns in a row. That many are needed because
the jitter is only a few ticks: one send interval in ~20 is exactly a nominal frame, so a
processor that stamps its output with its own evenly spaced pts (aiortc's next_timestamp())
would often leave a single wrong candidate after two or three returns. A processor that
rewrites pts thus never matches: its latency is then unknown, not wrong.

Each sent frame also carries the media time of the input frame it was made from, which a match
gives back: the output is stamped with it (session/relay.py). Until the offset is learnt, and
whenever a return does not match, the media time is the oldest sent frame's that has not come back
yet (a processor returns frames in order): the output's timing never waits for the matcher.
"""

from __future__ import annotations

import math
from collections import deque

# Sent frames remembered for matching: 10 s at 30 fps, far more than any sane round trip.
REMEMBERED = 300
# Returns in a row that do not match under the learned offset before it is learned anew.
MISSES_TO_RELEARN = 10
# Returns in a row a lone candidate offset must explain (the first included) to be learnt.
EXPLAINED_TO_LEARN = 6
# Latencies kept for the percentiles: the last 10 s at 30 fps.
WINDOW = 300
# Latencies a send decision expects the next round trip from: a third of a second at 30 fps.
RECENT = 10


class RoundTrip:
    """One peer connection's matching; its latencies go to `latencies` (which may outlive it)."""

    def __init__(self, latencies: LatencyWindow | None = None) -> None:
        self.matched = 0
        self.unmatched = 0
        # Sent frames a later return passed over: the processor let them go (it returns in order).
        self.skipped = 0
        # When the frame that came back last went out, if matched and timed (a repeat's return
        # waits for the next frame in the processor's jitter buffer).
        self.last_sent_at: float | None = None
        self.first_sent: float | None = None  # monotonic time of the first frame sent
        self.latencies = latencies if latencies is not None else LatencyWindow()
        self._sent: dict[int, tuple[float, int | None, bool]] = {}  # pts → (sent at, media, timed)
        self._order: deque[int] = deque()
        self._unreturned: deque[int] = deque()  # sent pts not yet matched or guessed, oldest first
        self._offset: int | None = None
        self._candidates: set[int] | None = None
        self._explained = 0  # returns in a row the candidates explain
        self._misses = 0

    def sent(self, pts: int, at: float, media: int | None = None, timed: bool = True) -> None:
        """A frame made from the input frame at `media` went out with `pts` at monotonic time
        `at`; its round trip goes to the latencies unless not `timed`."""
        if self.first_sent is None:
            self.first_sent = at
        if len(self._order) == REMEMBERED:
            self._sent.pop(self._order.popleft(), None)
        if len(self._unreturned) == REMEMBERED:
            self._unreturned.popleft()
        self._order.append(pts)
        self._unreturned.append(pts)
        self._sent[pts] = (at, media, timed)

    def returned(self, pts: int | None, at: float) -> int | None:
        """A frame came back with `pts` at monotonic time `at`: the media time of the input frame
        it was made from (None: nothing sent is waiting). Its round trip goes to the latencies
        when it matched a sent frame."""
        sent = self._match(pts) if pts is not None else None
        if sent is None:
            self.unmatched += 1
            self.last_sent_at = None
            return self._guess()
        self.matched += 1
        sent_at, media, timed = self._sent[sent]
        self.last_sent_at = sent_at if timed else None
        if timed:
            self.latencies.add(at - sent_at)
        unreturned = self._unreturned
        while unreturned and unreturned[0] <= sent:  # send pts only grow: up to the match, and
            if unreturned.popleft() != sent:  # the older ones the processor let go
                self.skipped += 1
        return media

    def pending(self, since: float) -> int | None:
        """The media time of the oldest frame sent at `since` or later that has not come back."""
        unreturned = self._unreturned
        while unreturned:
            sent = self._sent.get(unreturned[0])
            if sent is not None and sent[0] >= since:
                return sent[1]
            unreturned.popleft()  # presumed lost: it will not be waited for
        return None

    def waiting(self) -> tuple[int, float | None]:
        """How many frames sent have not come back, and when the oldest of them went out."""
        unreturned = self._unreturned
        while unreturned and unreturned[0] not in self._sent:  # forgotten: not waited for
            unreturned.popleft()
        if not unreturned:
            return 0, None
        return len(unreturned), self._sent[unreturned[0]][0]

    def _guess(self) -> int | None:
        while self._unreturned:
            sent = self._sent.get(self._unreturned.popleft())
            if sent is not None:
                return sent[1]
        return None

    def _match(self, pts: int) -> int | None:
        """The sent pts `pts` came back as, if known."""
        if self._offset is not None:
            if pts + self._offset in self._sent:
                self._misses = 0
                return pts + self._offset
            self._misses += 1
            if self._misses < MISSES_TO_RELEARN:
                return None
            self._offset, self._candidates, self._misses = None, None, 0
        if self._candidates is None:
            self._candidates = {sent - pts for sent in self._sent}
            self._explained = 1
            return None
        self._candidates = {offset for offset in self._candidates if pts + offset in self._sent}
        self._explained += 1
        if len(self._candidates) == 1 and self._explained >= EXPLAINED_TO_LEARN:
            self._offset = self._candidates.pop()
            self._candidates = None
            return pts + self._offset
        if not self._candidates:
            self._candidates = None  # start again from the next return
        return None


class LatencyWindow:
    """The last WINDOW latencies (seconds), for percentiles and the mean."""

    def __init__(self, size: int = WINDOW) -> None:
        self.values: deque[float] = deque(maxlen=size)

    def add(self, value: float) -> None:
        self.values.append(value)

    def percentile(self, fraction: float) -> float:
        """Nearest-rank percentile (0 < fraction ≤ 1); NaN when empty."""
        if not self.values:
            return math.nan
        ordered = sorted(self.values)
        return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]

    def mean(self) -> float:
        return sum(self.values) / len(self.values) if self.values else math.nan

    def recent(self, count: int = RECENT) -> float:
        """The median of the last `count` latencies: what the next frame may expect (0 for none)."""
        values = self.values
        last = sorted(values[index] for index in range(max(0, len(values) - count), len(values)))
        return last[len(last) // 2] if last else 0.0
