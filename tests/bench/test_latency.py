"""Publish and receive times joined by frame index: latency, lost, repeated, unreadable."""

from __future__ import annotations

import pytest

from bench.e2e import join
from bench.frameindex import INDEX_MODULO


def test_every_frame_once() -> None:
    published = [(index, index / 30) for index in range(30)]
    received = [(index, index / 30 + 0.1) for index in range(30)]
    joined = join(published, received, 0.0, 1.0)
    assert (joined.published, joined.lost, joined.repeated, joined.unreadable) == (30, 0, 0, 0)
    assert joined.latencies == pytest.approx([0.1] * 30)
    assert joined.percentile(50) == pytest.approx(0.1)


def test_lost_repeated_and_unreadable_are_counted() -> None:
    published = [(index, index / 30) for index in range(10)]
    # 3 and 7 never arrive; 5 comes three times (the output's fill), 2 twice; one frame unreadable.
    received: list[tuple[int | None, float]] = []
    for index in range(10):
        if index in (3, 7):
            continue
        copies = {5: 3, 2: 2}.get(index, 1)
        received += [(index, index / 30 + 0.05 + copy / 30) for copy in range(copies)]
    received.insert(4, (None, 0.2))
    joined = join(published, received, 0.0, 1.0)
    assert joined.published == 10
    assert joined.lost == 2
    assert joined.repeated == 3  # two extra copies of 5, one of 2
    assert joined.unreadable == 1
    # Latency from the first appearance only, one per frame seen, in publish order.
    assert joined.latencies == pytest.approx([0.05] * 8)


def test_only_frames_published_in_the_window_count() -> None:
    published = [(index, index * 0.1) for index in range(20)]  # 0.0 .. 1.9
    received: list[tuple[int | None, float]] = [(index, index * 0.1 + 0.5) for index in range(20)]
    received.append((None, 5.0))  # unreadable, outside the window
    joined = join(published, received, 0.5, 1.0)  # frames 5..9 (1.0 itself is outside)
    assert joined.published == 5
    assert joined.lost == 0
    assert joined.unreadable == 0
    assert len(joined.latencies) == 5


def test_late_frames_are_not_lost() -> None:
    """A frame published at the window's end and received after it counts as received."""
    joined = join([(0, 0.9)], [(0, 1.5)], 0.0, 1.0)
    assert (joined.lost, joined.latencies) == (0, pytest.approx([0.6]))


def test_indices_read_modulo_the_code_map_back() -> None:
    first = INDEX_MODULO - 2
    published = [(first + offset, offset / 30) for offset in range(4)]  # wraps past the modulo
    received: list[tuple[int | None, float]] = [
        ((first + offset) % INDEX_MODULO, offset / 30 + 0.1) for offset in range(4)
    ]
    joined = join(published, received, 0.0, 1.0)
    assert (joined.published, joined.lost, joined.repeated) == (4, 0, 0)


def test_nothing_received() -> None:
    joined = join([(0, 0.1), (1, 0.2)], [], 0.0, 1.0)
    assert (joined.published, joined.lost) == (2, 2)
    assert joined.latencies == []
