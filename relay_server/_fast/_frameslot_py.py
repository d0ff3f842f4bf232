"""Latest-wins hand-off of pooled frame buffers: the plain-Python reference build.

frameslot.py is the compiled build with the same behaviour. The producer (decode thread) fills a
buffer from acquire() and publishes it; the consumer (event loop) takes the newest one and releases
it when done. A buffer is always in exactly one place: the free pool, the producer's hands, the
slot (published, not yet taken) or the consumer's hands. At most `max_buffers` are ever made, so in
steady state nothing is allocated; when the consumer is slower, the frame in the slot is the one
that goes, and `dropped` counts it.
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
        self._pending: T | None = None
        self._on_ready: Callable[[], Any] | None = None
        self._buffers = 0
        self._published = 0
        self._taken = 0
        self._dropped = 0
        self._lock = threading.Lock()

    def acquire(self) -> T | None:
        """A buffer to fill: a free one, a new one, or else the unread published one (dropping it)."""
        with self._lock:
            if self._pool:
                return self._pool.pop()
            if self._buffers == self._max_buffers:
                buf, self._pending = self._pending, None
                if buf is not None:
                    self._dropped += 1
                return buf
            self._buffers += 1  # reserved: the factory runs outside the lock
        try:
            return self._factory()
        except BaseException:
            with self._lock:
                self._buffers -= 1
            raise

    def publish(self, buf: T) -> None:
        """Make `buf` the newest frame; an older one not yet taken goes back to the pool, dropped."""
        with self._lock:
            old, self._pending = self._pending, buf
            self._published += 1
            if old is not None:
                self._pool.append(old)
                self._dropped += 1
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
        """The newest published buffer, now the consumer's, or None if nothing new since last time."""
        with self._lock:
            buf, self._pending = self._pending, None
            if buf is not None:
                self._taken += 1
            return buf

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
