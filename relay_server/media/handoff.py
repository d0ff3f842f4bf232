"""LatestFrame: decoded frames from the decode thread to the event loop, newest wins.

    decode thread ─put(frame)─▶ FrameSlot (pooled copies) ─▶ await next(timeout) on the loop
                  └put(unit)──▶ AccessUnits (in order) ──┘   (zero-transcode: encoded units)

The consumer (the paced sender) wants the newest frame whenever it is ready for one, and the
frame it had before when nothing new came in time (the processor must keep seeing frames while
the input stalls). Frames are copied into a few pooled buffers (_fast.copy_frame), so the steady
state allocates nothing and the decoder's own frames are free the moment put() returns. A frame
replaced before the consumer took it is counted in `dropped`.

The decode thread may also forward the input's encoded access units as they are (AccessUnits,
units.py), switching between the two at keyframes. next() gives the units first: a decoded frame
still waiting when a unit comes is older than it (decoding stopped where forwarding began), so it
is dropped; units still queued when decoding resumes are older than its frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

import av

from relay_server._fast import FrameSlot, copy_frame
from relay_server.media.units import AccessUnits

# One buffer being filled by the decode thread, one waiting in the slot, one being sent.
BUFFERS = 3


class LatestFrame:
    """Hand-off of width×height yuv420p frames (the Scaler's output) with latest-wins semantics.

    put() is called on the decode thread; next(), end() and close() on one event loop.
    The frame next() returns stays valid until the following next() or close().

    With `wait=True` nothing is dropped: put() waits (on the decode thread) while a frame is
    still waiting for the consumer, so decoding goes at the consumer's pace. That is for catch-up
    (a sender that does not pace by media time): decoding frames only to replace them would
    spend the CPU the sender needs. release() ends such waits for good.
    """

    def __init__(
        self, width: int, height: int, *, wait: bool = False, units: AccessUnits | None = None
    ) -> None:
        self.width = width
        self.height = height
        self.wait = wait
        self.units = units
        self._unit_last = False  # the last thing next() gave was an access unit
        self._stale = 0  # frames dropped because a unit came after them
        self._room = threading.Condition()  # wait=True: the consumer took the waiting frame
        self._released = False
        self._slot: FrameSlot[av.VideoFrame] = FrameSlot(self._new_buffer, BUFFERS)
        self._loop: asyncio.AbstractEventLoop | None = None  # the consumer's, from its first next()
        self._ready = asyncio.Event()
        self._slot.set_ready_callback(self._wake)
        if units is not None:
            units.set_ready_callback(self._wake)
        self._current: av.VideoFrame | None = None
        self.ended = False  # end() was called: no frame will follow the newest one
        self.reformatted = 0  # frames not at the hand-off's size or format, converted first
        self._unplaced = 0  # frames dropped in put() for want of a buffer

    def _new_buffer(self) -> av.VideoFrame:
        return av.VideoFrame(self.width, self.height, "yuv420p")

    @property
    def published(self) -> int:
        return self._slot.published

    @property
    def dropped(self) -> int:
        """Frames replaced by a newer one (or a unit) before the consumer took them."""
        return self._slot.dropped + self._stale

    @property
    def pending(self) -> bool:
        """A frame is waiting for the consumer."""
        # Every published frame is taken, dropped (replaced) or waiting; an unplaced frame was
        # dropped without being published.
        slot = self._slot
        return slot.published - slot.taken - (slot.dropped - self._unplaced) > 0

    @property
    def current(self) -> av.VideoFrame | av.Packet | None:
        """What a repeat would give: the frame the consumer took last, or the last keyframe unit
        when it took a unit last; None before either."""
        if self._unit_last and self.units is not None:
            return self.units.last_keyframe
        return self._current

    def put(self, frame: av.VideoFrame) -> None:
        """On the decode thread: make `frame` (its pixels, pts and time base) the newest."""
        if self.wait:
            with self._room:
                self._room.wait_for(lambda: not self.pending or self._released)
                if self._released:
                    return
        if (frame.format.name, frame.width, frame.height) != ("yuv420p", self.width, self.height):
            frame = frame.reformat(self.width, self.height, "yuv420p")
            self.reformatted += 1
        buf = self._slot.acquire()
        if buf is None:  # every buffer is in use (cannot happen with one consumer): count it
            self._unplaced += 1
            self._slot.drop()
            return
        copy_frame(frame, buf)
        self._slot.publish(buf)

    def end(self) -> None:
        """On the loop: the input has ended. next() returns what is left, then None at once."""
        self.ended = True
        self._ready.set()

    async def next(self, repeat_after: float | None = None) -> tuple[av.VideoFrame | av.Packet, bool] | None:
        """The next access unit or the newest frame, and True; after `repeat_after` seconds
        without either, the current one again and False (a unit: the last keyframe, and the
        units resume at the next one); None if nothing ever came, or once the input has ended."""
        self._loop = asyncio.get_running_loop()  # before the take: a later publish must wake it
        fresh = self._take()
        if fresh is None:
            if self.ended:
                return None
            try:
                async with asyncio.timeout(repeat_after):
                    while fresh is None:
                        # Clear, then look: a publish after the look sets the event again.
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
                return None if again is None else (again, False)
        return fresh, True

    def _take(self) -> av.VideoFrame | av.Packet | None:
        units = self.units
        unit = units.take() if units is not None else None
        if unit is not None:
            if self.pending:
                stale = self._slot.take()
                if stale is not None:
                    self._slot.release(stale)
                    self._stale += 1
                    self._room_taken()
            self._unit_last = True
            return unit
        fresh = self._slot.take()
        if fresh is None:
            return None
        if self._current is not None:
            self._slot.release(self._current)
        self._current = fresh
        self._unit_last = False
        self._room_taken()
        return fresh

    def _room_taken(self) -> None:
        if self.wait:
            with self._room:
                self._room.notify()

    def release(self) -> None:
        """Any thread: put() returns at once from now on (nobody takes frames any more)."""
        with self._room:
            self._released = True
            self._room.notify_all()
        if self.units is not None:
            self.units.release()

    def close(self) -> None:
        """Give the current frame back; the hand-off can be used again afterwards."""
        if self._current is not None:
            self._slot.release(self._current)
            self._current = None

    def _wake(self) -> None:
        # On the decode thread after each publish: wake a waiting next(). Before the first
        # next() nobody waits, and that next() takes the frame without waiting.
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits any more
                loop.call_soon_threadsafe(self._ready.set)
