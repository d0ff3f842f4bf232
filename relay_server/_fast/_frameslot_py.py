"""Hand-off of pooled frame buffers, in order: the plain-Python reference build.

frameslot.py is the compiled build with the same behaviour. The producer (decode thread) fills a
buffer from acquire() and publishes it; the consumer (event loop) takes the oldest published one
and releases it when done. A buffer is always in exactly one place: the free pool, the producer's
hands, waiting (published, not yet taken) or the consumer's hands. At most `max_buffers` are ever
made, so in steady state nothing is allocated. When every buffer is in use, the producer gets the
oldest waiting frame's buffer back, and `dropped` counts that frame: the newest frames wait, as many
as the buffers the consumer does not hold.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class FrameSlot(Generic[T]):
    def __init__(self, factory: Callable[[], T], max_buffers: int = 3) -> None:
        if max_buffers <= 0:
            raise ValueError(f"max_buffers must be positive, got {max_buffers}")
        self._factory = factory
        self._max_buffers = max_buffers
        self._pool: list[T] = []
        self._waiting: list[T] = []  # published, oldest first
        self._on_ready: Callable[[], Any] | None = None
        self._buffers = 0
        self._published = 0
        self._taken = 0
        self._dropped = 0
        self._lock = threading.Lock()

    def acquire(self) -> T | None:
        """A buffer to fill: a free one, a new one, or else the oldest waiting one (dropping its
        frame); None if the consumer holds every buffer."""
        with self._lock:
            if self._pool:
                return self._pool.pop()
            if self._buffers == self._max_buffers:
                if not self._waiting:
                    return None
                self._dropped += 1
                return self._waiting.pop(0)
            self._buffers += 1  # reserved: the factory runs outside the lock
        try:
            return self._factory()
        except BaseException:
            with self._lock:
                self._buffers -= 1
            raise

    def publish(self, buf: T) -> None:
        """Put `buf` behind the frames waiting."""
        with self._lock:
            self._waiting.append(buf)
            self._published += 1
        if (callback := self._on_ready) is not None:
            callback()

    def drop(self) -> None:
        """Count a frame the producer could not place (acquire() returned None)."""
        with self._lock:
            self._dropped += 1

    def set_ready_callback(self, callback: Callable[[], Any] | None) -> None:
        """Call `callback` on the producer's thread after each publish()."""
        self._on_ready = callback

    def take(self) -> T | None:
        """The oldest waiting buffer, now the consumer's, or None if none is waiting."""
        with self._lock:
            if not self._waiting:
                return None
            self._taken += 1
            return self._waiting.pop(0)

    def release(self, buf: T) -> None:
        """Return a taken buffer to the pool; each taken buffer exactly once."""
        with self._lock:
            self._pool.append(buf)

    @property
    def max_buffers(self) -> int:
        return self._max_buffers

    @property
    def published(self) -> int:
        return self._published

    @property
    def taken(self) -> int:
        return self._taken

    @property
    def dropped(self) -> int:
        return self._dropped

    @property
    def buffers(self) -> int:
        return self._buffers

    @property
    def free(self) -> int:
        return len(self._pool)

    @property
    def waiting(self) -> int:
        return len(self._waiting)
