"""AccessUnits: encoded units in order, overflow and repeats resume at a keyframe; and how
FrameQueue hands out units beside decoded frames."""

from __future__ import annotations

import asyncio
import threading

import av

from relay_server.media.handoff import FrameQueue
from relay_server.media.units import AccessUnits
from tests.media.test_handoff import HEIGHT, WIDTH, solid


def unit(pts: int, keyframe: bool = False) -> av.Packet:
    packet = av.Packet(b"\x00\x00\x00\x01" + pts.to_bytes(4, "big"))
    packet.pts = packet.dts = pts
    packet.is_keyframe = keyframe
    return packet


def drain(units: AccessUnits) -> list[int]:
    taken = []
    while (packet := units.take()) is not None:
        assert packet.pts is not None
        taken.append(packet.pts)
    return taken


def test_units_come_out_in_order_and_the_last_keyframe_is_kept() -> None:
    units = AccessUnits(capacity=8)
    for pts in range(6):
        units.put(unit(pts, keyframe=pts in (0, 3)))
    assert drain(units) == [0, 1, 2, 3, 4, 5]
    assert units.last_keyframe is not None and units.last_keyframe.pts == 3
    assert (units.put_count, units.taken, units.dropped) == (6, 6, 0)


def test_overflow_drops_what_is_queued_and_skips_to_the_next_keyframe() -> None:
    units = AccessUnits(capacity=3)
    for pts in range(3):
        units.put(unit(pts, keyframe=pts == 0))
    units.put(unit(3))  # a fourth, no room: the three queued go, and so does this P-frame
    units.put(unit(4))
    units.put(unit(5, keyframe=True))
    units.put(unit(6))
    assert drain(units) == [5, 6]
    assert units.dropped == 5 and units.put_count == 7


def test_overflow_on_a_keyframe_keeps_the_keyframe() -> None:
    units = AccessUnits(capacity=2)
    units.put(unit(0, keyframe=True))
    units.put(unit(1))
    units.put(unit(2, keyframe=True))
    assert drain(units) == [2] and units.dropped == 2


def test_resume_at_keyframe_drops_queued_and_following_units() -> None:
    units = AccessUnits()
    units.put(unit(0, keyframe=True))
    assert drain(units) == [0]
    units.put(unit(1))
    units.resume_at_keyframe()
    units.put(unit(2))
    units.put(unit(3, keyframe=True))
    assert drain(units) == [3] and units.dropped == 2


def test_wait_mode_blocks_the_producer_instead_of_dropping() -> None:
    units = AccessUnits(capacity=2, wait=True)
    ready = threading.Event()
    units.set_ready_callback(ready.set)
    count = 20

    def produce() -> None:
        for pts in range(count):
            units.put(unit(pts, keyframe=pts % 10 == 0))

    producer = threading.Thread(target=produce, name="test-decode")
    producer.start()
    taken: list[int] = []
    try:
        while len(taken) < count:
            assert ready.wait(5), "the producer stopped handing over units"
            ready.clear()
            assert len(units) <= 2
            taken.extend(drain(units))
    finally:
        units.release()
        producer.join()
    assert taken == list(range(count)) and units.dropped == 0


async def test_the_older_head_goes_first_frames_or_units() -> None:
    units = AccessUnits()
    frames = FrameQueue(WIDTH, HEIGHT, units=units)
    frames.put(solid(10, 100))  # decoded before forwarding began at the keyframe below
    units.put(unit(200, keyframe=True))
    units.put(unit(300))
    taken = [await frames.next(1.0) for _ in range(3)]
    assert [(type(t.item), t.item.pts, t.fresh) for t in taken if t is not None] == [
        (av.VideoFrame, 100, True),
        (av.Packet, 200, True),
        (av.Packet, 300, True),
    ]
    assert frames.dropped == 0 and not len(frames)
    # Decoding resumes (forwarding ended): frames again, after any unit still queued.
    units.put(unit(350))
    frames.put(solid(20, 400))
    fourth, fifth = await frames.next(1.0), await frames.next(1.0)
    assert fourth is not None and isinstance(fourth.item, av.Packet) and fourth.item.pts == 350
    assert fifth is not None and isinstance(fifth.item, av.VideoFrame) and fifth.item.pts == 400
    frames.close()


async def test_a_stall_after_units_repeats_the_last_keyframe_and_resumes_at_the_next() -> None:
    units = AccessUnits()
    frames = FrameQueue(WIDTH, HEIGHT, units=units)
    for pts, keyframe in ((0, True), (1, False), (2, False)):
        units.put(unit(pts, keyframe))
    for _ in range(3):
        assert await frames.next(1.0) is not None
    again = await frames.next(0.01)
    assert again is not None and again[1] is False
    assert isinstance(again[0], av.Packet) and again[0].pts == 0  # the keyframe, not the P-frame
    units.put(unit(3))  # refers to frame 2, which the processor no longer shows last
    units.put(unit(4, keyframe=True))
    resumed = await frames.next(1.0)
    assert resumed is not None and resumed[0].pts == 4 and resumed[1]
    assert units.dropped == 1


async def test_a_waiting_next_wakes_for_a_unit_from_another_thread() -> None:
    units = AccessUnits()
    frames = FrameQueue(WIDTH, HEIGHT, units=units)
    waiting = asyncio.create_task(frames.next())
    await asyncio.sleep(0)  # let it run until it waits
    producer = threading.Thread(target=units.put, args=(unit(7, keyframe=True),), name="test-decode")
    producer.start()
    try:
        taken = await asyncio.wait_for(waiting, 5)
    finally:
        producer.join()
    assert taken is not None and taken[0].pts == 7


def test_head_and_skipping_up_to_the_newest_keyframe() -> None:
    units = AccessUnits()
    assert units.head is None and units.newest_keyframe is None
    for pts, keyframe in ((0, True), (1, False), (2, False), (3, True), (4, False)):
        units.put(unit(pts, keyframe))
    assert units.head is not None and units.head.pts == 0
    assert units.newest_keyframe == 3  # three units come before it
    units.skip(3)
    assert units.late == 3 and units.dropped == 0 and units.head is not None and units.head.pts == 3
    assert drain(units) == [3, 4]
    assert units.head is None


def test_a_late_gop_goes_up_to_the_next_keyframe_counted_late() -> None:
    units = AccessUnits()
    units.put(unit(0, True))
    assert drain(units) == [0]
    for pts in (1, 2, 3):
        units.put(unit(pts, False))
    units.let_gop_go()  # the sender found unit 1 too late: 1, 2 and 3 go
    units.put(unit(4, False))  # the GOP's tail, still coming: no later picture refers to it
    units.resume_at_keyframe()  # a repeat meanwhile: still waiting for the keyframe, still late
    units.put(unit(5, False))
    units.put(unit(6, True))
    units.put(unit(7, False))
    assert drain(units) == [6, 7]
    assert (units.late, units.late_gops, units.dropped) == (5, 1, 0)
