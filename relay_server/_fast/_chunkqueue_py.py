"""Bytes from the event loop to a reading thread: the plain-Python reference build.

chunkqueue.py is the compiled build with the same behaviour; both are tested against each other.
The producer (event loop) appends chunks without blocking and learns from put()'s result when to
wait; the reader (PyAV's read callback in the decode thread) blocks in read() until a chunk, the end
of the stream or an abort arrives. One reader at a time.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any


class QueueAborted(EOFError):
    """read() on a ChunkQueue that was aborted: the stream ended without its remaining bytes."""


class ChunkQueue:
    def __init__(self, capacity: int, low_water: int | None = None) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        low_water = capacity // 2 if low_water is None else low_water
        if not 0 <= low_water < capacity:
            raise ValueError(f"low_water must be in [0, {capacity}), got {low_water}")
        self._capacity = capacity
        self._low_water = low_water
        # bytes for the common case, otherwise a byte-format memoryview of what was put.
        self._chunks: deque[bytes | memoryview] = deque()
        self._head = 0  # bytes of the head chunk already read
        self._size = 0
        self._bytes_in = 0
        self._bytes_out = 0
        self._closed = False
        self._aborted = False
        self._waiting = False  # the reader sleeps in read() and nobody has woken it yet
        self._full = False  # put() returned True and the writable callback has not fired since
        self._on_writable: Callable[[], Any] | None = None
        self._lock = threading.Lock()
        self._readable = threading.Condition(self._lock)

    def put(self, chunk: bytes | bytearray | memoryview) -> bool:
        """Queue `chunk` (by reference); True when the queue is full and the producer should wait."""
        data = chunk if type(chunk) is bytes else memoryview(chunk).cast("B")
        with self._lock:
            if self._closed or self._aborted:
                raise ValueError("put() on a closed ChunkQueue")
            if length := len(data):
                self._chunks.append(data)
                self._size += length
                self._bytes_in += length
                self._wake()
            if self._size < self._capacity:
                return False
            self._full = True
            return True

    def set_writable_callback(self, callback: Callable[[], Any] | None) -> None:
        """Call `callback` once the producer may put again: on the reading thread when a read takes
        the size down to low_water after put() returned True (once per such episode), or in abort().

        It runs with the GIL held and no lock taken; what it raises, read() raises.
        """
        self._on_writable = callback

    def close(self) -> None:
        """End of stream: read() returns what is left, then b""."""
        with self._lock:
            self._closed = True
            self._wake()

    def abort(self) -> None:
        """Drop what is queued; read() raises QueueAborted at once, also in a reader asleep in it."""
        with self._lock:
            self._aborted = True
            self._chunks.clear()
            self._head = 0
            self._size = 0
            self._wake()
            fire, self._full = self._full, False
        # A producer told to wait must not wait forever; put() now raises, which tells it why.
        if fire and (callback := self._on_writable) is not None:
            callback()

    def read(self, n: int = -1) -> bytes:
        """At most `n` bytes (n < 0: the rest of the head chunk); b"" at the end of the stream."""
        if n == 0:
            return b""
        with self._lock:
            while True:
                if self._aborted:
                    raise QueueAborted("ChunkQueue aborted")
                if self._size:
                    break
                if self._closed:
                    return b""
                self._waiting = True
                self._readable.wait()
            head = self._chunks[0]
            start = self._head
            count = len(head) - start
            if 0 < n < count:
                count = n
            if type(head) is bytes:
                piece = head if count == len(head) else head[start : start + count]
            else:
                piece = bytes(head[start : start + count])
            self._head = start + count
            if self._head == len(head):
                self._chunks.popleft()
                self._head = 0
            self._size -= count
            self._bytes_out += count
            fire = self._full and self._size <= self._low_water
            if fire:
                self._full = False
        if fire and (callback := self._on_writable) is not None:
            callback()
        return piece

    def _wake(self) -> None:
        # Caller holds the lock.
        if self._waiting:
            self._waiting = False
            self._readable.notify()

    @property
    def size(self) -> int:
        return self._size

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def chunk_count(self) -> int:
        return len(self._chunks)

    @property
    def bytes_in(self) -> int:
        return self._bytes_in

    @property
    def bytes_out(self) -> int:
        return self._bytes_out

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def aborted(self) -> bool:
        return self._aborted

    @property
    def waiting(self) -> bool:
        """A reader is blocked in read() for want of data: the decoder is starved."""
        return self._waiting
