"""FrameQueue: decoded frames from a producer thread to the loop in order, or the last one again."""

from __future__ import annotations

import asyncio
import threading
from fractions import Fraction

import av
import numpy as np

from relay_server.media.handoff import FrameQueue

WIDTH, HEIGHT = 64, 48
CLOCK = Fraction(1, 90_000)


def solid(
    level: int, pts: int, width: int = WIDTH, height: int = HEIGHT, fmt: str = "yuv420p", chroma: int = -1
) -> av.VideoFrame:
    """A frame whose luma is `level` everywhere and whose chroma is `chroma` (default `level // 2`)."""
    frame = av.VideoFrame(width, height, "yuv420p")
    chroma = level // 2 if chroma < 0 else chroma
    for plane, value in zip(frame.planes, (level, chroma, chroma), strict=True):
        np.frombuffer(memoryview(plane), np.uint8)[:] = value
    frame.pts, frame.time_base = pts, CLOCK
    if fmt != "yuv420p":
        frame = frame.reformat(format=fmt)
        frame.pts, frame.time_base = pts, CLOCK
    return frame


def levels(frame: av.VideoFrame) -> tuple[float, float, float]:
    y, u, v = (
        np.frombuffer(memoryview(plane), np.uint8).reshape(-1, plane.line_size)[: plane.height, : plane.width]
        for plane in frame.planes
    )
    return float(y.mean()), float(u.mean()), float(v.mean())


async def test_next_before_any_frame_returns_none() -> None:
    frames = FrameQueue(WIDTH, HEIGHT)
    assert await frames.next(0.02) is None
    assert frames.current is None
    assert (frames.put_count, frames.dropped) == (0, 0)


async def test_every_frame_goes_in_order_as_a_copy() -> None:
    frames = FrameQueue(WIDTH, HEIGHT)
    sources = [solid(level, pts) for level, pts in ((10, 100), (20, 200), (30, 300))]
    for source in sources:
        frames.put(source)
    # The hand-off holds copies: changing the producer's frames afterwards changes nothing.
    for source in sources:
        np.frombuffer(memoryview(source.planes[0]), np.uint8)[:] = 255
    assert len(frames) == 3
    for level, pts in ((10, 100), (20, 200), (30, 300)):
        taken = await frames.next(1.0)
        assert taken is not None
        frame, fresh, ready = taken
        assert fresh and ready > 0
        assert frame not in sources
        assert levels(frame) == (level, level // 2, level // 2)
        assert (frame.pts, frame.time_base) == (pts, CLOCK)
        assert (frame.width, frame.height, frame.format.name) == (WIDTH, HEIGHT, "yuv420p")
        assert frames.current is frame
    assert (frames.put_count, frames.dropped, len(frames)) == (3, 0, 0)
    frames.close()
    assert frames.current is None


async def test_a_full_queue_lets_its_oldest_frame_go() -> None:
    frames = FrameQueue(WIDTH, HEIGHT, capacity=2)
    for pts in (1, 2, 3, 4):
        frames.put(solid(pts, pts))
    assert (frames.dropped, len(frames)) == (2, 2)
    taken = [await frames.next(1.0) for _ in range(2)]
    assert [t[0].pts for t in taken if t is not None] == [3, 4]


async def test_first_waits_for_the_first_frame_and_not_after() -> None:
    frames = FrameQueue(WIDTH, HEIGHT)
    waiting = asyncio.create_task(frames.first())
    await asyncio.sleep(0)
    assert not waiting.done()
    producer = threading.Thread(target=frames.put, args=(solid(42, 1),), name="test-decode")
    producer.start()
    try:
        await asyncio.wait_for(waiting, 5)
    finally:
        producer.join()
    await asyncio.wait_for(frames.first(), 1)  # already there: at once
    ended = FrameQueue(WIDTH, HEIGHT)
    ended.end()
    await asyncio.wait_for(ended.first(), 1)  # no input will come: nothing to wait for


async def test_repeat_after_timeout_returns_the_same_frame_not_fresh() -> None:
    frames = FrameQueue(WIDTH, HEIGHT)
    frames.put(solid(77, 1234))
    first = await frames.next(1.0)
    assert first is not None and first[1]
    again = await frames.next(0.02)
    assert again is not None
    assert again[0] is first[0] and again[1] is False
    assert levels(again[0])[0] == 77 and again[0].pts == 1234
    # A new frame after a repeat is fresh again, and nothing was dropped.
    frames.put(solid(88, 5678))
    newer = await frames.next(0.02)
    assert newer is not None and newer[1] and newer[0].pts == 5678
    assert frames.dropped == 0


async def test_put_from_another_thread_wakes_a_waiting_next() -> None:
    frames = FrameQueue(WIDTH, HEIGHT)
    waiting = asyncio.create_task(frames.next())  # no repeat timer: only a put() can end it
    await asyncio.sleep(0)  # let it run until it waits
    assert not waiting.done()
    producer = threading.Thread(target=frames.put, args=(solid(42, 4200),), name="test-decode")
    producer.start()
    try:
        taken = await asyncio.wait_for(waiting, 5)
    finally:
        producer.join()
    assert taken is not None
    assert taken[1] and taken[0].pts == 4200 and levels(taken[0])[0] == 42


async def test_many_frames_from_a_thread_go_in_order_and_every_one_is_accounted_for() -> None:
    frames = FrameQueue(WIDTH, HEIGHT)
    count = 500
    done = threading.Event()

    def produce() -> None:
        for index in range(count):
            frames.put(solid(index % 200, index))
        done.set()

    producer = threading.Thread(target=produce, name="test-decode")
    producer.start()
    taken_pts: list[int] = []
    try:
        while True:
            taken = await asyncio.wait_for(frames.next(0.05), 5)
            if taken is not None and taken[1]:
                pts = taken[0].pts
                assert pts is not None
                taken_pts.append(pts)
                assert levels(taken[0])[0] == pts % 200  # pixels and pts travel together
            elif done.is_set() and frames.put_count == count and not len(frames):
                break
    finally:
        producer.join()
    assert taken_pts == sorted(set(taken_pts)) and taken_pts[-1] == count - 1
    assert len(taken_pts) + frames.dropped == count


async def test_frames_of_another_size_or_format_are_reformatted() -> None:
    frames = FrameQueue(WIDTH, HEIGHT)
    frames.put(solid(100, 9, width=WIDTH * 2, height=HEIGHT * 2))
    frames.put(solid(100, 10, fmt="rgb24", chroma=128))  # grey: exact through RGB
    assert frames.reformatted == 2
    for pts in (9, 10):
        taken = await frames.next(1.0)
        assert taken is not None
        frame = taken.item
        assert (frame.width, frame.height, frame.format.name) == (WIDTH, HEIGHT, "yuv420p")
        assert frame.pts == pts
        assert abs(levels(frame)[0] - 100) < 3
    frames.put(solid(50, 11))  # the hand-off's own size and format: copied as is
    assert frames.reformatted == 2


async def test_end_returns_none_once_the_frames_left_are_taken() -> None:
    frames = FrameQueue(WIDTH, HEIGHT)
    waiting = asyncio.create_task(frames.next())
    await asyncio.sleep(0)
    frames.end()
    assert await asyncio.wait_for(waiting, 5) is None
    frames.put(solid(1, 1))
    taken = await frames.next(0.02)
    assert taken is not None and taken[0].pts == 1
    assert await frames.next(0.02) is None


async def test_waiting_hand_off_loses_nothing_and_release_frees_the_producer() -> None:
    frames = FrameQueue(64, 64, wait=True)
    count = 200
    produced = threading.Event()

    def produce() -> None:
        for index in range(count):
            frames.put(solid(index % 200, pts=index))
        produced.set()

    producer = threading.Thread(target=produce)
    producer.start()
    seen = []
    for _ in range(count):
        taken = await frames.next(5.0)
        assert taken is not None and taken[1]
        seen.append(taken[0].pts)
    assert seen == list(range(count)) and frames.dropped == 0
    producer.join(5)
    # A producer waiting to hand a frame over is let go by release(), without the consumer.
    frames.put(solid(1, pts=1))
    blocked = threading.Thread(target=frames.put, args=(solid(2, pts=2),))
    blocked.start()
    blocked.join(0.05)
    assert blocked.is_alive()  # it waits for the consumer
    frames.release()
    blocked.join(5)
    assert not blocked.is_alive()
