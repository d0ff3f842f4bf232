"""AccessUnits: encoded video access units from the decode thread to the loop, in order, bounded.

    decode thread ─put(packet)─▶ deque (≤ capacity) ─▶ take() on the loop

The zero-transcode send path forwards the input's H.264 as it is. Unlike decoded frames, access
units cannot be replaced by newer ones: a P-frame refers to the one before it, so dropping one
breaks every picture up to the next keyframe. So the units queue in order, and when the consumer
falls `capacity` behind, what is queued goes and so does everything up to the next keyframe
(counted in `dropped`): the picture resumes cleanly one GOP later instead of smearing. With
`wait=True` (catch-up) put() waits for room instead, and nothing is dropped.

The sender keeps within the session's latency budget by whole GOPs (counted in `late`): a unit
too late goes with the units before the newest keyframe queued (skip()), or, when none is
queued yet, with the rest of its GOP (let_gop_go()): a GOP's tail is what no later picture
refers to, so what is sent of it stays whole.

After the consumer repeated the last keyframe (the input stalled and the processor must keep
seeing frames), the units that follow refer to pictures the processor no longer holds last:
resume_at_keyframe() makes the queue skip to the next keyframe too.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

import av

# Units waiting for the sender: two seconds at 30 fps. Live, the pacer holds back one or two; a
# session that joins mid-segment gets the segment so far in one burst (the decode thread reads a
# 64 KiB chunk at a time), which the sender then sends as fast as the processor takes it.
CAPACITY = 64


class AccessUnits:
    """put() on the decode thread; take(), resume_at_keyframe() on the loop; release() anywhere."""

    def __init__(self, capacity: int = CAPACITY, *, wait: bool = False) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.capacity = capacity
        self.wait = wait
        self.put_count = 0  # units handed over by the decode thread
        self.taken = 0
        self.dropped = 0  # units let go: overflow, or waiting for a keyframe after a repeat
        self.late = 0  # units let go: the sender was more than the latency budget behind
        self.late_gops = 0  # GOPs whose tail went late (let_gop_go())
        self.last_keyframe: av.Packet | None = None  # the newest keyframe taken
        self._cond = threading.Condition()
        self._units: deque[tuple[av.Packet, float]] = deque()  # and when each was put
        self._skipping = False  # until the next keyframe
        self._skipping_late = False  # and the units skipped count as late
        self._released = False
        self._ready: Callable[[], object] | None = None

    def __len__(self) -> int:
        return len(self._units)

    @property
    def head(self) -> av.Packet | None:
        """The oldest unit queued, the one take() gives next, if any."""
        with self._cond:
            return self._units[0][0] if self._units else None

    @property
    def newest_keyframe(self) -> int | None:
        """How many units come before the newest keyframe queued (None: none is queued)."""
        with self._cond:
            for position in range(len(self._units) - 1, -1, -1):
                if self._units[position][0].is_keyframe:
                    return position
            return None

    def skip(self, count: int) -> None:
        """Let the `count` oldest units go as late (up to a keyframe: the picture resumes there)."""
        with self._cond:
            for _ in range(min(count, len(self._units))):
                self._units.popleft()
                self.late += 1
            self._cond.notify()

    def let_gop_go(self) -> None:
        """Let the rest of the current GOP go as late: what is queued, and what follows up to
        the next keyframe."""
        with self._cond:
            self.late += len(self._units)
            self.late_gops += 1
            self._units.clear()
            self._skipping = self._skipping_late = True
            self._cond.notify_all()

    def set_ready_callback(self, callback: Callable[[], object] | None) -> None:
        """Called on the decode thread after every put() that queued a unit."""
        self._ready = callback

    def put(self, unit: av.Packet) -> None:
        """On the decode thread: queue `unit` (its is_keyframe set), or drop it (counted)."""
        with self._cond:
            if self.wait:
                self._cond.wait_for(lambda: len(self._units) < self.capacity or self._released)
                if self._released:
                    return
            self.put_count += 1
            if self._skipping and not unit.is_keyframe:
                if self._skipping_late:
                    self.late += 1
                else:
                    self.dropped += 1
                return
            self._skipping = self._skipping_late = False
            if len(self._units) >= self.capacity:
                self.dropped += len(self._units)
                self._units.clear()
                if not unit.is_keyframe:
                    self.dropped += 1
                    self._skipping, self._skipping_late = True, False
                    return
            self._units.append((unit, time.monotonic()))
        if self._ready is not None:
            self._ready()

    def take(self) -> av.Packet | None:
        """On the loop: the oldest unit, or None."""
        taken = self.take_timed()
        return taken[0] if taken is not None else None

    def take_timed(self) -> tuple[av.Packet, float] | None:
        """On the loop: the oldest unit and the clock time it was put, or None."""
        with self._cond:
            if not self._units:
                return None
            unit, put_at = self._units.popleft()
            self.taken += 1
            if unit.is_keyframe:
                self.last_keyframe = unit
            self._cond.notify()
            return unit, put_at

    def resume_at_keyframe(self) -> None:
        """Drop what is queued and what follows, up to the next keyframe."""
        with self._cond:
            self.dropped += len(self._units)
            self._units.clear()
            self._skipping_late = self._skipping and self._skipping_late  # late already
            self._skipping = True
            self._cond.notify_all()

    def release(self) -> None:
        """Any thread: put() never waits from now on (nobody takes units any more)."""
        with self._cond:
            self._released = True
            self._cond.notify_all()
