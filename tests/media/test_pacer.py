"""Pacer: frames due at anchor + media time; late ones at once, early ones pull the anchor in."""

from __future__ import annotations

import itertools

import pytest

from relay_server.media.pacer import ADAPT, RESYNC, Pacer

ANCHOR = 1000.0  # clock time of the first frame
MEDIA = 50.0  # its media time


def anchored() -> Pacer:
    pacer = Pacer()
    assert pacer.due(MEDIA, ANCHOR) == ANCHOR
    return pacer


def test_first_frame_is_due_now() -> None:
    pacer = Pacer()
    assert pacer.due(7.25, 123.5) == 123.5
    assert pacer.resyncs == 0  # the first anchor is not a re-anchoring


def test_frames_on_schedule_are_due_at_anchor_plus_media() -> None:
    pacer = anchored()
    for index in range(1, 60):
        media = MEDIA + index / 30
        # Asked a little before each one is due: it is due exactly on schedule...
        now = ANCHOR + index / 30
        assert pacer.due(media, now) == pytest.approx(now, abs=1e-9)
    # ...and asked well ahead (a burst), it is due at its place on the timeline, minus the drift.
    media = MEDIA + 2.0
    due = pacer.due(media, ANCHOR + 1.9)
    assert due == pytest.approx(ANCHOR + 2.0 - 0.1 * ADAPT)
    assert pacer.resyncs == 0


def test_late_frames_are_due_in_the_past_and_leave_the_anchor_alone() -> None:
    pacer = anchored()
    due = pacer.due(MEDIA + 1.0, ANCHOR + 1.5)  # half a second late: send it now
    assert due == pytest.approx(ANCHOR + 1.0)
    assert due < ANCHOR + 1.5
    # The anchor did not move: the next frame is still due at its place on the original timeline.
    assert pacer.due(MEDIA + 1.6, ANCHOR + 1.55) == pytest.approx(ANCHOR + 1.6 - 0.05 * ADAPT)
    assert pacer.resyncs == 0


def test_early_frames_wait_and_the_anchor_drifts_earlier() -> None:
    pacer = anchored()
    early = 0.2
    due = pacer.due(MEDIA + 1.0, ANCHOR + 1.0 - early)
    # It waits, but the anchor moved `ADAPT` of the earliness towards the clock.
    assert due == pytest.approx(ANCHOR + 1.0 - early * ADAPT)
    assert due > ANCHOR + 1.0 - early
    # A persistent earliness fades: after many frames that come 0.2 s early, the wait is small.
    now = ANCHOR + 1.0 - early
    waits = []
    for index in range(1, 120):
        media = MEDIA + 1.0 + index / 30
        now = ANCHOR + 1.0 + index / 30 - early
        waits.append(pacer.due(media, now) - now)
    assert waits[0] == pytest.approx(early * (1 - ADAPT) ** 2)
    assert all(later < earlier for earlier, later in itertools.pairwise(waits))
    assert waits[-1] < early * 0.01
    assert pacer.resyncs == 0


@pytest.mark.parametrize("jump", [RESYNC + 0.5, -(RESYNC + 0.5), 30.0, -3600.0])
def test_jumps_beyond_resync_reanchor(jump: float) -> None:
    pacer = anchored()
    # Media time jumps by `jump` against the clock (a new stream, a restarted clock, a stall).
    now = ANCHOR + 1.0
    assert pacer.due(MEDIA + 1.0 + jump, now) == now
    assert pacer.resyncs == 1
    # The new anchor holds: the next frame is due on the new timeline.
    assert pacer.due(MEDIA + 1.0 + jump + 1 / 30, now) == pytest.approx(now + 1 / 30 - (1 / 30) * ADAPT)
    assert pacer.resyncs == 1
    # And a jump back to the original timeline re-anchors again.
    assert pacer.due(MEDIA + 1.1, now + 0.1) == now + 0.1
    assert pacer.resyncs == 2


def test_discrepancies_within_resync_do_not_reanchor() -> None:
    pacer = anchored()
    late = RESYNC - 0.1
    assert pacer.due(MEDIA + 1.0, ANCHOR + 1.0 + late) == pytest.approx(ANCHOR + 1.0)
    early = RESYNC - 0.1
    due = pacer.due(MEDIA + 2.0, ANCHOR + 2.0 - early)
    assert due == pytest.approx(ANCHOR + 2.0 - early * ADAPT)
    assert pacer.resyncs == 0


def test_custom_thresholds() -> None:
    pacer = Pacer(resync=0.1, adapt=0.5)
    pacer.due(0.0, 10.0)
    assert pacer.due(0.5, 10.05) == 10.05  # 0.45 s early is beyond a 0.1 s resync
    assert pacer.resyncs == 1
    assert pacer.due(0.55, 10.05) == pytest.approx(10.075)  # half of 0.05 s earliness


def test_a_backlog_is_caught_up_instead_of_replayed() -> None:
    """A session joins 0.5 s into a segment: 15 frames arrive at once. Anchored on the newest,
    they are all late (sent at once), and the live frames after them are on time."""
    pacer = Pacer()
    burst = [MEDIA + index / 30 for index in range(15)]
    pacer.catch_up(burst[-1], ANCHOR)
    assert all(pacer.due(media, ANCHOR) <= ANCHOR for media in burst)
    live = burst[-1] + 1 / 30
    assert pacer.due(live, ANCHOR + 1 / 30) == pytest.approx(ANCHOR + 1 / 30)
    # Without the catch-up the burst is replayed at media time: the last one half a second late.
    replayed = Pacer()
    assert replayed.due(burst[0], ANCHOR) == ANCHOR
    assert replayed.due(burst[-1], ANCHOR) > ANCHOR + 0.4
    # A frame already due is not moved: catching up never delays.
    pacer.catch_up(MEDIA, ANCHOR + 5)
    assert pacer.due(live, ANCHOR + 1 / 30) == pytest.approx(ANCHOR + 1 / 30)


def test_a_short_backlog_is_still_smoothed() -> None:
    pacer = anchored()
    # Three frames 0.1 s ahead arrive at once: within 0.1 s nothing moves, they go at their times.
    pacer.catch_up(MEDIA + 0.1, ANCHOR, within=0.1)
    assert pacer.due(MEDIA + 0.1, ANCHOR) == pytest.approx(ANCHOR + 0.1 - 0.1 * ADAPT)
    # Half a second ahead: squeezed into the 0.1 s.
    pacer.catch_up(MEDIA + 0.6, ANCHOR, within=0.1)
    assert pacer.due(MEDIA + 0.6, ANCHOR) <= ANCHOR + 0.1 + 1e-9
