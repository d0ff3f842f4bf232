"""FrameSlot: latest-wins hand-off of pooled buffers, on both builds."""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

import pytest

TIMEOUT = 10.0  # seconds a thread or event may take before the test fails; a bound, never an ordering


class Pool:
    """A factory that records every buffer it makes; a buffer is a one-item list (a frame number)."""

    def __init__(self) -> None:
        self.made: list[list[int]] = []

    def __call__(self) -> list[int]:
        self.made.append([0])
        return self.made[-1]


def make_slot(impl: SimpleNamespace, max_buffers: int = 3) -> tuple[Any, Pool]:
    pool = Pool()
    return impl.FrameSlot(pool, max_buffers), pool


def test_latest_wins(impl: SimpleNamespace) -> None:
    slot, pool = make_slot(impl)
    assert slot.take() is None
    first = slot.acquire()
    slot.publish(first)
    second = slot.acquire()
    assert second is not first
    slot.publish(second)  # the first was never taken: it goes back to the pool, dropped
    assert (slot.published, slot.dropped, slot.free) == (2, 1, 1)
    assert slot.take() is second
    assert slot.take() is None  # nothing new since
    assert slot.taken == 1
    slot.release(second)
    assert slot.free == 2 and slot.buffers == 2 == len(pool.made)


def test_steady_state_reuses_one_buffer(impl: SimpleNamespace) -> None:
    slot, pool = make_slot(impl)
    for number in range(100):
        buf = slot.acquire()
        buf[0] = number
        slot.publish(buf)
        taken = slot.take()
        assert taken is buf and taken[0] == number
        slot.release(taken)
    assert len(pool.made) == slot.buffers == 1
    assert (slot.published, slot.taken, slot.dropped, slot.free) == (100, 100, 0, 1)


def test_acquire_reclaims_the_unread_frame_when_nothing_is_free(impl: SimpleNamespace) -> None:
    slot, pool = make_slot(impl, max_buffers=2)
    slot.publish(slot.acquire())
    held = slot.take()  # the consumer holds one buffer
    unread = slot.acquire()
    slot.publish(unread)
    assert slot.acquire() is unread  # no free buffer and no room for a new one
    assert slot.dropped == 1 and slot.take() is None
    assert len(pool.made) == 2
    assert held is not unread


def test_acquire_returns_none_when_the_consumer_holds_every_buffer(impl: SimpleNamespace) -> None:
    slot, _ = make_slot(impl, max_buffers=2)
    held = []
    for _ in range(2):
        slot.publish(slot.acquire())
        held.append(slot.take())
    assert slot.acquire() is None
    slot.drop()
    assert slot.dropped == 1
    slot.release(held[0])
    assert slot.acquire() is held[0]


def test_ready_callback_fires_on_each_publish(impl: SimpleNamespace) -> None:
    slot, _ = make_slot(impl)
    calls: list[int] = []
    slot.set_ready_callback(lambda: calls.append(slot.published))
    for _ in range(3):
        slot.publish(slot.acquire())
    assert calls == [1, 2, 3]
    slot.set_ready_callback(None)
    slot.publish(slot.acquire())
    assert calls == [1, 2, 3]


def test_a_failing_factory_does_not_use_up_a_buffer(impl: SimpleNamespace) -> None:
    calls = []

    def factory() -> list[int]:
        calls.append(1)
        if len(calls) == 1:
            raise MemoryError("first allocation fails")
        return [0]

    slot = impl.FrameSlot(factory, 1)
    with pytest.raises(MemoryError):
        slot.acquire()
    assert slot.buffers == 0
    assert slot.acquire() == [0]
    assert slot.buffers == 1


def test_rejects_no_buffers(impl: SimpleNamespace) -> None:
    with pytest.raises(ValueError):
        impl.FrameSlot(list, 0)


def test_generic_alias(impl: SimpleNamespace) -> None:
    slot = impl.FrameSlot[list](list)
    assert slot.acquire() == []


def test_fast_producer_slow_consumer_threads(impl: SimpleNamespace) -> None:
    """The producer outruns the consumer: frames drop, order holds, no buffer beyond max_buffers."""
    slot, pool = make_slot(impl)
    frames = 20_000
    ready, done = threading.Event(), threading.Event()
    slot.set_ready_callback(ready.set)
    unplaced = last_published = 0

    def produce() -> None:
        nonlocal unplaced, last_published
        for number in range(1, frames + 1):
            buf = slot.acquire()
            if buf is None:
                slot.drop()
                unplaced += 1
                continue
            buf[0] = number
            slot.publish(buf)
            last_published = number
        done.set()
        ready.set()

    seen: list[int] = []

    def consume() -> None:
        held = None  # like the sender, keep the current frame until a newer one arrives
        while True:
            finished = done.is_set()  # read before take(): then nothing can be published after it
            buf = slot.take()
            if buf is None:
                if finished:
                    break
                assert ready.wait(TIMEOUT)
                ready.clear()
                continue
            seen.append(buf[0])
            sum(range(200))  # some work per frame, as a real consumer has
            if held is not None:
                slot.release(held)
            held = buf
        if held is not None:
            slot.release(held)

    threads = [threading.Thread(target=produce), threading.Thread(target=consume)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
        assert not thread.is_alive()
    assert len(pool.made) == slot.buffers <= 3
    assert seen == sorted(set(seen)) and seen[-1] == last_published  # never older than before
    assert slot.taken == len(seen)
    assert slot.published + unplaced == frames
    assert slot.taken + slot.dropped == frames  # every frame is either taken or counted as dropped
    assert slot.dropped > 0
    assert slot.free == slot.buffers
