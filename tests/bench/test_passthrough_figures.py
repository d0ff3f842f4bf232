"""The passthrough benchmark's own arithmetic: ratios and verdicts, the paths check, what bounds
a capacity sweep, the event loop's profile by part, the capacity sweep's order of counts, and the
timing of aiortc's RTP path (bench.rtpcost)."""

from __future__ import annotations

import cProfile
import math
import os
import pstats
from types import SimpleNamespace

import pylibsrtp
import pytest

from bench.capacity import sweep_counts
from bench.passthrough import (
    SYSCALLS,
    UNATTRIBUTED,
    WAITING,
    at_least,
    bound,
    event_loop_profile,
    net_ms_per_frame,
    others_cores,
    part_of,
    paths_problem,
    ratio,
    rtp_section,
    shares,
    top_functions,
)
from bench.rtpcost import ENTRY_POINTS, KERNEL, NESTED, RtpCost


def test_ratio_is_baseline_over_value() -> None:
    assert ratio(6.0, 1.5) == pytest.approx(4.0)
    assert math.isnan(ratio(6.0, 0.0))
    assert math.isnan(ratio(math.nan, 1.0))


def test_verdicts_say_met_or_missed_and_by_how_much() -> None:
    assert at_least(6.0, 5.0, "why").startswith("met: 6× ≥ 5×, 20% above the target (why)")
    missed = at_least(3.0, 5.0, "why")
    assert missed.startswith("missed: 3× < 5×, 40% short of the target")
    assert "needs 1.7× more" in missed and missed.endswith("why)")
    assert at_least(5.0, 5.0, "").startswith("met")
    assert at_least(math.nan, 5.0, "no windows") == "not measured (no windows)"


def test_net_of_idle_per_frame() -> None:
    # 0.06 cores at 30 fps is 2 ms a frame; 0.015 of it idle leaves 1.5 ms.
    assert net_ms_per_frame(0.06, 0.015, 30.0) == pytest.approx(1.5)
    assert math.isnan(net_ms_per_frame(0.06, 0.0, 0.0))


def test_others_are_what_the_box_did_beyond_the_known_processes() -> None:
    assert others_cores(1.0, 0.2, 0.3, 0.1) == pytest.approx(0.4)


def test_paths_must_be_what_the_mode_gives() -> None:
    forward = {"send path": "forward", "output path": "remux", "path switches": 0}
    assert paths_problem("passthrough", forward) == ""
    assert paths_problem("auto", forward) == ""
    assert "expected encode/encode" in paths_problem("transcode", forward)
    encoded = {"send path": "encode", "send path reason": "B-frames", "output path": "remux"}
    problem = paths_problem("auto", encoded)
    assert "send_path 'encode' (B-frames)" in problem and "expected forward/remux" in problem
    assert "switched 2 times" in paths_problem("auto", {**forward, "path switches": 2})


def test_shares_largest_first_without_empty_stages() -> None:
    parts = shares({"event loop": 1.5, "input": 0.3, "send x264": 0.0, "output": 0.2})
    assert [stage for stage, _, _ in parts] == ["event loop", "input", "output"]
    assert parts[0][2] == pytest.approx(75.0)


def _count(sessions: int, holds: bool, idle: float, processors: float, relay: float) -> dict:
    return {
        "sessions": sessions,
        "holds": holds,
        "relay cores": relay,
        "processors cores": processors,
        "source+readers cores": 0.15,
        "others cores": -0.02,
        "box idle cores": idle,
    }


def test_bound_names_the_first_count_that_failed_and_its_largest_user() -> None:
    counts = [
        _count(1, True, 1.5, 0.3, 0.05),
        _count(4, True, 0.6, 1.1, 0.12),
        _count(6, False, 0.05, 1.6, 0.18),
        _count(5, False, 0.1, 1.45, 0.15),
    ]
    result = bound(counts, 2)
    assert result["held"] == 4
    assert result["edge sessions"] == 5 and not result["edge holds"]
    assert result["cpu bound"] and result["largest user"] == "processors"
    assert result["edge cores"]["others"] == 0.0  # negative noise counts as none
    assert result["relay cores/session"] == pytest.approx(0.03)
    assert result["processors cores/session"] == pytest.approx(0.275)
    assert result["relay alone, sessions (extrapolated)"] == 66  # floor(2 / 0.03)


def test_bound_when_every_count_held_or_none_was_measured() -> None:
    result = bound([_count(1, True, 1.5, 0.3, 0.05), _count(2, True, 1.0, 0.6, 0.1)], 2)
    assert result["held"] == 2 and result["edge sessions"] == 2 and result["edge holds"]
    assert not result["cpu bound"]
    assert bound([{"sessions": 1, "holds": False, "errors": ["no frame"]}], 2) == {"held": 0}


def test_parts_by_file() -> None:
    assert part_of("/v/lib/python3.12/site-packages/pylibsrtp/__init__.py").startswith("SRTP")
    assert part_of("/v/site-packages/aiortc/rtcrtpsender.py").startswith("RTP/RTCP")
    assert part_of("/v/site-packages/aiortc/rtcdtlstransport.py").startswith("SRTP")
    assert part_of("/v/site-packages/aioice/ice.py").startswith("ICE")
    assert part_of("/w/relay_server/trickle/subscriber.py").startswith("trickle HTTP")
    assert part_of("/w/relay_server/webrtc/sendtrack.py").startswith("relay: link")
    assert part_of("/w/relay_server/session/relay.py").startswith("relay: session")
    assert part_of("/usr/lib/python3.12/asyncio/base_events.py").startswith("asyncio")
    assert part_of("/usr/lib/python3.12/selectors.py").startswith("asyncio")
    assert part_of("/somewhere/else.py") == UNATTRIBUTED


def test_profile_counts_c_calls_with_their_caller() -> None:
    rtp, selector = ("/x/aiortc/rtp.py", 1, "pack"), ("/usr/lib/asyncio/selector_events.py", 9, "sendto")
    srtp, dtls = ("/x/pylibsrtp/__init__.py", 5, "protect"), ("/x/aiortc/rtcdtlstransport.py", 7, "_send")
    loop = ("/usr/lib/selectors.py", 3, "select")
    stats = SimpleNamespace(
        stats={  # (calls, primitive calls, self time, cumulative, {caller: (.., .., self time, ..)})
            rtp: (1, 1, 0.2, 0.5, {}),
            selector: (2, 2, 0.01, 0.31, {}),
            loop: (1, 1, 0.02, 2.02, {}),
            # Socket calls and epoll are parts of their own, whoever calls them.
            ("~", 0, "<method 'sendto' of '_socket.socket' objects>"): (
                2,
                2,
                0.3,
                0.3,
                {selector: (2, 2, 0.3, 0.3)},
            ),
            ("~", 0, "<method 'poll' of 'select.epoll' objects>"): (1, 1, 2.0, 2.0, {loop: (1, 1, 2.0, 2.0)}),
            # 0.4 s in a C call: 0.25 from pylibsrtp, 0.1 from aiortc's DTLS, 0.05 from nowhere known.
            ("~", 0, "<cffi srtp_protect>"): (
                2,
                2,
                0.4,
                0.4,
                {srtp: (1, 1, 0.25, 0.25), dtls: (1, 1, 0.1, 0.1)},
            ),
        }
    )
    parts = event_loop_profile(stats)  # type: ignore[arg-type]
    assert parts == pytest.approx(
        {
            WAITING: 2.0,
            "SRTP/DTLS (pylibsrtp, aiortc dtls)": 0.35,
            SYSCALLS: 0.3,
            "RTP/RTCP: packetise, parse, jitter buffer (aiortc)": 0.2,
            "asyncio loop, selectors": 0.03,
            UNATTRIBUTED: 0.05,
        }
    )
    assert list(parts)[:2] == [WAITING, "SRTP/DTLS (pylibsrtp, aiortc dtls)"]  # largest first
    top = top_functions(stats)  # type: ignore[arg-type]
    assert [row["function"] for row in top[:2]] == [
        "<cffi srtp_protect>",
        "<method 'sendto' of '_socket.socket' objects>",
    ]
    assert top[0]["part"] == "C, counted with its caller" and top[1]["part"] == SYSCALLS
    assert top[2]["function"] == "aiortc/rtp.py:1 pack"
    assert all(row["part"] != WAITING for row in top)


def test_profile_of_a_real_profiler() -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    assert sum(sorted(range(20_000), key=abs))
    profiler.disable()
    parts = event_loop_profile(pstats.Stats(profiler))
    assert sum(parts.values()) > 0


@pytest.mark.parametrize(
    ("capacity", "measured"),
    [
        (0, [1]),
        (1, [1, 2]),
        (3, [1, 2, 4, 3]),
        (5, [1, 2, 4, 6, 5]),
        (16, [1, 2, 4, 6, 8, 10, 12, 16]),
        (13, [1, 2, 4, 6, 8, 10, 12, 16, 15, 14, 13]),
    ],
)
async def test_sweep_steps_up_then_back_down_to_the_last_that_holds(
    capacity: int, measured: list[int]
) -> None:
    seen: list[int] = []

    async def measure(count: int) -> bool:
        seen.append(count)
        return count <= capacity

    await sweep_counts([1, 2, 4, 6, 8, 10, 12, 16], measure)
    assert seen == measured


def test_rtp_cost_times_its_entry_points_and_puts_them_back() -> None:
    originals = {(cls, name): cls.__dict__[name] for _, cls, name in ENTRY_POINTS}
    key = os.urandom(30)
    policy = pylibsrtp.Policy(key=key, ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND)
    sender = pylibsrtp.Session(policy)
    receiver = pylibsrtp.Session(pylibsrtp.Policy(key=key, ssrc_type=pylibsrtp.Policy.SSRC_ANY_INBOUND))
    rtp = bytes([0x80, 96, 0, 1, 0, 0, 0, 1, 0, 0, 0, 7]) + bytes(100)
    cost = RtpCost()
    cost.start()
    try:
        assert all(cls.__dict__[name] is not originals[cls, name] for _, cls, name in ENTRY_POINTS)
        assert receiver.unprotect(sender.protect(rtp)) == rtp  # wrapped, and working as before
    finally:
        cost.stop()
    assert all(cls.__dict__[name] is originals[cls, name] for _, cls, name in ENTRY_POINTS)
    assert cost.calls == {"receive: SRTP unprotect": 1}
    assert cost.seconds["receive: SRTP unprotect"] > 0


def test_rtp_cost_takes_nested_parts_out_and_keeps_the_kernels_apart() -> None:
    cost = RtpCost()
    (outer, inner), *_ = NESTED.items()
    cost.seconds.update({outer: 3.0, inner: 1.0, "receive: SRTP unprotect": 0.5})
    assert cost.by_part() == {outer: 2.0, inner: 1.0, "receive: SRTP unprotect": 0.5}
    assert inner == KERNEL and cost.removable() == 2.5


def test_rtp_section_says_what_the_ratio_would_be_without_the_removable_share() -> None:
    rtp = {
        variant: {
            "ms/frame by part": {"send: H.264 packetising": removable, KERNEL: 0.1},
            "calls/frame by part": {"send: H.264 packetising": 1.0, KERNEL: 8.0},
            "removable ms/frame": removable,
        }
        for variant, removable in (("transcode", 0.5), ("passthrough", 0.4))
    }
    rows, text = rtp_section(rtp, 6.0, 1.5)
    assert rows[-1] == {
        "part": "all but the kernel's sends",
        "transcode ms/frame": 0.5,
        "passthrough ms/frame": 0.4,
    }
    assert "transcode would be 5.50 and passthrough 1.10 ms" in text
    assert "5× less, against the 5× targeted and 4× measured" in text
