"""FrameQueue: decoded frames from the decode thread to the sender, in order, bounded.

    decode thread ─put(frame)─▶ deque of pooled copies (≤ capacity) ─▶ await next() on the loop
                  └AccessUnits (zero-transcode: the input's own units)─┘   (the older head first)

Every frame goes to the sender in input order: the sender asks the session timeline what to do
with each (send it at its media time, or let it go because it is a join backlog or past the
latency budget), so a burst of frames is smoothed rather than thinned. Frames are copied into
pooled buffers (_fast.copy_frame): the decoder's own frames are free the moment put() returns and
the steady state allocates nothing. A queue that reaches `capacity` (the sender is held up for
longer than any budget) lets its oldest frame go, counted in `dropped`.

The consumer also wants the frame it had before when nothing new comes in time (the processor must
keep seeing frames while the input stalls): next(repeat_after) gives the current one again.

The decode thread may forward the input's encoded access units as they are (AccessUnits,
units.py), switching between the two at keyframes. Whichever queue's head is older (by pts) goes
first: frames decoded before forwarding began, and units queued before decoding resumed, are
older than what follows them.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from typing import NamedTuple

import av

from relay_server._fast import copy_frame
from relay_server.media.units import AccessUnits

# Frames waiting for the sender: about a second at 30 fps, more than the latency budget lets
# wait; live, the sender holds one or two.
CAPACITY = 32


class Taken(NamedTuple):
    item: av.VideoFrame | av.Packet
    fresh: bool  # False: the current one again (the input stalled)
    ready: float  # clock time the decode thread handed it over


class FrameQueue:
    """Hand-off of width×height yuv420p frames (the Scaler's output), in order.

    put() is called on the decode thread; next(), first(), end() and close() on one event loop.
    The frame next() returns stays valid until the following next() or close().

    With `wait=True` nothing is dropped: put() waits (on the decode thread) while a frame is still
    waiting for the consumer, so decoding goes at the consumer's pace. That is for catch-up (a
    sender that does not pace by media time). release() ends such waits for good.
    """

    def __init__(
        self,
        width: int,
        height: int,
        *,
        capacity: int = CAPACITY,
        wait: bool = False,
        units: AccessUnits | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.width = width
        self.height = height
        self.capacity = capacity
        self.wait = wait
        self.units = units
        self.put_count = 0  # frames handed over by the decode thread
        self.dropped = 0  # oldest frames let go: the queue was full
        self.reformatted = 0  # frames not at the hand-off's size or format, converted first
        self.ended = False  # end() was called: nothing will follow what is queued
        self._cond = threading.Condition()
        self._frames: deque[tuple[av.VideoFrame, float]] = deque()
        self._free: list[av.VideoFrame] = []
        self._released = False
        self._current: av.VideoFrame | None = None  # the frame the consumer took last
        self._unit_last = False  # the last thing next() gave was an access unit
        self._loop: asyncio.AbstractEventLoop | None = None  # the consumer's
        self._ready = asyncio.Event()
        self._arrived = False  # a frame or unit was ever put
        if units is not None:
            units.set_ready_callback(self._wake)

    def __len__(self) -> int:
        return len(self._frames)

    @property
    def current(self) -> av.VideoFrame | av.Packet | None:
        """What a repeat would give: the frame the consumer took last, or the last keyframe unit
        when it took a unit last; None before either."""
        if self._unit_last and self.units is not None:
            return self.units.last_keyframe
        return self._current

    def put(self, frame: av.VideoFrame) -> None:
        """On the decode thread: queue a copy of `frame` (its pixels, pts and time base)."""
        ready = time.monotonic()
        with self._cond:
            if self.wait:
                self._cond.wait_for(lambda: not self._frames or self._released)
                if self._released:
                    return
            buffer = self._free.pop() if self._free else None
        width, height = self.width, self.height
        if buffer is not None and (buffer.width, buffer.height) != (width, height):
            buffer = None  # taken as the size changed
        if (frame.format.name, frame.width, frame.height) != ("yuv420p", width, height):
            frame = frame.reformat(width, height, "yuv420p")
            self.reformatted += 1
        if buffer is None:
            buffer = av.VideoFrame(width, height, "yuv420p")
        copy_frame(frame, buffer)
        with self._cond:
            self.put_count += 1
            if len(self._frames) >= self.capacity:
                oldest, _ = self._frames.popleft()
                self._free.append(oldest)
                self.dropped += 1
            self._frames.append((buffer, ready))
        self._wake()

    def resize(self, width: int, height: int) -> None:
        """Frames are width×height from now on (any thread); those queued go as they are."""
        with self._cond:
            self.width, self.height = width, height
            self._free.clear()  # buffers of the old size

    async def first(self) -> None:
        """Wait until the first frame or unit has been put, or the input has ended."""
        self._loop = asyncio.get_running_loop()  # before the look: a later put must wake it
        while not (self._arrived or self.ended):
            self._ready.clear()
            if self._arrived or self.ended:
                break
            await self._ready.wait()

    def end(self) -> None:
        """On the loop: the input has ended. next() returns what is left, then None at once."""
        self.ended = True
        self._ready.set()

    async def next(self, repeat_after: float | None = None) -> Taken | None:
        """The oldest frame or unit waiting; after `repeat_after` seconds without one, the current
        one again (a unit: the last keyframe, and the units resume at the next one); None if
        nothing ever came, or once the input has ended and nothing is left."""
        self._loop = asyncio.get_running_loop()  # before the take: a later put must wake it
        fresh = self._take()
        if fresh is None:
            if self.ended:
                return None
            try:
                async with asyncio.timeout(repeat_after):
                    while fresh is None:
                        # Clear, then look: a put after the look sets the event again.
                        self._ready.clear()
                        fresh = self._take()
                        if fresh is None:
                            if self.ended:
                                return None
                            await self._ready.wait()
            except TimeoutError:
                again = self.current
                if again is not None and self._unit_last and self.units is not None:
                    self.units.resume_at_keyframe()
                return None if again is None else Taken(again, False, time.monotonic())
        return fresh

    def _take(self) -> Taken | None:
        units = self.units
        head = units.head if units is not None else None
        with self._cond:
            older_frame = bool(self._frames) and (head is None or _pts(self._frames[0][0]) < _pts(head))
            if older_frame:
                frame, ready = self._frames.popleft()
                if self._current is not None:
                    self._free.append(self._current)
                self._current = frame
                self._unit_last = False
                self._cond.notify()
                return Taken(frame, True, ready)
        taken = units.take_timed() if units is not None and head is not None else None
        if taken is None:
            return None
        self._unit_last = True
        return Taken(taken[0], True, taken[1])

    def release(self) -> None:
        """Any thread: put() returns at once from now on (nobody takes frames any more)."""
        with self._cond:
            self._released = True
            self._cond.notify_all()
        if self.units is not None:
            self.units.release()

    def close(self) -> None:
        """Give every buffer back; the hand-off can be used again afterwards."""
        with self._cond:
            if self._current is not None:
                self._free.append(self._current)
                self._current = None
            self._free.extend(frame for frame, _ in self._frames)
            self._frames.clear()

    def _wake(self) -> None:
        # On the decode thread after each put: wake a waiting next() or first(). Before the
        # consumer's first call nobody waits, and that call looks before it waits.
        self._arrived = True
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits any more
                loop.call_soon_threadsafe(self._ready.set)


def _pts(item: av.VideoFrame | av.Packet) -> int:
    return item.pts if item.pts is not None else 0
