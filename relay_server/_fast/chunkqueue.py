"""Bytes from the event loop to a reading thread: the compiled build (Cython, pure-Python mode).

Same behaviour as _chunkqueue_py.py, the plain reference. What compiling buys: the reader sleeps on
a C-level semaphore with the GIL released instead of a threading.Condition (which allocates a lock
per wait), and there is no mutex at all. The GIL is the mutex: compiled code keeps it from the start
of a method to its end except around the reader's sleep, and no Python code runs between a check and
the update that depends on it (callbacks run last, on consistent state). One reader at a time.
"""

from collections import deque

import cython
from cython.cimports.cpython.pythread import (
    NOWAIT_LOCK,
    WAIT_LOCK,
    PyThread_acquire_lock,
    PyThread_allocate_lock,
    PyThread_free_lock,
    PyThread_release_lock,
    PyThread_type_lock,
)

from ._chunkqueue_py import QueueAborted


@cython.cclass
class ChunkQueue:
    def __cinit__(self) -> None:
        self._wakeup = PyThread_allocate_lock()
        if self._wakeup == cython.NULL:
            raise MemoryError()
        PyThread_acquire_lock(self._wakeup, NOWAIT_LOCK)

    def __dealloc__(self) -> None:
        if self._wakeup != cython.NULL:
            # No reader is asleep (it would hold a reference), so no wake-up is pending and the
            # lock is held: unlock it before freeing, as CPython's own lock objects do.
            PyThread_release_lock(self._wakeup)
            PyThread_free_lock(self._wakeup)

    def __init__(self, capacity: cython.Py_ssize_t, low_water: object = None) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        low: cython.Py_ssize_t = capacity // 2
        if low_water is not None:
            low = low_water
        if not 0 <= low < capacity:
            raise ValueError(f"low_water must be in [0, {capacity}), got {low}")
        self.capacity = capacity
        self._low_water = low
        self._chunks = deque()

    def put(self, chunk: object) -> bool:
        """Queue `chunk` (by reference); True when the queue is full and the producer should wait."""
        # Before any check: making a memoryview can run the GC, and with it other threads.
        data: object = chunk if type(chunk) is bytes else memoryview(chunk).cast("B")
        if self.closed or self.aborted:
            raise ValueError("put() on a closed ChunkQueue")
        length: cython.Py_ssize_t = len(data)
        if length:
            self._chunks.append(data)
            self.size += length
            self.bytes_in += length
            self._wake()
        if self.size < self.capacity:
            return False
        self._full = True
        return True

    def set_writable_callback(self, callback: object) -> None:
        self._on_writable = callback

    def close(self) -> None:
        self.closed = True
        self._wake()

    def abort(self) -> None:
        self.aborted = True
        self._chunks.clear()
        self._head = 0
        self.size = 0
        self._wake()
        # A producer told to wait must not wait forever; put() now raises, which tells it why.
        if self._full:
            self._full = False
            if self._on_writable is not None:
                self._on_writable()

    def read(self, n: cython.Py_ssize_t = -1) -> bytes:
        """At most `n` bytes (n < 0: the rest of the head chunk); b"" at the end of the stream."""
        if n == 0:
            return b""
        wakeup: PyThread_type_lock = self._wakeup
        while True:
            if self.aborted:
                raise QueueAborted("ChunkQueue aborted")
            if self.size:
                break
            if self.closed:
                return b""
            self.waiting = True
            with cython.nogil:
                PyThread_acquire_lock(wakeup, WAIT_LOCK)
        head: object = self._chunks[0]
        start: cython.Py_ssize_t = self._head
        end: cython.Py_ssize_t = len(head)
        if 0 < n < end - start:
            end = start + n
        piece: bytes
        if type(head) is bytes:
            piece = head if start == 0 and end == len(head) else cython.cast(bytes, head)[start:end]
        else:
            piece = bytes(head[start:end])
            # Slicing a memoryview can run the GC and so other threads: an abort may have cleared
            # the queue meanwhile (putting only appends, so the head is otherwise untouched).
            if self.aborted:
                raise QueueAborted("ChunkQueue aborted")
        if end == len(head):
            self._chunks.popleft()
            self._head = 0
        else:
            self._head = end
        self.size -= end - start
        self.bytes_out += end - start
        if self._full and self.size <= self._low_water:
            self._full = False
            if self._on_writable is not None:
                self._on_writable()
        return piece

    @cython.cfunc
    @cython.exceptval(check=False)
    def _wake(self) -> cython.void:
        if self.waiting:
            self.waiting = False
            PyThread_release_lock(self._wakeup)

    @property
    def chunk_count(self) -> int:
        return len(self._chunks)
