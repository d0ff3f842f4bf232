"""The capacity, memory and catch-up benchmarks' own arithmetic: per-session figures, RSS drift,
settling, and the catch-up publisher's flow control."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest

from bench import cpubreakdown
from bench.capacity import FIGURES, aggregate, session_figures, settle
from bench.catchup import AHEAD, Publishing, _publish, encode_input
from bench.memory import drift
from relay_server.trickle import Publisher, Subscriber
from relay_server.trickle.server import TrickleServer


def test_session_figures_count_fresh_frames_in_the_window() -> None:
    published = [(index, index / 30) for index in range(60)]  # 2 s at 30 fps
    # Every frame 80 ms later; 10 is lost, 20 comes twice (a repeat), one unreadable frame.
    received: list[tuple[int | None, float]] = []
    for index in range(60):
        if index == 10:
            continue
        received += [(index, index / 30 + 0.08)] * (2 if index == 20 else 1)
    received.append((None, 1.5))
    figures = session_figures(published, received, 0.0, 1.0)
    # Fresh frames first seen in [0, 1): indices 0..27 arrive by 1.0 s (27/30 + 0.08 < 1), less 10.
    assert figures["output fps"] == pytest.approx(27)
    assert figures["output frames/s, repeats included"] == pytest.approx(28)
    assert figures["published"] == 30 and figures["lost"] == 1 and figures["repeated"] == 1
    assert figures["p50 ms"] == pytest.approx(80) and figures["p99 ms"] == pytest.approx(80)


def window(**figures: Any) -> dict[str, Any]:
    """A measured window: every figure 0.1 (cores) or as given, every busiest thread named."""
    measured: dict[str, Any] = dict.fromkeys([*FIGURES, *cpubreakdown.FIGURES], 0.1)
    measured["busiest threads"] = {key: f"thread {key}" for key in cpubreakdown.THREAD_FIGURES}
    return {**measured, "failed on": [], **figures}


def test_a_count_holds_only_if_every_window_held() -> None:
    runs = [
        window(holds=True),
        window(**{"fps min": 0.5, "holds": False, "failed on": ["fps 0.5 < 29"]}),
        {"error": "no frame"},
    ]
    result = aggregate(4, runs)
    assert (result["held"], result["holds"], result["errors"]) == (1, False, ["no frame"])
    assert result["fps min"] == pytest.approx(0.3)  # the median of the windows measured
    assert result["bound"].startswith("no CPU bound") and "fps 0.5 < 29" in result["bound"]
    assert aggregate(2, runs[:1])["holds"] and aggregate(2, runs[:1])["bound"] == "none"


def test_the_bound_is_the_thread_at_a_core_or_the_box() -> None:
    event_loop = cpubreakdown.thread_key("event loop")
    assert (
        aggregate(6, [window(**{event_loop: 0.97, "holds": False})])["bound"] == "relay event loop 0.97 cores"
    )
    cpus = os.cpu_count() or 1
    full = aggregate(6, [window(**{"box busy cores": cpus * 0.95, "holds": False})])
    assert full["bound"] == f"box {cpus * 0.95:.2f} of {cpus} cores busy"


def test_drift_compares_the_second_tenth_with_the_last() -> None:
    # 60 samples over 600 s: flat at 100 MB for the second tenth, 103 MB over the last tenth.
    samples = [(at * 10.0, 100_000_000 if at < 54 else 103_000_000) for at in range(61)]
    figures = drift(samples, 600.0)
    assert figures["early samples"] == 6 and figures["late samples"] == 7
    assert figures["drift %"] == pytest.approx(3.0)
    assert figures["slope bytes/min"] > 0


def test_drift_of_a_steady_rss_is_zero() -> None:
    figures = drift([(at * 1.0, 50_000_000) for at in range(61)], 60.0)
    assert figures["drift %"] == 0 and figures["slope bytes/min"] == 0


async def test_settle_is_when_every_relay_began_to_return_at_rate() -> None:
    started = asyncio.get_running_loop().time()

    async def returned() -> list[int]:  # one relay at 30 fps from the start, one from 0.5 s on
        now = asyncio.get_running_loop().time() - started
        return [int(30 * max(0.0, now - after)) for after in (0.0, 0.5)]

    settled = await settle(returned, within=5.0)
    # The start of the first second both returned at rate: when the slower one began, not a
    # second later, when that second was over.
    assert 0.4 <= settled - started <= 1.4


async def test_publisher_stays_within_reach_of_a_slow_reader(trickle_server: TrickleServer) -> None:
    segments = [[f"segment {seq} part {part}".encode() for part in range(3)] for seq in range(9)]
    url = trickle_server.channel_url("input")
    publisher = Publisher(url)
    await publisher.create_channel()
    state = Publishing()
    publishing = asyncio.create_task(_publish(trickle_server, publisher, "input", segments, state))
    seen: list[bytes] = []
    ahead: list[int] = []
    async with Subscriber(url) as subscriber:  # the segment in progress, as the relay reads
        async for segment in subscriber:
            seen.append(b"".join([chunk async for chunk in segment]))
            ahead.append(state.published - len(seen))
            await asyncio.sleep(0.05)  # a slow reader: the ring holds 5 segments
    await asyncio.wait_for(publishing, 5)
    assert seen == [b"".join(parts) for parts in segments]  # every segment, none skipped
    assert max(ahead) <= AHEAD + 1


def test_encode_input_cuts_a_segment_per_gop() -> None:
    segments = encode_input(65)  # 1 s GOPs at 30 fps: 30 + 30 + 5 frames
    assert len(segments) == 3
    # At least a write per frame (an IDR may take several), each segment whole TS packets.
    assert all(len(segment) >= frames for segment, frames in zip(segments, (30, 30, 5), strict=True))
    for segment in segments:
        data = b"".join(segment)
        assert len(data) % 188 == 0 and data[::188] == b"\x47" * (len(data) // 188)
