"""RoundTrip: returned pts matched to sent ones across an unknown constant offset; LatencyWindow."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable

import pytest

from relay_server.webrtc.roundtrip import (
    EXPLAINED_TO_LEARN,
    MISSES_TO_RELEARN,
    REMEMBERED,
    LatencyWindow,
    RoundTrip,
)
from relay_server.webrtc.sendtrack import InFlight, SendStats

TICKS = 3000  # one frame at 30 fps on the 90 kHz clock
LATENCY = 0.1  # seconds from send to return in these simulations
OFFSET = 3_141_592_653  # what two RTP hops subtract: unknown to the matcher
LEARNT_AFTER = EXPLAINED_TO_LEARN - 1  # returns unmatched while the offset is learnt
# Send-time jitter (seconds, standard deviation): the link's is ~0.1 ms, a few 90 kHz ticks
# (one send interval in ~20 is exactly 3000 ticks), a loaded machine's more.
TIGHT, LOOSE = 0.00007, 0.002


def sends(count: int, seed: int = 1, jitter: float = TIGHT) -> list[tuple[int, float]]:
    """(pts, send time) of `count` frames at ~30 fps whose pts come from a jittery clock, as the
    send track's do (it stamps frames with the monotonic clock when they go out)."""
    rng = random.Random(seed)
    out = []
    for index in range(count):
        at = index / 30 + rng.gauss(0, jitter)
        out.append((round(at * 90_000), at))
    return out


def simulate(
    roundtrip: RoundTrip,
    sent: list[tuple[int, float]],
    returned_pts: Callable[[int, int], int | None],
    media: list[tuple[int, int | None]] | None = None,
) -> list[tuple[int, float | None]]:
    """Send every frame (made from input frame `index`: its media time here) and return each
    `LATENCY` later (in time order, several in flight) with the pts `returned_pts(index, sent
    pts)` gives (None: the processor dropped it). Returns (index, measured latency: None when
    unmatched) per returned frame; `media` gets (index, the media time the return was given)."""
    events: list[tuple[float, int, int]] = []  # (time, 0 send / 1 return, index)
    for index, (_, at) in enumerate(sent):
        events.append((at, 0, index))
        events.append((at + LATENCY, 1, index))
    results: list[tuple[int, float | None]] = []
    for at, kind, index in sorted(events):
        pts = sent[index][0]
        if kind == 0:
            roundtrip.sent(pts, at, index)
        elif (back := returned_pts(index, pts)) is not None:
            matched = roundtrip.matched
            given = roundtrip.returned(back, at)
            latency = roundtrip.latencies.values[-1] if roundtrip.matched > matched else None
            results.append((index, latency))
            if media is not None:
                media.append((index, given))
    return results


def matched_from(results: Iterable[tuple[int, float | None]]) -> int | None:
    """The position of the first matched return, after which every return must be matched."""
    results = list(results)
    for position, (_, latency) in enumerate(results):
        if latency is not None:
            assert all(later is not None for _, later in results[position:]), results
            return position
    return None


@pytest.mark.parametrize("jitter", [TIGHT, LOOSE])
def test_learns_an_unknown_offset_and_matches_every_return(jitter: float) -> None:
    roundtrip = RoundTrip()
    sent = sends(90, jitter=jitter)
    results = simulate(roundtrip, sent, lambda _, pts: pts - OFFSET)
    first = matched_from(results)
    assert first == LEARNT_AFTER
    assert all(latency == pytest.approx(LATENCY) for _, latency in results[first:])
    assert roundtrip.matched == len(results) - first
    assert roundtrip.unmatched == first
    assert roundtrip.first_sent == sent[0][1]
    assert list(roundtrip.latencies.values) == [pytest.approx(LATENCY)] * roundtrip.matched


def test_every_return_gets_the_media_time_it_was_made_from() -> None:
    # Matched, and before the offset is learnt, too: a processor returns frames in order.
    media: list[tuple[int, int | None]] = []
    simulate(RoundTrip(), sends(90), lambda _, pts: pts - OFFSET, media)
    assert len(media) == 90 and all(index == given for index, given in media)


def test_a_dropping_processor_gets_the_media_times_right_once_learnt() -> None:
    kept = lambda index: index % 4 != 1  # noqa: E731
    media: list[tuple[int, int | None]] = []
    results = simulate(RoundTrip(), sends(120), lambda i, pts: pts - OFFSET if kept(i) else None, media)
    first = matched_from(results)
    assert first is not None
    assert all(index == given for index, given in media[first:])
    # Guessed in order before: never one that had already been given.
    guessed = [given for _, given in media[:first]]
    assert guessed == sorted(set(guessed))


def test_a_frame_at_the_processor_is_pending_until_it_is_back_or_presumed_lost() -> None:
    roundtrip = RoundTrip()
    assert roundtrip.pending(since=0.0) is None
    for index, (pts, at) in enumerate(sends(5)):
        roundtrip.sent(pts, at, index)
    assert roundtrip.pending(since=0.0) == 0
    roundtrip.returned(123, 0.2)  # unmatched: the oldest is taken to be it
    assert roundtrip.pending(since=0.0) == 1
    assert roundtrip.pending(since=2.5 / 30) == 3  # sent before `since`: presumed lost


def test_wrapped_pts_and_a_negative_offset_are_learnt_too() -> None:
    roundtrip = RoundTrip()
    results = simulate(roundtrip, sends(60), lambda _, pts: pts + 2**40)
    first = matched_from(results)
    assert first == LEARNT_AFTER
    assert all(latency == pytest.approx(LATENCY) for _, latency in results[first:])


def test_a_processor_that_drops_frames_still_matches() -> None:
    roundtrip = RoundTrip()
    # The first few are dropped too, and then every third one and a run of five.
    kept = lambda index: index > 2 and index % 3 != 0 and not 40 <= index < 45  # noqa: E731
    results = simulate(roundtrip, sends(120), lambda index, pts: pts - OFFSET if kept(index) else None)
    first = matched_from(results)
    assert first == LEARNT_AFTER
    matched = [(index, latency) for index, latency in results[first:]]
    assert all(latency == pytest.approx(LATENCY) and kept(index) for index, latency in matched)
    assert len(matched) > 60
    # Every frame dropped after the first match is passed over by a later one, and counted.
    dropped_after = sum(not kept(index) for index in range(results[first][0], 120))
    assert dropped_after <= roundtrip.skipped <= sum(not kept(index) for index in range(120))


async def test_frames_passed_over_leave_the_in_flight_window_at_once_counted_lost() -> None:
    stats = SendStats()
    in_flight = InFlight(stats, limit=4)
    for at in range(4):
        in_flight.sent(float(at))
    in_flight.returned(passed_over=2)  # the third came back: the first two never will
    assert len(in_flight) == 1 and stats.presumed_lost == 2
    in_flight.returned(passed_over=3)  # more passed over than are out: already presumed lost
    assert len(in_flight) == 0 and stats.presumed_lost == 2
    await in_flight.drained()


def test_the_processors_pace_is_learnt_from_frames_that_waited_for_the_one_before() -> None:
    in_flight = InFlight(SendStats(), limit=4)
    sent = time.monotonic() - 0.5
    for _ in range(4):
        in_flight.sent(sent)
    assert in_flight.wait() is None  # frames out, none back: nothing known
    in_flight.returned(sent_at=sent)  # the first return: a round trip of 0.5 s, no pace yet
    until_known = in_flight.wait()
    assert until_known is not None and until_known >= 4 * 0.5  # three out and the next
    # Not matched: in order, the oldest out, which waited while the one before was served: the
    # time between the two returns (microseconds here) is the pace.
    in_flight.returned()
    known = in_flight.wait()
    assert known is not None and known < 0.01 and len(in_flight) == 2
    in_flight.returned()
    in_flight.returned()
    assert len(in_flight) == 0 and in_flight.wait() == 0.0


def test_until_the_pace_is_known_the_last_round_trip_stands_for_it() -> None:
    """A slow processor's first frames: the first back says how long one took; the frames out
    and the next may each take as long, before any waited for another to show the pace."""
    in_flight = InFlight(SendStats(), limit=4)
    sent = time.monotonic() - 0.2
    for _ in range(3):
        in_flight.sent(sent)
    in_flight.returned()  # not matched: in order, the oldest out, 0.2 s ago
    estimate = in_flight.wait()
    assert estimate is not None and 3 * 0.2 <= estimate < 3 * 1.0  # two out and the next


def test_a_repeat_back_says_nothing_of_the_processors_pace() -> None:
    """A repeat's return waited in the processor's jitter buffer for the next frame."""
    in_flight = InFlight(SendStats(), limit=4)
    in_flight.sent(time.monotonic() - 5.0, timed=False)
    in_flight.sent(time.monotonic())
    in_flight.returned()  # the repeat, not matched: no round trip from it
    assert in_flight.wait() is None


def test_a_repeat_gives_no_send_time_for_the_pace() -> None:
    """A repeat's return waits in the processor's jitter buffer for the next frame."""
    roundtrip = RoundTrip()
    sent = sends(20)
    for index, (pts, at) in enumerate(sent):
        roundtrip.sent(pts, at, index, timed=index != 19)
    for pts, at in sent[:19]:
        roundtrip.returned(pts - OFFSET, at + LATENCY)
    assert roundtrip.last_sent_at == sent[18][1]
    roundtrip.returned(sent[19][0] - OFFSET, sent[19][1] + LATENCY)
    assert roundtrip.matched > 0 and roundtrip.last_sent_at is None


def test_a_new_offset_is_relearnt_after_misses() -> None:
    roundtrip = RoundTrip()
    switch = 60  # from this frame on, the returned pts carry another offset (a new RTP origin)

    def returned(index: int, pts: int) -> int:
        return pts - OFFSET if index < switch else pts - OFFSET + 987_654

    results = simulate(roundtrip, sends(150), returned)
    before = [(index, latency) for index, latency in results if index < switch]
    after = [(index, latency) for index, latency in results if index >= switch]
    assert matched_from(before) == LEARNT_AFTER
    # Never a wrong latency: the misses are unmatched, then the new offset is learnt.
    assert all(latency is None or latency == pytest.approx(LATENCY) for _, latency in after)
    # The MISSES_TO_RELEARN-th miss is the first return of the new learning.
    assert matched_from(after) == MISSES_TO_RELEARN - 1 + LEARNT_AFTER
    assert roundtrip.unmatched == LEARNT_AFTER + MISSES_TO_RELEARN - 1 + LEARNT_AFTER


@pytest.mark.parametrize("jitter", [TIGHT, LOOSE])
@pytest.mark.parametrize("rewrite", ["counter", "random"])
def test_rewritten_pts_stay_unmatched(rewrite: str, jitter: float) -> None:
    rng = random.Random(7)
    count = 1500
    # A processor that labels its output with its own evenly spaced pts (aiortc's
    # next_timestamp()), or with anything at all: no latency rather than a wrong one.
    rewrites: dict[str, Callable[[int, int], int]] = {
        "counter": lambda index, _: 1_000 + index * TICKS,
        "random": lambda _, __: rng.randrange(2**32),
    }
    roundtrip = RoundTrip()
    results = simulate(roundtrip, sends(count, jitter=jitter), rewrites[rewrite])
    assert [latency for _, latency in results if latency is not None] == []
    assert (roundtrip.matched, roundtrip.unmatched) == (0, count)
    assert math.isnan(roundtrip.latencies.percentile(0.5))


def test_only_recent_sends_are_remembered() -> None:
    roundtrip = RoundTrip()
    sent = sends(REMEMBERED + 50)
    for pts, at in sent:
        roundtrip.sent(pts, at)
    # Learn the offset from recent frames, then a return of a frame sent too long ago is unknown.
    for pts, at in sent[-10:]:
        roundtrip.returned(pts - OFFSET, at + LATENCY)
    assert roundtrip.matched == 10 - LEARNT_AFTER
    before = roundtrip.matched
    roundtrip.returned(sent[10][0] - OFFSET, sent[-1][1] + 1)
    assert roundtrip.matched == before


def test_latencies_go_to_a_shared_window() -> None:
    window = LatencyWindow()
    for seed in (1, 2):  # two connections, one after the other, feed the link's window
        simulate(RoundTrip(window), sends(30, seed), lambda _, pts: pts - OFFSET)
    assert len(window.values) == 2 * (30 - LEARNT_AFTER)
    assert window.percentile(0.5) == pytest.approx(LATENCY)


def test_latency_window_percentiles_and_mean() -> None:
    window = LatencyWindow()
    assert math.isnan(window.percentile(0.5))
    assert math.isnan(window.percentile(0.99))
    assert math.isnan(window.mean())
    values = list(range(1, 101))
    random.Random(3).shuffle(values)
    for value in values:
        window.add(value / 100)
    assert window.percentile(0.50) == 0.50  # nearest rank
    assert window.percentile(0.95) == 0.95
    assert window.percentile(0.99) == 0.99
    assert window.percentile(1.0) == 1.00
    assert window.percentile(0.001) == 0.01
    assert window.mean() == pytest.approx(0.505)
    single = LatencyWindow()
    single.add(0.25)
    assert single.percentile(0.5) == single.percentile(0.99) == single.mean() == 0.25


def test_latency_window_keeps_the_last_values() -> None:
    window = LatencyWindow(size=3)
    for value in (10.0, 1.0, 2.0, 3.0):
        window.add(value)
    assert list(window.values) == [1.0, 2.0, 3.0]
    assert window.percentile(1.0) == 3.0
    assert window.mean() == pytest.approx(2.0)
