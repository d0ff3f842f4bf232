"""Pacer: when a frame is due, from its media time, against the monotonic clock.

Frames leave at their presentation time: the first frame anchors media time to the clock, and
each later one is due at anchor + its media offset. Frames that come late go at once (waiting
would only add latency); early ones wait. The anchor follows the input: a frame that arrives
early says the anchor was set by a late frame, so it moves a fraction of that earliness earlier
(a persistent offset fades within a second or two, a one-off burst barely moves it). A jump of
more than `resync` seconds either way (a new stream, a publisher restarting its clock, the
timestamps continuing after a stall) re-anchors on the frame in hand.

A backlog says more than one early frame: when newer frames are already waiting behind the one
in hand (a session that joins mid-segment gets the segment's earlier frames in one burst),
catch_up() anchors so that the newest of them is due within `within` seconds: a jittery input's
short bursts are still smoothed, a long backlog goes at once instead of being replayed at media
time behind the live edge.
"""

from __future__ import annotations

# Seconds of discrepancy between media time and the clock that re-anchor the pacing.
RESYNC = 1.0
# Fraction of an early frame's earliness the anchor moves by.
ADAPT = 0.05


class Pacer:
    def __init__(self, resync: float = RESYNC, adapt: float = ADAPT) -> None:
        self.resync = resync
        self.adapt = adapt
        self.resyncs = 0  # re-anchorings after the first anchor
        self._offset: float | None = None  # clock time minus media time

    def clock_time(self, media: float) -> float | None:
        """The clock time media time `media` maps to now (None before the first frame)."""
        return None if self._offset is None else self._offset + media

    def catch_up(self, newest: float, now: float, within: float = 0.0) -> None:
        """A frame at media time `newest` is already waiting: it is due `within` seconds from
        now at the latest."""
        if self._offset is None or self._offset + newest > now + within:
            self._offset = now + within - newest

    def due(self, media: float, now: float) -> float:
        """The clock time at which the frame at `media` seconds is due (≤ now: send it now)."""
        if self._offset is None or abs(self._offset + media - now) > self.resync:
            self.resyncs += self._offset is not None
            self._offset = now - media
            return now
        due = self._offset + media
        if due > now:
            self._offset -= (due - now) * self.adapt
            due = self._offset + media
        return due
