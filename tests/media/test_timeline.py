"""SessionTimeline: media time ↔ clock from the live edge; what the sender does; the output's offset."""

from __future__ import annotations

import pytest

from relay_server.media.timeline import (
    JOIN_TOLERANCE,
    RESYNC,
    TICKS,
    WRAP,
    Decision,
    SessionTimeline,
)

FRAME = 3000  # ticks: one frame at 30 fps
T0 = 100.0  # clock seconds when the input begins
BASE = 900_000  # the input's first pts (10 s)


def live(timeline: SessionTimeline, frames: range, start: float = T0, base: int = BASE) -> None:
    """Frames arriving exactly at their media time."""
    for index in frames:
        timeline.arrived(base + index * FRAME, start + index / 30)


def test_the_earliest_arrival_is_the_live_edge_not_the_first_frame_of_a_backlog() -> None:
    timeline = SessionTimeline(origin=T0)
    # A join 1 s into a segment: 30 frames in one burst at T0, then live.
    for index in range(30):
        timeline.arrived(BASE + index * FRAME, T0)
    live(timeline, range(30, 60), start=T0 - 29 / 30)
    # The newest frame of the burst was on time; the older ones are the backlog.
    first = timeline.decide(BASE, ready=T0 + 0.01, now=T0 + 0.01)
    assert first.decision is Decision.JOIN_SKIPPED
    near_edge = timeline.decide(BASE + 29 * FRAME, ready=T0 + 0.02, now=T0 + 0.02)
    assert near_edge.decision is Decision.SEND and near_edge.due == pytest.approx(T0)
    assert timeline.stats.join_skipped == 1 and timeline.smoothing == 0.0
    # Once an epoch sent a frame, a frame is let go only past the budget.
    assert timeline.decide(BASE + 30 * FRAME, T0 + 0.05, T0 + 0.05).decision is Decision.SEND


def test_frames_late_by_more_than_the_budget_are_dropped() -> None:
    timeline = SessionTimeline(origin=T0, budget=0.2)
    live(timeline, range(10))
    ok = timeline.decide(BASE, ready=T0, now=T0 + 0.19)
    assert ok.decision is Decision.SEND
    late = timeline.decide(BASE + FRAME, ready=T0, now=T0 + 1 / 30 + 0.21)
    assert late.decision is Decision.LATE and timeline.stats.late == 1


def test_bursts_are_smoothed_by_how_late_their_frames_arrive() -> None:
    timeline = SessionTimeline(origin=T0)
    # Three frames written together every 0.1 s, when the third of them exists.
    for burst in range(20):
        at = T0 + burst * 0.1 + 2 / 30
        for index in range(burst * 3, burst * 3 + 3):
            timeline.arrived(BASE + index * FRAME, at)
    assert timeline.smoothing == pytest.approx(2 / 30, abs=1e-3)  # less the creep
    # Every frame of a burst is sent, each at its media time plus the smoothing: evenly spaced.
    dues = []
    for index in range(57, 60):
        placed = timeline.decide(BASE + index * FRAME, ready=T0 + 1.97, now=T0 + 1.97)
        assert placed.decision is Decision.SEND
        dues.append(placed.due)
    assert dues[1] - dues[0] == pytest.approx(1 / 30) and dues[2] - dues[1] == pytest.approx(1 / 30)


def test_the_offset_creeps_with_a_publisher_clock_slower_than_ours() -> None:
    timeline = SessionTimeline(origin=T0)
    # 1000 ppm slow: after 100 s, frames arrive 0.1 s later than the first one's offset says.
    for index in range(3000):
        timeline.arrived(BASE + index * FRAME, T0 + index / 30 * 1.001)
    last = BASE + 2999 * FRAME
    assert timeline.behind(last, T0 + 2999 / 30 * 1.001) == pytest.approx(0.0, abs=0.005)
    assert timeline.stats.epochs == 1


@pytest.mark.parametrize("jump", [5.0, -20.0])
def test_a_timestamp_jump_starts_an_epoch_and_the_session_clock_runs_on(jump: float) -> None:
    timeline = SessionTimeline(origin=T0)
    live(timeline, range(30))
    before = timeline.decide(BASE + 29 * FRAME, T0 + 29 / 30, T0 + 29 / 30)
    timeline.start_output(before.session, T0 + 29 / 30 + 0.05)
    # The publisher restarts its clock: the next frame's pts jumped, its arrival did not.
    restart = BASE + round(jump * TICKS)
    live(timeline, range(30, 60), start=T0, base=restart - 30 * FRAME)
    assert timeline.stats.epochs == 2
    after = timeline.decide(restart, T0 + 1, T0 + 1)
    assert after.decision is Decision.SEND  # on time in its own epoch: not a backlog
    out_before, out_after = timeline.output_pts(before.session), timeline.output_pts(after.session)
    assert out_before is not None and out_after is not None
    assert out_after - out_before == pytest.approx(FRAME, abs=2)  # the next frame's slot


def test_timestamps_that_restart_where_the_old_ones_were_keep_their_own_epochs() -> None:
    """A publisher restarting at the same pts: a frame of the old run still in the sender's queue
    keeps the old run's mapping."""
    timeline = SessionTimeline(origin=T0)
    live(timeline, range(60))
    old = BASE + 50 * FRAME
    old_session = timeline.decide(old, T0 + 50 / 30, T0 + 50 / 30).session
    live(timeline, range(0, 10), start=T0 + 3)  # the same pts again, 3 s on
    again = timeline.decide(BASE, T0 + 3, T0 + 3)
    assert again.decision is Decision.SEND
    assert again.session - old_session == pytest.approx((3 - 50 / 30) * TICKS, abs=2)


def test_an_input_that_stalls_and_goes_on_where_it_stopped_is_re_anchored() -> None:
    timeline = SessionTimeline(origin=T0)
    live(timeline, range(30))
    stall = 8.0
    live(timeline, range(30, 60), start=T0 + stall)
    assert timeline.stats.epochs == 2
    placed = timeline.decide(BASE + 30 * FRAME, T0 + stall + 1.0, T0 + stall + 1.0)
    assert placed.decision is Decision.SEND  # not 8 s late


def test_the_pts_wrap_is_not_a_jump() -> None:
    timeline = SessionTimeline(origin=T0)
    base = WRAP - 15 * FRAME
    for index in range(30):
        timeline.arrived((base + index * FRAME) % WRAP, T0 + index / 30)
    assert timeline.stats.epochs == 1
    first = timeline.decide(base, T0, T0)
    wrapped = timeline.decide((base + 20 * FRAME) % WRAP, T0 + 20 / 30, T0 + 20 / 30)
    assert wrapped.session - first.session == 20 * FRAME


def test_output_pts_are_session_time_plus_the_first_returns_offset() -> None:
    timeline = SessionTimeline(origin=T0 - 1)
    live(timeline, range(10))
    assert not timeline.output_started and timeline.output_pts(0) is None
    assert timeline.audio_pts(BASE) is None
    first = timeline.decide(BASE + 3 * FRAME, T0 + 0.1, T0 + 0.1)
    timeline.start_output(first.session, T0 + 0.15)
    assert timeline.output_pts(first.session) == timeline.clock_pts(T0 + 0.15)
    later = timeline.decide(BASE + 5 * FRAME, T0 + 0.17, T0 + 0.17)
    out = timeline.output_pts(later.session)
    assert out == timeline.clock_pts(T0 + 0.15) + 2 * FRAME
    # The audio keeps its own timestamps on the same offset: an audio packet at the same media
    # time as a frame goes to the same output time.
    assert timeline.audio_pts(BASE + 5 * FRAME) == out


def test_backlog_reads_the_arrival_of_a_unit() -> None:
    timeline = SessionTimeline(origin=T0)
    for index in range(30):
        timeline.arrived(BASE + index * FRAME, T0)
    assert timeline.backlog(BASE)  # an IDR 1 s behind the newest frame that came with it
    assert not timeline.backlog(BASE + 29 * FRAME)
    assert not timeline.backlog(BASE + round((1 - JOIN_TOLERANCE / 2) * TICKS) // FRAME * FRAME + FRAME)
    assert not timeline.backlog(12345)  # never seen


def test_a_frame_nobody_stamped_arrived_when_it_was_handed_over() -> None:
    timeline = SessionTimeline(origin=T0)
    placed = timeline.decide(BASE, ready=T0, now=T0 + 0.01)
    assert placed.decision is Decision.SEND and placed.due == pytest.approx(T0)
    assert timeline.stats.epochs == 1 and RESYNC > 0


def test_an_input_read_from_its_start_has_no_backlog_to_skip() -> None:
    """Its channel appeared after the session began: what came before the first read is the
    wait for it, sent (late) rather than skipped."""
    timeline = SessionTimeline(origin=T0)
    timeline.input_started(from_start=True)
    for index in range(10):  # the first 0.3 s came in one read
        timeline.arrived(BASE + index * FRAME, T0 + 0.3)
    assert not timeline.backlog(BASE)
    first = timeline.decide(BASE, ready=T0 + 0.31, now=T0 + 0.31)
    assert first.decision is Decision.SEND and first.due < T0 + 0.31  # late: at once
    # A later discontinuity is a join again: its backlog is skipped.
    for index in range(30):
        timeline.arrived(index * FRAME, T0 + 10)
    assert timeline.decide(0, T0 + 10, T0 + 10).decision is Decision.JOIN_SKIPPED


@pytest.mark.parametrize(
    ("frames", "rate"),
    [
        ([0, 4, 2, 1, 3, 8, 6], 30),  # B-frames in decode order: frames 5 and 7 have yet to come
        ([0, 1, 2, 3, 4, 5, 6], 30),
        ([0, 1.5, 2, 3.5, 4, 5.5, 6], 30),  # variable intervals: their average
    ],
)
def test_the_frame_rate_counts_the_frames_come_up_to_the_first_gap(frames: list[float], rate: int) -> None:
    timeline = SessionTimeline(origin=T0)
    for arrival, frame in enumerate(frames):
        timeline.arrived(BASE + round(frame * FRAME), T0 + arrival / 30)
    assert timeline.frame_rate == rate


def test_audio_after_the_last_picture_goes_on_with_it_once_the_input_has_ended() -> None:
    """Audio that ends after every picture so far waits for the video to come; once the input
    has ended (final), none will: it goes on the last pictures' mapping, as it was in the input."""
    timeline = SessionTimeline(origin=T0)
    live(timeline, range(90))
    first = timeline.decide(BASE, T0, T0)
    timeline.start_output(first.session, T0)
    last = timeline.audio_pts(BASE + 89 * FRAME)
    assert last is not None
    assert timeline.audio_pts(BASE + 89 * FRAME, 3 * FRAME) is None
    assert timeline.audio_pts(BASE + 89 * FRAME, 3 * FRAME, final=True) == last
    assert timeline.audio_pts(BASE + 91 * FRAME, 3 * FRAME, final=True) == last + 2 * FRAME


def test_audio_goes_with_the_video_of_its_own_epoch() -> None:
    """After a stall whose timestamps go on where they stopped, audio written late (before the
    stall, in media time) keeps the old mapping, and audio of media times after it, even if it
    came before the stall, takes the new one; after a restart whose timestamps begin again,
    late audio of the old run keeps its mapping too."""
    timeline = SessionTimeline(origin=T0)
    live(timeline, range(90))  # 3 s
    first = timeline.decide(BASE, T0, T0)
    timeline.start_output(first.session, T0)
    before = timeline.audio_pts(BASE + 88 * FRAME)
    # Audio come ahead of the video (written before the stall): it waits for its video.
    assert timeline.audio_pts(BASE + 91 * FRAME) is None
    live(timeline, range(90, 120), start=T0 + 8)  # 8 s stall
    assert timeline.stats.epochs == 2
    # Audio written late, after the stall, goes before the stall where its media time is.
    assert timeline.audio_pts(BASE + 88 * FRAME) == before
    after = timeline.audio_pts(BASE + 91 * FRAME)
    assert after is not None and before is not None
    # A packet that begins before the stall's first frame and ends after it (muxers put several
    # audio frames in one) goes with the frame its sound reaches: the new run's.
    straddling = timeline.audio_pts(BASE + 89 * FRAME, 3 * FRAME)
    assert straddling == after - 2 * FRAME
    assert after - before == pytest.approx(3 * FRAME + 8 * TICKS, abs=2)  # where the wall clock got to
    live(timeline, range(10), start=T0 + 20, base=0)  # a publisher restarting its clock at 0
    assert timeline.audio_pts(BASE + 119 * FRAME) == after + 28 * FRAME  # the run before's
    restarted = timeline.audio_pts(5 * FRAME)
    assert restarted is not None and restarted > after
