"""ChunkQueue: bytes from the event loop to a reading thread, on both builds."""

from __future__ import annotations

import asyncio
import faulthandler
import io
import os
import random
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import av
import numpy as np
import pytest

TIMEOUT = 10.0  # seconds a thread or event may take before the test fails; a bound, never an ordering


class Reader(threading.Thread):
    """Calls queue.read(n) once; `done` is set when it has returned or raised."""

    def __init__(self, queue: Any, n: int = -1) -> None:
        super().__init__(daemon=True)
        self.queue, self.n = queue, n
        self.done = threading.Event()
        self.result: bytes | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.queue.read(self.n)
        except BaseException as exc:
            self.error = exc
        finally:
            self.done.set()


def start_blocked_reader(queue: Any) -> Reader:
    """A Reader that is asleep in read(); `waiting` turns true only once it has given up the GIL."""
    reader = Reader(queue)
    reader.start()
    deadline = time.monotonic() + TIMEOUT
    while not queue.waiting:
        assert time.monotonic() < deadline, "the reader never blocked"
    return reader


@pytest.fixture
def watchdog(capfd: pytest.CaptureFixture[str]) -> Iterator[None]:
    """Ends the run, printing every thread's stack, if the test is still going after TIMEOUT.

    For hangs that stop every Python thread (a thread sleeping with the GIL), which only a C-level
    watchdog survives; it writes to the real stderr, as pytest's capture would lose the output.
    """
    with capfd.disabled():
        stderr = os.dup(2)
    faulthandler.dump_traceback_later(TIMEOUT, exit=True, file=stderr)
    yield
    faulthandler.cancel_dump_traceback_later()
    os.close(stderr)


@pytest.fixture(scope="module")
def ts_clip() -> tuple[bytes, int]:
    """A short H.264 MPEG-TS clip made with PyAV, and its frame count."""
    width, height, frames = 320, 240, 48
    base = np.random.default_rng(0).integers(0, 256, (height, width, 3), np.uint8)
    out = io.BytesIO()
    with av.open(out, "w", format="mpegts") as container:
        stream = container.add_stream("libx264", rate=24, options={"preset": "ultrafast", "g": "12"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index in range(frames):
            frame = av.VideoFrame.from_ndarray(np.roll(base, 4 * index, axis=1), format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return out.getvalue(), frames


def test_round_trip_through_a_reading_thread(impl: SimpleNamespace) -> None:
    rng = random.Random(1)
    payload = rng.randbytes(3_000_000)
    chunks: list[bytes | bytearray | memoryview] = []
    offset = 0
    while offset < len(payload):
        size = rng.choice([1, rng.randrange(1, 1000), rng.randrange(1, 200_000)])
        piece = payload[offset : offset + size]
        chunks.append(rng.choice([bytes, bytearray, memoryview])(piece))
        offset += size
    queue = impl.ChunkQueue(256 * 1024)
    writable = threading.Event()
    queue.set_writable_callback(writable.set)
    pieces: list[bytes] = []

    def read_all() -> None:
        while piece := queue.read(rng.choice([-1, 1, 1000, 65536, 1 << 20])):
            pieces.append(piece)

    reader = threading.Thread(target=read_all, daemon=True)
    reader.start()
    for chunk in chunks:
        if queue.put(chunk):
            assert writable.wait(TIMEOUT)
            writable.clear()
    queue.close()
    reader.join(TIMEOUT)
    assert not reader.is_alive()
    assert {type(piece) for piece in pieces} == {bytes}
    assert b"".join(pieces) == payload
    assert queue.bytes_in == queue.bytes_out == len(payload)
    assert queue.size == queue.chunk_count == 0


async def test_pyav_demuxes_and_decodes_from_the_queue(
    impl: SimpleNamespace, ts_clip: tuple[bytes, int]
) -> None:
    clip, frames = ts_clip
    queue = impl.ChunkQueue(128 * 1024)
    loop = asyncio.get_running_loop()
    writable = asyncio.Event()
    queue.set_writable_callback(lambda: loop.call_soon_threadsafe(writable.set))

    async def feed() -> None:
        for offset in range(0, len(clip), 64 * 1024):
            writable.clear()
            if queue.put(clip[offset : offset + 64 * 1024]):
                await writable.wait()
        queue.close()

    def decode() -> int:
        with av.open(queue, mode="r", format="mpegts") as container:
            return sum(1 for _ in container.decode(video=0))

    try:
        decoded, _ = await asyncio.wait_for(asyncio.gather(asyncio.to_thread(decode), feed()), TIMEOUT)
    finally:
        queue.abort()  # never leave the decode thread blocked if the test fails
    assert decoded == frames
    assert queue.bytes_out == len(clip)


def test_short_reads_and_no_copy(impl: SimpleNamespace) -> None:
    queue = impl.ChunkQueue(1024)
    first, second = b"abcdef", b"ghij"
    queue.put(first)
    queue.put(second)
    assert queue.read(2) == b"ab"
    assert queue.read(100) == b"cdef"  # the rest of the head chunk only: chunks are never joined
    assert queue.read(4) is second  # fits entirely: the very object that was put
    queue.put(first)
    assert queue.read() is first
    queue.put(first)
    assert queue.read(-1) is first
    queue.put(first)
    assert queue.read(1) == b"a"
    assert queue.read() == b"bcdef"
    assert queue.read(0) == b""  # does not block on an empty queue


def test_non_bytes_chunks_come_out_as_bytes(impl: SimpleNamespace) -> None:
    queue = impl.ChunkQueue(1024)
    words = np.arange(4, dtype=np.uint16)
    queue.put(bytearray(b"abc"))
    queue.put(memoryview(b"defg")[1:])
    queue.put(words)  # sized in bytes, not items
    assert queue.size == 3 + 3 + 8
    pieces = [queue.read(), queue.read(2), queue.read(), queue.read()]
    assert [type(piece) for piece in pieces] == [bytes] * 4
    assert b"".join(pieces) == b"abcefg" + words.tobytes()


def test_close_drains_then_ends(impl: SimpleNamespace) -> None:
    queue = impl.ChunkQueue(1024)
    queue.put(b"abc")
    queue.put(b"de")
    queue.close()
    assert queue.closed and not queue.aborted
    assert queue.read() == b"abc"
    assert queue.read() == b"de"
    assert queue.read() == b""
    assert queue.read(10) == b""


def test_close_wakes_a_blocked_reader(impl: SimpleNamespace) -> None:
    queue = impl.ChunkQueue(1024)
    reader = start_blocked_reader(queue)
    queue.close()
    assert reader.done.wait(TIMEOUT)
    assert reader.result == b"" and reader.error is None


def test_abort_wakes_a_blocked_reader(impl: SimpleNamespace) -> None:
    queue = impl.ChunkQueue(1024)
    reader = start_blocked_reader(queue)
    aborter = threading.Thread(target=queue.abort)
    aborter.start()
    assert reader.done.wait(TIMEOUT)
    aborter.join(TIMEOUT)
    assert isinstance(reader.error, impl.QueueAborted)
    assert isinstance(reader.error, EOFError)


def test_abort_drops_data_and_wakes_the_producer(impl: SimpleNamespace) -> None:
    queue = impl.ChunkQueue(4)
    calls: list[int] = []
    queue.set_writable_callback(lambda: calls.append(1))
    assert queue.put(b"abcd") is True
    queue.abort()
    assert calls == [1]
    assert queue.aborted and queue.size == 0 and queue.chunk_count == 0
    with pytest.raises(impl.QueueAborted):
        queue.read()
    with pytest.raises(ValueError):
        queue.put(b"x")
    queue.abort()
    assert calls == [1]


def test_writable_callback_fires_once_per_full_episode(impl: SimpleNamespace) -> None:
    queue = impl.ChunkQueue(10, low_water=4)
    threads: list[int] = []
    queue.set_writable_callback(lambda: threads.append(threading.get_ident()))
    assert queue.put(b"123456") is False
    assert queue.read(6) == b"123456"
    assert threads == []  # never full: nobody is waiting
    for episode in (1, 2):
        assert queue.put(b"123456") is False
        assert queue.put(b"789012") is True
        assert queue.put(b"abc") is True  # a producer ignoring the hint: still the same episode
        queue.read(6)  # 9 left
        queue.read(4)  # 5 left
        assert len(threads) == episode - 1
        queue.read(1)  # 4 left: low water
        assert len(threads) == episode
        while queue.size:
            queue.read()
        assert len(threads) == episode
    assert set(threads) == {threading.get_ident()}  # on the reading thread
    queue.set_writable_callback(None)
    queue.put(b"x" * 10)
    queue.read()


def test_put_after_close_raises(impl: SimpleNamespace) -> None:
    queue = impl.ChunkQueue(1024)
    queue.close()
    with pytest.raises(ValueError):
        queue.put(b"x")
    with pytest.raises(ValueError):
        queue.put(b"")


def test_empty_chunks_are_ignored_and_counters(impl: SimpleNamespace) -> None:
    queue = impl.ChunkQueue(8)
    assert queue.capacity == 8
    assert queue.put(b"") is False
    assert queue.chunk_count == 0
    queue.put(b"abc")
    queue.put(b"defgh")
    assert (queue.size, queue.chunk_count, queue.bytes_in, queue.bytes_out) == (8, 2, 8, 0)
    queue.read(2)
    assert (queue.size, queue.chunk_count, queue.bytes_in, queue.bytes_out) == (6, 2, 8, 2)
    queue.read()
    assert (queue.size, queue.chunk_count, queue.bytes_in, queue.bytes_out) == (5, 1, 8, 3)
    assert not queue.closed and not queue.aborted and not queue.waiting


@pytest.mark.parametrize(("capacity", "low_water"), [(0, None), (-1, None), (10, -1), (10, 10)])
def test_rejects_bad_sizes(impl: SimpleNamespace, capacity: int, low_water: int | None) -> None:
    with pytest.raises(ValueError):
        impl.ChunkQueue(capacity, low_water)


def test_a_blocked_reader_does_not_hold_the_gil(impl: SimpleNamespace, watchdog: None) -> None:
    queue = impl.ChunkQueue(1024)
    counted = threading.Event()

    def count() -> None:
        n = 0
        while n < 100_000:
            n += 1
        counted.set()

    reader = start_blocked_reader(queue)  # with the GIL held asleep, this would never return
    threading.Thread(target=count, daemon=True).start()
    assert counted.wait(TIMEOUT)
    assert queue.waiting and not reader.done.is_set()  # the count ran while the reader slept
    queue.put(b"x")
    assert reader.done.wait(TIMEOUT)
    assert reader.result == b"x"
