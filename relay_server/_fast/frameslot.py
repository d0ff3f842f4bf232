"""Latest-wins hand-off of pooled frame buffers: the compiled build (Cython, pure-Python mode).

Same behaviour as _frameslot_py.py, the plain reference (see it for the buffer life cycle). What
compiling buys: C counters and list operations with no lock. The GIL is the mutex: compiled code
keeps it through each method, except while the factory or a callback runs, and those run only when
the state is consistent.
"""

from types import GenericAlias

import cython


@cython.cclass
class FrameSlot:
    __class_getitem__ = classmethod(GenericAlias)

    def __init__(self, factory: object, max_buffers: cython.Py_ssize_t = 3) -> None:
        if max_buffers <= 0:
            raise ValueError(f"max_buffers must be positive, got {max_buffers}")
        self._factory = factory
        self.max_buffers = max_buffers
        self._pool = []

    def acquire(self) -> object:
        """A buffer to fill: a free one, a new one, or else the unread published one (dropping it)."""
        if self._pool:
            return self._pool.pop()
        if self.buffers == self.max_buffers:
            buf: object = self._pending
            if buf is not None:
                self._pending = None
                self.dropped += 1
            return buf
        self.buffers += 1  # reserved: the factory is Python code, other threads may run meanwhile
        try:
            return self._factory()
        except BaseException:
            self.buffers -= 1
            raise

    def publish(self, buf: object) -> None:
        old: object = self._pending
        self._pending = buf
        self.published += 1
        if old is not None:
            self._pool.append(old)
            self.dropped += 1
        if self._on_ready is not None:
            self._on_ready()

    def drop(self) -> None:
        """Count a frame the producer could not place (acquire() returned None)."""
        self.dropped += 1

    def set_ready_callback(self, callback: object) -> None:
        self._on_ready = callback

    def take(self) -> object:
        buf: object = self._pending
        if buf is not None:
            self._pending = None
            self.taken += 1
        return buf

    def release(self, buf: object) -> None:
        """Return a taken buffer to the pool; each taken buffer exactly once."""
        self._pool.append(buf)

    @property
    def free(self) -> int:
        return len(self._pool)
