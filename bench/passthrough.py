"""Zero-transcode against transcode, on the same input in the same run: relay CPU per frame,
latency, sessions held. `python -m bench passthrough [--quick]`.

One live 512×512 30 fps H.264 source (bench.livesource: x264 ultrafast, no B-frames, a 1 s GOP,
2 Mbit/s, every frame's index in its pixels; in a child process with the trickle server and the
output readers) feeds sessions of the same size started through the gRPC API of in-process
RelayServers, so the input qualifies for passthrough (H.264 without B-frames at the session's
size). The processor is the embedded one (passthrough: no prompts) in a process of its own.

1. Per frame (bench.e2e's machinery): repeats of one session per variant, interleaved
   (transcode, passthrough, auto in each repeat), each measured over a window after a warm-up:
   relay CPU per returned frame (this process's CPU ÷ frames returned) and by thread, end-to-end
   latency by frame index, lost/repeated, output fps, round trip, the processor's CPU.
2. Capacity (bench.capacity's sweep): 1, 2, 4, 6, … concurrent sessions, each with its own
   processor process on this box, for transcode and then passthrough; a count holds when every
   session keeps ≥ 29 fps and p99 ≤ 250 ms in every window.

Every session's reported paths (GetSession: send_path, output_path, path_switches) are checked
against what its mode must give on this input: transcode encode/encode, passthrough and auto
forward/remux, no switch. A per-frame window whose session reports anything else is left out of
the figures (and said so); a capacity window with one does not hold. So a misconfigured run
cannot show a gain it did not measure.

The box is shared: a window in which something else (not the relay, its processors or the
source's process) kept more than capacity.OTHERS_MAX cores busy is discarded and run again after
a pause, as bench.capacity does, up to capacity.ATTEMPTS times (the last one counts regardless,
flagged).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import math
import os
import pstats
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc

from bench import capacity, e2e, report
from bench.capacity import ATTEMPTS, OTHERS_MAX, PAUSE
from bench.cpubreakdown import system_cpu
from bench.livesource import FPS, GOP, SourceProcess
from bench.readers import ReaderPool
from bench.rtpcost import RtpCost
from bench.threadnames import named_threads
from bench.webrtc import Processor
from relay_server import settings
from relay_server.api.relay.v1 import relay_service_pb2 as pb
from relay_server.api.relay.v1 import relay_service_pb2_grpc as pb_grpc
from relay_server.webrtc.link import LinkSettings

SIZE = (512, 512)  # the source's and the sessions': the input qualifies for passthrough
BITRATE = 2_000_000  # the source's
MODES = {
    "transcode": pb.SESSION_MODE_TRANSCODE,
    "passthrough": pb.SESSION_MODE_PASSTHROUGH,
    "auto": pb.SESSION_MODE_AUTO,
}
BASELINE = "transcode"
# What each mode must report on this input (send_path, output_path).
EXPECTED = {
    "transcode": ("encode", "encode"),
    "passthrough": ("forward", "remux"),
    "auto": ("forward", "remux"),
}
WINDOWS = {True: (6.0, 1), False: (20.0, 3)}  # per-frame windows: seconds, repeats (quick, full)
IDLE_SECONDS = {True: 3.0, False: 5.0}  # per repeat: the process with no session
PROFILE_SECONDS = {True: 5.0, False: 10.0}  # one passthrough window with the event loop profiled
PROFILED_NUMBER = 999  # its session's number
RTP_MODES = ["transcode", "passthrough"]  # one more window each, aiortc's RTP path timed (rtpcost)
RTP_NUMBER = 998
EVENT_LOOP = "event loop: HTTP, RTP, pacing, gRPC"  # e2e's stage
CAPACITY_MODES = ["transcode", "passthrough"]
# The capacity table's columns (bench.capacity.count_row's, and the mode and notes).
CAPACITY_COLUMNS = [
    "mode", "sessions", "holds", "held in", "fps min", "p99 ms worst", "lost", "of", "relay cores",
    "relay cores/session", "processors cores", "processors cores/session", "source+readers cores",
    "others cores", "box idle cores", "notes",
]  # fmt: skip
CAPACITY_COUNTS = {True: [1, 2, 4, 6], False: capacity.COUNTS[False]}
CAPACITY_SECONDS = {True: 5.0, False: 10.0}
CAPACITY_REPEATS = {True: 1, False: 2}

# Targets (issue).
TARGET_CPU_RATIO = 5.0  # ≥ 5× less relay CPU per frame
TARGET_SESSIONS_RATIO = 3.0  # ≥ 3× the sessions

# e2e's stages, as they read for both modes (the thread, not the codec work it may do).
STAGE_LABELS = {
    "input: demux, decode, scale": "input thread",
    "send leg: x264 (ours)": "send x264",
    "send leg: aiortc's encoder (stock)": "asyncio executor",
    "return leg: aiortc decode": "return decode",
    "output: x264, mux": "output thread",
    "event loop: HTTP, RTP, pacing, gRPC": "event loop",
    e2e.OTHER: "other threads",
    e2e.ENDED: "ended threads",
}


# -- pure arithmetic ------------------------------------------------------------------------------


def ratio(baseline: float, value: float) -> float:
    """baseline ÷ value: how many times less (CPU) or more (sessions, with the arguments swapped)."""
    if math.isnan(baseline) or math.isnan(value) or value <= 0:
        return math.nan
    return baseline / value


def at_least(value: float, target: float, what: str) -> str:
    """A verdict on a ratio that should be ≥ target."""
    if math.isnan(value):
        return f"not measured ({what})"
    if value >= target:
        return f"met: {value:.3g}× ≥ {target:g}×, {100 * (value / target - 1):.0f}% above the target ({what})"
    return (
        f"missed: {value:.3g}× < {target:g}×, {100 * (1 - value / target):.0f}% short of the target"
        f" (it needs {target / value:.2g}× more; {what})"
    )


def paths_problem(variant: str, reported: Mapping[str, Any]) -> str:
    """Empty when the session reported the paths its mode must give here, else what it reported."""
    send, output = reported.get("send path", ""), reported.get("output path", "")
    expected = EXPECTED[variant]
    if (send, output) != expected:
        return (
            f"{variant}: send_path {send!r} ({reported.get('send path reason', '')}), output_path"
            f" {output!r} ({reported.get('output path reason', '')}); expected {expected[0]}/{expected[1]}"
        )
    # auto decodes the GOP it joins the live input in (a backlog: only its newest frame is sent)
    # and forwards from the next keyframe: one switch at most, before the windows begin.
    if reported.get("path switches", 0) > (1 if variant == "auto" else 0):
        return f"{variant}: the send path switched {reported['path switches']} times"
    return ""


def net_ms_per_frame(cores: float, idle_cores: float, fps: float) -> float:
    """CPU ms per frame beyond what the process spends with no session at all."""
    if not fps or math.isnan(fps):
        return math.nan
    return 1000 * (cores - idle_cores) / fps


def others_cores(box: float, relay: float, processor: float, source: float) -> float:
    """Cores the box spent on anything but the relay, its processor(s) and the source's process."""
    return box - relay - processor - source


def shares(stages: Mapping[str, float]) -> list[tuple[str, float, float]]:
    """(stage, value, % of the total), largest first, the stages with nothing left out."""
    total = sum(value for value in stages.values() if not math.isnan(value))
    kept = [(stage, value) for stage, value in stages.items() if value > 0]
    kept.sort(key=lambda item: -item[1])
    return [(stage, value, 100 * value / total if total else math.nan) for stage, value in kept]


def bound(counts: Sequence[Mapping[str, Any]], cpus: int) -> dict[str, Any]:
    """What stopped a capacity sweep: the box's CPU at the first count that did not hold (or, if
    every count held, at the largest), split by who used it; and the relay's cores per session
    at the largest count that held, with the sessions the CPUs would hold for the relay alone."""
    measured = [count for count in counts if "relay cores" in count]
    held = [count for count in measured if count.get("holds")]
    failed = [count for count in measured if not count.get("holds")]
    edge = min(failed, key=lambda count: count["sessions"]) if failed else None
    if edge is None and measured:
        edge = max(measured, key=lambda count: count["sessions"])
    best = max(held, key=lambda count: count["sessions"]) if held else None
    result: dict[str, Any] = {"held": best["sessions"] if best else 0}
    if best is not None:
        per_session = best["relay cores"] / best["sessions"]
        result["relay cores/session"] = per_session
        result["processors cores/session"] = best["processors cores"] / best["sessions"]
        result["relay alone, sessions (extrapolated)"] = (
            math.floor(cpus / per_session) if per_session > 0 else math.nan
        )
    if edge is not None:
        users = {
            "processors": edge["processors cores"],
            "relay": edge["relay cores"],
            "source+readers": edge["source+readers cores"],
            "others": max(0.0, edge["others cores"]),
        }
        result.update(
            {
                "edge sessions": edge["sessions"],
                "edge holds": bool(edge.get("holds")),
                "edge idle cores": edge["box idle cores"],
                "edge cores": users,
                "cpu bound": edge["box idle cores"] < 0.15 * cpus,
                "largest user": max(users, key=lambda user: users[user]),
            }
        )
    return result


# -- per frame ------------------------------------------------------------------------------------


async def session_report(stub: pb_grpc.RelayServiceStub, session_id: str) -> dict[str, Any]:
    """The session's state and reported paths, as GetSession gives them (a stopped session's are
    its final ones)."""
    session = (await stub.GetSession(pb.GetSessionRequest(session_id=session_id))).session
    stats = session.stats
    return {
        "state": pb.SessionState.Name(session.state),
        "reason": session.reason,
        "send path": stats.send_path,
        "send path reason": stats.send_path_reason,
        "output path": stats.output_path,
        "output path reason": stats.output_path_reason,
        "path switches": stats.path_switches,
    }


class Compared(e2e.Bench):
    """bench.e2e's sessions with a session mode per variant. With each snapshot (e2e.Bench.run
    takes two: the window's ends) the box's busy CPU is taken, with `profile` set the event loop
    is profiled between them, and with `rtp` set aiortc's RTP path is timed (bench.rtpcost)."""

    def __init__(self, source: SourceProcess, processor: Processor) -> None:
        super().__init__(source, processor, dict.fromkeys(MODES, LinkSettings()), MODES)
        self.box: list[tuple[float, float]] = []  # (monotonic, box busy CPU seconds)
        self.profile = False
        self.profiler: cProfile.Profile | None = None
        self.profiled: pstats.Stats | None = None
        self.rtp = False
        self.rtp_cost: RtpCost | None = None  # of the last window with `rtp` set

    async def snapshot(self, session_id: str, variant: str) -> e2e.Snapshot:
        if self.profiler is not None:  # the window's end
            self.profiler.disable()
            self.profiled, self.profiler = pstats.Stats(self.profiler), None
        if self.rtp_cost is not None and len(self.box) == 1:  # the window's end
            self.rtp_cost.stop()
        snapshot = await super().snapshot(session_id, variant)
        self.box.append((snapshot.wall, system_cpu()[0]))
        if self.rtp and len(self.box) == 1:  # the window's start
            self.rtp_cost = RtpCost()
            self.rtp_cost.start()
        if self.profile and len(self.box) == 1:  # the window's start
            # This thread's: the event loop's. Wall time (a CPU-time timer would cost a system call
            # per event and inflate Python calls far more); the loop's waits in epoll are told
            # apart (WAITING).
            self.profiler = cProfile.Profile()
            self.profiler.enable()
        return snapshot

    async def idle(self, seconds: float) -> dict[str, Any]:
        """This process with the servers up and no session, the thread sampler running as in a
        window: the harness's and the idle servers' CPU, which every window includes."""
        sampler = e2e.ThreadSampler()
        wall, cpu = time.monotonic(), time.process_time()
        sampler.start()
        await asyncio.sleep(seconds)
        await sampler.stop()
        wall, cpu = time.monotonic() - wall, time.process_time() - cpu
        return {
            "seconds": round(wall, 2),
            "cores": cpu / wall,
            "ms/s by stage": {stage: 1000 * spent / wall for stage, spent in sampler.by_stage(cpu).items()},
        }

    async def window(
        self,
        variant: str,
        repeat: int,
        seconds: float,
        discarded: list[dict[str, Any]],
        attempts: int = ATTEMPTS,
    ) -> dict[str, Any]:
        """One session's window, run again (up to `attempts`) while something else loads the box."""
        width, height = SIZE
        for attempt in range(attempts):
            number = repeat * ATTEMPTS + attempt
            session_id = f"{variant}-{width}x{height}-{number}"
            self.box.clear()
            try:
                result = await self.run(variant, width, height, number, seconds)
            except Exception as error:
                reported: dict[str, Any] | str = "nothing (GetSession failed)"
                with contextlib.suppress(Exception):
                    reported = await session_report(self.stubs[variant], session_id)
                raise RuntimeError(f"{variant} session failed: {error!r}; it reports {reported}") from error
            result.update(await session_report(self.stubs[variant], session_id))
            result["paths problem"] = paths_problem(variant, result)
            (t0, busy0), (t1, busy1) = self.box[-2], self.box[-1]
            result["box busy cores"] = (busy1 - busy0) / (t1 - t0)
            result["others cores"] = others_cores(
                result["box busy cores"],
                result["cores"],
                result["processor cpu %"] / 100,
                result["source+reader cpu %"] / 100,
            )
            result["processor cpu ms/frame"] = (
                10 * result["processor cpu %"] / result["returned fps"]
                if result["returned fps"]
                else math.nan
            )
            if result["paths problem"]:
                print(f"  PATHS: {result['paths problem']}", flush=True)
            others = result["others cores"]
            if others <= OTHERS_MAX or attempt == attempts - 1:
                result["others over limit"] = others > OTHERS_MAX
                return result
            print(f"  discarded: something else used {others:.2f} cores; again in {PAUSE:g} s", flush=True)
            discarded.append({"variant": variant, "others cores": others})
            await asyncio.sleep(PAUSE)
        raise AssertionError("unreachable")


async def per_frame(source: SourceProcess, quick: bool) -> dict[str, Any]:
    seconds, repeats = WINDOWS[quick]
    attempts = 1 if quick else ATTEMPTS
    runs: dict[str, list[dict[str, Any]]] = {variant: [] for variant in MODES}
    idle: list[dict[str, Any]] = []
    discarded: list[dict[str, Any]] = []
    async with Processor() as processor:
        bench = Compared(source, processor)
        await bench.start()
        try:
            for repeat in range(repeats):  # interleaved: drift in the machine hits all alike
                idle.append(await bench.idle(IDLE_SECONDS[quick]))
                print(f"  idle: {idle[-1]['cores']:.3f} cores", flush=True)
                for variant in MODES:
                    runs[variant].append(await bench.window(variant, repeat, seconds, discarded, attempts))
            # One more passthrough window, profiled (its figures are not among the others').
            bench.profile, bench.box = True, []
            profiled = await bench.run("passthrough", *SIZE, PROFILED_NUMBER, PROFILE_SECONDS[quick])
            bench.profile = False
            # And one window per mode with aiortc's per-packet RTP path timed.
            rtp: dict[str, Any] = {}
            bench.rtp = True
            for variant in RTP_MODES:
                bench.box = []
                timed = await bench.run(variant, *SIZE, RTP_NUMBER, PROFILE_SECONDS[quick])
                assert bench.rtp_cost is not None
                rtp[variant] = rtp_figures(timed, bench.rtp_cost)
            bench.rtp = False
        finally:
            await bench.close()
    assert bench.profiled is not None
    profile = event_loop_profile(bench.profiled)
    return {
        "seconds": seconds,
        "repeats": repeats,
        "runs": runs,
        "idle": idle,
        "discarded": discarded,
        "profile": {
            "seconds": profiled["seconds"],
            "cpu ms/frame (profiled)": profiled["cpu ms/frame"],
            "event loop ms/frame (profiled)": profiled["threads ms/frame"].get(EVENT_LOOP, math.nan),
            "returned fps": profiled["returned fps"],
            "self seconds by part": profile,
            "top functions": top_functions(bench.profiled),
            "top functions, other": top_functions(bench.profiled, 10, UNATTRIBUTED),
        },
        "rtp": rtp,
    }


def rtp_section(
    rtp: Mapping[str, Mapping[str, Any]], transcode: float, passthrough: float
) -> tuple[list[dict[str, Any]], str]:
    """The table of aiortc's RTP path by part and mode, and what the CPU ratio would be with all
    of it but the kernel's UDP sends gone (the per-frame medians less the timed windows' share)."""
    parts = list(dict.fromkeys(part for figures in rtp.values() for part in figures["ms/frame by part"]))
    rows = [
        {
            "part": part,
            **{
                f"{variant} ms/frame": report.rounded(figures["ms/frame by part"].get(part, 0.0), 3)
                for variant, figures in rtp.items()
            },
            **{
                f"{variant} calls/frame": report.rounded(figures["calls/frame by part"].get(part, 0.0), 1)
                for variant, figures in rtp.items()
            },
        }
        for part in parts
    ]
    removable = {variant: figures["removable ms/frame"] for variant, figures in rtp.items()}
    rows.append(
        {
            "part": "all but the kernel's sends",
            **{f"{v} ms/frame": report.rounded(r, 3) for v, r in removable.items()},
        }
    )
    without = {
        "transcode": transcode - removable["transcode"],
        "passthrough": passthrough - removable["passthrough"],
    }
    floor = ratio(without["transcode"], without["passthrough"])
    text = (
        f"With all of that but the kernel's sends costing nothing (a per-packet path in C in its stead),"
        f" transcode would be {without['transcode']:.2f} and passthrough {without['passthrough']:.2f} ms"
        f" per frame (the per-frame medians above less these): {floor:.3g}× less, against the"
        f" {TARGET_CPU_RATIO:g}× targeted and {ratio(transcode, passthrough):.3g}× measured. The rest is the"
        f" trickle HTTP legs, asyncio's wake-ups, the sockets' receive side and the relay's own work per"
        f" frame, which every mode has."
    )
    return rows, text


def rtp_figures(window: dict[str, Any], cost: RtpCost) -> dict[str, Any]:
    frames = window["returned fps"] * window["seconds"]
    return {
        "seconds": window["seconds"],
        "cpu ms/frame": window["cpu ms/frame"],
        "ms/frame by part": {part: 1000 * spent / frames for part, spent in cost.by_part().items()},
        "calls/frame by part": {part: calls / frames for part, calls in cost.calls.items()},
        "removable ms/frame": 1000 * cost.removable() / frames,
    }


# -- the event loop's profile ----------------------------------------------------------------------

HARNESS = "bench harness (thread sampler, snapshots)"
# Where a function's self time goes, by the first fragment of its file's path that matches.
PARTS = [
    (
        "SRTP/DTLS (pylibsrtp, aiortc dtls)",
        ("pylibsrtp", "aiortc/rtcdtlstransport", "OpenSSL", "cryptography"),
    ),
    ("ICE, STUN (aioice)", ("aioice", "aiortc/rtcicetransport")),
    ("SCTP data channels", ("aiortc/rtcsctptransport", "aiortc/rtcdatachannel")),
    ("RTP/RTCP: packetise, parse, jitter buffer (aiortc)", ("aiortc/",)),
    ("trickle HTTP (aiohttp, relay trickle)", ("aiohttp", "yarl", "multidict", "relay_server/trickle")),
    ("relay: link, send track, jitter tap, pacing", ("relay_server/webrtc",)),
    ("relay: session, media hand-offs", ("relay_server/",)),
    ("gRPC", ("grpc",)),
    # The thread sampler reads /proc through pathlib; nothing on the relay's event loop does.
    (HARNESS, ("bench/", "pathlib")),
    ("asyncio loop, selectors", ("asyncio", "selectors", "socket.py", "threading.py")),
]
UNATTRIBUTED = "other"
SYSCALLS = "socket calls (UDP, TCP: the kernel)"
WAITING = "waiting in epoll (nothing to do)"


def part_of(filename: str) -> str:
    path = filename.replace("\\", "/")
    for part, fragments in PARTS:
        if any(fragment in path for fragment in fragments):
            return part
    return UNATTRIBUTED


def builtin_part(name: str) -> str | None:
    """The part a built-in function is, whoever called it: the kernel's socket calls and epoll."""
    if "select.epoll" in name:
        return WAITING
    if "_socket.socket" in name:
        return SYSCALLS
    return None


def event_loop_profile(stats: pstats.Stats) -> dict[str, float]:
    """Self time (seconds) by part, largest first. A built-in function (C: cffi, struct, PyAV)
    counts with whoever called it, by the time spent in it from each caller; socket calls count
    as SYSCALLS, and the loop's wait in epoll as WAITING (time the loop had nothing to do)."""
    parts: dict[str, float] = {}
    for (filename, _, name), (_, _, self_time, _, callers) in stats.stats.items():  # type: ignore[attr-defined]
        own = builtin_part(name) if filename == "~" else part_of(filename)
        if own is not None:
            parts[own] = parts.get(own, 0.0) + self_time
            continue
        attributed = 0.0
        for (caller_file, _, _), edge in callers.items():
            part = part_of(caller_file)
            parts[part] = parts.get(part, 0.0) + edge[2]
            attributed += edge[2]
        if self_time > attributed:
            parts[UNATTRIBUTED] = parts.get(UNATTRIBUTED, 0.0) + self_time - attributed
    return dict(sorted(parts.items(), key=lambda item: -item[1]))


def top_functions(stats: pstats.Stats, count: int = 15, part: str | None = None) -> list[dict[str, Any]]:
    """The functions with the most self time (WAITING left out), with their part; only those of
    `part` if given."""
    wanted = part
    rows = []
    for (filename, line, name), (_, calls, self_time, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        part = (builtin_part(name) or "C, counted with its caller") if filename == "~" else part_of(filename)
        if part == WAITING or (wanted is not None and part != wanted):
            continue
        where = name if filename == "~" else f"{'/'.join(Path(filename).parts[-2:])}:{line} {name}"
        rows.append({"function": where, "part": part, "calls": calls, "self seconds": self_time})
    rows.sort(key=lambda row: -row["self seconds"])
    return rows[:count]


EXTRA_FIGURES = ["box busy cores", "others cores", "processor cpu ms/frame"]


def variant_medians(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the windows whose session reported the expected paths (NaN if none did)."""
    valid = [run for run in runs if not run.get("paths problem")]
    if not valid:
        return {"windows": 0, "threads ms/frame": {}}
    medians = e2e._medians(valid)
    medians.update({key: report.median([run[key] for run in valid]) for key in EXTRA_FIGURES})
    medians["windows"] = len(valid)
    return medians


# -- capacity -------------------------------------------------------------------------------------


class CheckedSweep(capacity.Sweep):
    """capacity.Sweep whose windows do not hold unless every session reported the paths its mode
    must give (GetSession, once the sessions stopped)."""

    def __init__(self, *args: Any, variant: str, **kwargs: Any) -> None:
        super().__init__(*args, mode=MODES[variant], prefix=f"{variant}-", **kwargs)
        self.variant = variant

    async def run(self, count: int, seconds: float, repeat: int = 0) -> dict[str, Any]:
        result = await super().run(count, seconds, repeat)
        assert self.stub is not None
        reports: dict[str, dict[str, Any]] = {}
        for session_id in self.session_ids(count, repeat):
            with contextlib.suppress(grpc.aio.AioRpcError):  # never started
                reports[session_id] = await session_report(self.stub, session_id)
        result["paths"] = sorted({f"{r['send path']}/{r['output path']}" for r in reports.values()})
        problems = [problem for r in reports.values() if (problem := paths_problem(self.variant, r))]
        failed = [
            f"{sid}: {r['reason']}" for sid, r in reports.items() if r["state"] == "SESSION_STATE_FAILED"
        ]
        if failed:
            result["failed sessions"] = failed
        if problems:
            result["paths problems"] = problems
            result["holds"] = False
            print(f"  PATHS: {problems[0]} (and {len(problems) - 1} more)", flush=True)
        return result


async def capacity_sweeps(source: SourceProcess, quick: bool) -> dict[str, Any]:
    counts, seconds, repeats = CAPACITY_COUNTS[quick], CAPACITY_SECONDS[quick], CAPACITY_REPEATS[quick]
    attempts = 1 if quick else ATTEMPTS
    sweeps: dict[str, Any] = {}
    async with contextlib.AsyncExitStack() as stack:
        # Shared by the sweeps: started as counts need them.
        pool: list[Processor] = []
        readers = ReaderPool(stack, source.width, source.height)
        for variant in CAPACITY_MODES:
            print(f"  capacity, {variant}:", flush=True)
            sweep = CheckedSweep(
                source, stack, max(counts), size=SIZE, processors=pool, readers=readers, variant=variant
            )
            await sweep.start()
            results: dict[str, Any] = {"counts": [], "discarded": []}

            async def measure(
                count: int, sweep: CheckedSweep = sweep, results: dict[str, Any] = results
            ) -> bool:
                runs = [
                    await capacity.clean_run(sweep, count, seconds, repeat, results["discarded"], attempts)
                    for repeat in range(repeats)
                ]
                result = capacity.aggregate(count, runs)
                results["counts"].append(result)
                return bool(result["holds"])

            await capacity.sweep_counts(counts, measure)
            results["counts"].sort(key=lambda result: result["sessions"])
            results["bound"] = bound(results["counts"], os.cpu_count() or 1)
            results["held"] = results["bound"]["held"]
            sweeps[variant] = results
    return {"seconds": seconds, "repeats": repeats, "counts swept": counts, "sweeps": sweeps}


# -- the benchmark --------------------------------------------------------------------------------


async def run(quick: bool) -> dict[str, Any]:
    results: dict[str, Any] = {
        "quick": quick,
        "source": f"{SIZE[0]}x{SIZE[1]} {FPS} fps {BITRATE / 1e6:g} Mbit/s x264 ultrafast, no B-frames,"
        f" GOP {GOP:g} s",
        "size": f"{SIZE[0]}x{SIZE[1]}",
        "codec threads": settings.workers(),
    }
    with named_threads():
        async with SourceProcess(*SIZE, bitrate=BITRATE) as source:
            print("  per frame:", flush=True)
            results["per frame"] = await per_frame(source, quick)
            results["capacity"] = await capacity_sweeps(source, quick)
    return results


def main(quick: bool = False) -> Path:
    return write(report.timed_run(run, quick))


def _ms(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.2f} ms"


def write(results: dict[str, Any]) -> Path:
    """results/passthrough.json and passthrough.md from run()'s results."""
    cpus = os.cpu_count() or 1
    frame = results["per frame"]
    medians = {variant: variant_medians(runs) for variant, runs in frame["runs"].items()}
    results["medians"] = medians
    base = medians[BASELINE]
    idle_cores = report.median([idle["cores"] for idle in frame["idle"]])
    for median in medians.values():
        if median["windows"]:
            median["net cpu ms/frame"] = net_ms_per_frame(median["cores"], idle_cores, median["returned fps"])
    rows: list[dict[str, Any]] = []
    for variant, median in medians.items():
        windows = frame["runs"][variant]
        paths = sorted({f"{run['send path']}/{run['output path']}" for run in windows})
        if not median["windows"]:
            rows.append({"mode": variant, "windows ok": f"0/{len(windows)}", "paths": ", ".join(paths)})
            continue
        cpu = median["cpu ms/frame"]
        rows.append(
            {
                "mode": variant,
                "windows ok": f"{median['windows']}/{len(windows)}",
                "paths": ", ".join(paths),
                "CPU ms/frame": report.rounded(cpu, 2),
                "× less than transcode": report.rounded(ratio(base.get("cpu ms/frame", math.nan), cpu), 2),
                "net of idle ms/frame": report.rounded(median["net cpu ms/frame"], 2),
                "× less, net": report.rounded(
                    ratio(base.get("net cpu ms/frame", math.nan), median["net cpu ms/frame"]), 2
                ),
                "relay cores": report.rounded(median["cores"], 3),
                "p50 ms": report.rounded(median["p50 ms"], 1),
                "p95 ms": report.rounded(median["p95 ms"], 1),
                "p99 ms": report.rounded(median["p99 ms"], 1),
                "lost": median["lost"],
                "of": median["published"],
                "repeated": median["repeated"],
                "output fps": report.rounded(median["output fps"], 1),
                "round trip p50 ms": report.rounded(median["round trip p50 ms"], 1),
                "processor CPU %": report.rounded(median["processor cpu %"], 0),
                "processor ms/frame": report.rounded(median["processor cpu ms/frame"], 2),
                "others cores": report.rounded(median["others cores"], 2),
            }
        )
    columns = max(rows, key=len)
    rows = [{column: row.get(column) for column in columns} for row in rows]

    breakdown = []
    for variant, median in medians.items():
        row: dict[str, Any] = {"mode": variant}
        for stage, label in STAGE_LABELS.items():
            row[label] = report.rounded(median["threads ms/frame"].get(stage, 0.0), 2)
        breakdown.append(row)

    passthrough = medians["passthrough"]
    cpu_ratio = ratio(base.get("cpu ms/frame", math.nan), passthrough.get("cpu ms/frame", math.nan))
    auto_ratio = ratio(base.get("cpu ms/frame", math.nan), medians["auto"].get("cpu ms/frame", math.nan))
    parts = shares({STAGE_LABELS[stage]: ms for stage, ms in passthrough.get("threads ms/frame", {}).items()})
    where = ", ".join(f"{stage} {ms:.2f} ms ({share:.0f}%)" for stage, ms, share in parts)
    base_parts = shares({STAGE_LABELS[stage]: ms for stage, ms in base.get("threads ms/frame", {}).items()})
    base_where = ", ".join(f"{stage} {ms:.2f} ms ({share:.0f}%)" for stage, ms, share in base_parts)
    loop = {
        variant: medians[variant].get("threads ms/frame", {}).get(EVENT_LOOP, math.nan) for variant in MODES
    }
    loop_share = 100 * loop["passthrough"] / passthrough.get("cpu ms/frame", math.nan)
    cpu_why = (
        f"transcode {_ms(base.get('cpu ms/frame', math.nan))}/frame vs passthrough"
        f" {_ms(passthrough.get('cpu ms/frame', math.nan))}/frame. The codec work is gone; what is"
        f" left is mostly the event loop, {_ms(loop['passthrough'])}/frame ({loop_share:.0f}% of"
        f" passthrough's CPU), about what transcode's event loop spends too ({_ms(loop['transcode'])}):"
        " per RTP packet work in Python (aiortc's RTP/RTCP, SRTP, ICE), asyncio, socket calls and the"
        " trickle HTTP legs, split below"
    )

    sweeps = results["capacity"]["sweeps"]
    held = {variant: sweep["held"] for variant, sweep in sweeps.items()}
    sessions_ratio = (
        ratio(held.get("passthrough", 0), held.get("transcode", 0)) if held.get("transcode") else math.nan
    )
    capacity_rows = []
    for variant, sweep in sweeps.items():
        for result in sweep["counts"]:
            problems = [p for run in result["runs"] for p in run.get("paths problems", [])]
            errors = result.get("errors", [])
            notes = "; ".join([*errors[:1], *problems[:1]])
            capacity_rows.append({"mode": variant, **capacity.count_row(result), "notes": notes})
    capacity_rows = capacity.aligned(capacity_rows, CAPACITY_COLUMNS)

    bounds_text = []
    relay_alone: dict[str, float] = {}
    loop_cap: dict[str, float] = {}
    loop_ms: dict[str, float] = {}
    for variant, sweep in sweeps.items():
        b = sweep["bound"]
        line = f"- {variant}: held **{b['held']}**"
        if b.get("edge holds"):
            line += " (every count swept held: a lower bound)"
        if "relay cores/session" in b:
            relay_alone[variant] = b["relay alone, sessions (extrapolated)"]
            line += (
                f"; at {b['held']} the relay used {b['relay cores/session']:.3f} cores per session and the"
                f" processors {b['processors cores/session']:.3f}"
            )
        if "edge sessions" in b:
            cores = b["edge cores"]
            state = "held" if b["edge holds"] else "did not hold"
            line += (
                f". At {b['edge sessions']} sessions ({state}) the box had {b['edge idle cores']:.2f} of"
                f" {cpus} cores idle; processors {cores['processors']:.2f}, relay {cores['relay']:.2f},"
                f" source+readers {cores['source+readers']:.2f}, others {cores['others']:.2f}: "
            )
            if b["cpu bound"]:
                line += f"CPU-bound, and the largest user was the {b['largest user']}."
            else:
                line += "CPU was left idle."
        bounds_text.append(line)
        loop_ms[variant] = medians[variant].get("threads ms/frame", {}).get(EVENT_LOOP, math.nan)
        loop_cap[variant] = math.floor(1000 / (loop_ms[variant] * FPS)) if loop_ms[variant] > 0 else math.nan
    relay_ratio = ratio(relay_alone.get("passthrough", math.nan), relay_alone.get("transcode", math.nan))
    alone = (
        "- Without the processors on the box (extrapolated, not measured): the relay's cores per session"
        " at the count held would leave room for "
        + ", ".join(f"{variant} ~{n}" for variant, n in relay_alone.items())
        + f" sessions on {cpus} CPUs ({relay_ratio:.3g}×). But one relay process has one event loop, a"
        " single thread, and at the per-frame windows' "
        + ", ".join(f"{variant} {loop_ms[variant]:.2f}" for variant in loop_ms)
        + " ms of it per frame that caps a process near "
        + ", ".join(f"{variant} ~{loop_cap[variant]}" for variant in loop_cap)
        + " sessions (the loop's cost per session falls somewhat as sessions share its wake-ups): beyond"
        " that the relay needs more processes, whatever the mode."
    )

    rtp_rows, rtp_text = rtp_section(
        frame["rtp"], base.get("cpu ms/frame", math.nan), passthrough.get("cpu ms/frame", math.nan)
    )

    profile = frame["profile"]
    frames = profile["returned fps"] * profile["seconds"]
    # The relay's parts: the loop's waits and the bench's own work (the thread sampler) apart.
    busy = {
        part: spent
        for part, spent in profile["self seconds by part"].items()
        if part not in (WAITING, HARNESS)
    }
    harness_ms = 1000 * profile["self seconds by part"].get(HARNESS, 0.0) / frames if frames else math.nan
    total = sum(busy.values())
    profile_rows = [
        {
            "part of the event loop (passthrough)": part,
            "self ms/frame (profiled)": report.rounded(1000 * spent / frames, 3) if frames else math.nan,
            "share %": report.rounded(100 * spent / total, 1) if total else math.nan,
        }
        for part, spent in busy.items()
    ]
    profiled_ms = 1000 * total / frames if frames else math.nan
    sampler_ms = 1000 * idle_cores / FPS
    unprofiled_ms = passthrough.get("threads ms/frame", {}).get(EVENT_LOOP, math.nan)
    top_rows = [
        {
            "function": row["function"],
            "part": row["part"],
            "calls/frame": report.rounded(row["calls"] / frames, 1) if frames else math.nan,
            "self ms/frame (profiled)": report.rounded(1000 * row["self seconds"] / frames, 3)
            if frames
            else math.nan,
        }
        for row in profile.get("top functions", [])[:10]
    ]

    pt_bound = sweeps.get("passthrough", {}).get("bound", {})
    sessions_why = f"transcode {held.get('transcode', 0)}, passthrough {held.get('passthrough', 0)} sessions"
    if pt_bound.get("edge holds"):
        sessions_why += " (every passthrough count swept held: a lower bound)"
    if pt_bound.get("cpu bound") and pt_bound.get("largest user") == "processors":
        sessions_why += (
            "; bounded by the processors on the same box (aiortc decode + stock x264 per session),"
            " which passthrough does not change"
        )
    per_session = {
        variant: sweep["bound"].get("relay cores/session", math.nan) for variant, sweep in sweeps.items()
    }
    if "transcode" in per_session and "passthrough" in per_session:
        sessions_why += (
            f"; the relay itself used {per_session['transcode']:.3f} vs {per_session['passthrough']:.3f}"
            " cores per session at the counts held"
            f" ({ratio(per_session['transcode'], per_session['passthrough']):.3g}× less)"
        )
    results["verdicts"] = {
        "cpu ratio": cpu_ratio,
        "auto cpu ratio": auto_ratio,
        "sessions ratio": sessions_ratio,
        "relay alone sessions ratio (extrapolated)": relay_ratio,
    }
    lat = {variant: medians[variant] for variant in ("transcode", "passthrough")}
    latency_line = ", ".join(
        f"{variant} p50 {m.get('p50 ms', math.nan):.1f} / p99 {m.get('p99 ms', math.nan):.1f} ms"
        for variant, m in lat.items()
    )
    latency_line += (
        "; most of either is the WebRTC round trip through the processor (its jitter buffer, decode and"
        " stock x264 encode), p50 "
        + " / ".join(f"{m.get('round trip p50 ms', math.nan):.1f}" for m in lat.values())
        + " ms"
    )
    discarded = frame["discarded"]
    cap_discarded = sum(len(sweep["discarded"]) for sweep in sweeps.values())
    flagged = sum(1 for runs in frame["runs"].values() for run in runs if run.get("others over limit"))
    problems = [
        run["paths problem"] for runs in frame["runs"].values() for run in runs if run["paths problem"]
    ]
    problems_text = (
        "\n".join(f"  - {problem}" for problem in problems)
        if problems
        else "  none: every session reported them"
    )
    tries = 1 if results["quick"] else ATTEMPTS
    cap_flagged = sum(
        1
        for sweep in sweeps.values()
        for count in sweep["counts"]
        for run in count["runs"]
        if run.get("others over limit")
    )
    net_ratio = ratio(base.get("net cpu ms/frame", math.nan), passthrough.get("net cpu ms/frame", math.nan))
    idle_ms = 1000 * idle_cores / FPS
    notes = f"""
Targets (issue), passthrough against transcode on the same input in the same run:
- ≥ {TARGET_CPU_RATIO:g}× less relay CPU per frame: {at_least(cpu_ratio, TARGET_CPU_RATIO, cpu_why)}.
  Net of what the process spends with no session at all ({idle_cores:.3f} cores: the idle gRPC
  servers and the bench's thread sampler, {idle_ms:.2f} ms per frame at {FPS} fps): {net_ratio:.3g}×.
  auto (which forwards this input, so should equal passthrough): {auto_ratio:.3g}×.
- ≥ {TARGET_SESSIONS_RATIO:g}× the sessions: {at_least(sessions_ratio, TARGET_SESSIONS_RATIO, sessions_why)}.

Latency, end to end (output receive − input publish of the same frame, medians of the windows):
{latency_line}.

Where the relay's CPU goes, ms per returned frame: passthrough {where or "n/a"}; transcode
{base_where or "n/a"}.

CPU by thread, ms per returned frame (/proc/self/task/*/schedstat over the window; codec slice
threads count with the thread that started them):

{report.markdown_table(breakdown)}
- input thread: demuxing the input, then decode and scale (transcode), or the H.264 check
  (parameter sets, slice types, timestamps) and the hand-off of each access unit (passthrough);
- send x264: our WebRTC encoder (transcode only); return decode: aiortc's H.264 decoder of the
  returned frames (transcode only); asyncio executor: the default executor's threads;
- output thread: x264 and muxing (transcode), muxing the returned access units (passthrough);
- event loop: everything on the asyncio thread, split below; the bench's thread sampler runs there
  too, part of the {sampler_ms:.2f} ms per frame the process spends with no session.

The event loop in passthrough, by part: self time under cProfile (wall clock, the loop's waits
in epoll left out) over one more passthrough window of {profile["seconds"]:g} s, not among the windows
above. The profiler slows Python calls more than C, so read the shares: the parts add up to
{profiled_ms:.2f} ms per frame against the loop's {unprofiled_ms:.2f} ms unprofiled. A C call counts with
its Python caller, except socket calls (the kernel's UDP/TCP work). The bench's own work on the
loop (the thread sampler reading /proc, {harness_ms:.2f} ms per frame profiled) is left out:

{report.markdown_table(profile_rows)}
The functions with the most self time (profiled):

{report.markdown_table(top_rows)}
aiortc's per-packet RTP path, timed: thread CPU time (the kernel's share included) inside its
entry points, per returned frame, over one more window per mode ({", ".join(RTP_MODES)}, not among
the windows above; bench/rtpcost.py). Each runs once per packet (packetising: once per frame) and
does not wait; the wrappers' own cost is counted in, so these are upper bounds:

{report.markdown_table(rtp_rows)}
{rtp_text}

Capacity: concurrent {results["size"]} sessions on the same input, each with its own processor
process on this {cpus}-CPU box (held = the largest count at which every session kept ≥
{capacity.MIN_FPS:g} fps and p99 ≤ {capacity.MAX_P99_MS:g} ms in each of {results["capacity"]["repeats"]}
windows of {results["capacity"]["seconds"]:g} s: bench capacity's sweep and rule):

{report.markdown_table(capacity_rows)}
{chr(10).join(bounds_text)}
{alone}

How it was measured. {results["total seconds"]:g} s in all on {cpus} CPUs shared with other work.
Source: {results["source"]} (the frame index drawn in its pixels), one input channel for every
session; sessions {results["size"]} through the gRPC API, prompts empty (the processor passes frames
through, decoding them and re-encoding with aiortc's stock x264). Codec threads
{results["codec threads"]} (TRICKLE_WORKERS).
- Per frame: medians of {frame["repeats"]} interleaved repeats (transcode, passthrough, auto) of
  {frame["seconds"]:g} s windows, {e2e.WARMUP:g} s after the first returned frame, one session at a time on
  one processor process. CPU ms/frame: this process's CPU (time.process_time: every relay
  thread, codec threads included, the idle gRPC servers and the bench's thread sampler) ÷ frames
  returned by the processor; net of idle: less the process's CPU with no session (measured
  before each repeat, {IDLE_SECONDS[results["quick"]]:g} s); relay cores = CPU ÷ wall. Latency p50/p95/p99:
  output receive time − input publish time of the same frame index; lost: published in the
  window, never seen in the output; repeated: output frames showing an index already seen.
  output fps: frames encoded or remuxed into the output per second. round trip p50: the link's
  send → return. processor: its process's CPU (100 % = one core), and per returned frame.
- Paths: every session's send_path/output_path/path_switches from GetSession, checked against
  transcode = encode/encode, passthrough and auto = forward/remux with no switch (auto: one, from
  decoding the GOP it joined in to forwarding at the next keyframe); a window whose
  session reported otherwise is left out of the medians (`windows ok`), a capacity window with
  one does not hold. Problems:
{problems_text}
- Other load: a window in which the box's busy CPU (/proc/stat) beyond this process, the
  processors and the source's process exceeded {OTHERS_MAX:g} cores was discarded and run again
  after {PAUSE:g} s (at most {tries} tries, the last kept regardless): {len(discarded)} per-frame and
  {cap_discarded} capacity window(s) discarded; kept over the limit: {flagged} per-frame, {cap_flagged}
  capacity window(s) (`others cores` in the tables: what the kept windows saw, median).
"""
    return report.write(
        "passthrough", "Zero-transcode (passthrough) vs transcode, 512×512, same input", results, rows, notes
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one short repeat; 1, 2 and 4 sessions")
    print(main(parser.parse_args().quick).read_text())
