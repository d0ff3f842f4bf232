"""Capacity: how many concurrent 512×512 30 fps sessions one relay holds on this box, with their
processors on the same box, and what bounds each count.
`python -m bench.capacity [--quick] [--processor {effects,loopback}]… [--workers N]…
[--mode {transcode,passthrough}]` (`python -m bench [--quick] capacity`: the defaults).

One live indexed source (bench.livesource, in a child process with the trickle server: 1280×720
for transcode sessions, 512×512 for passthrough ones, whose input must qualify) publishes one
input channel that every session reads; each session has its own output channel, read and
decoded by its own reader (bench.readers: child processes of their own, a few sessions each, so
that reading is never the bound), and its own processor (`python -m relay_server processor`, a
process of its own: processors are single-tenant). All sessions start through the relay's gRPC
API, in the session mode asked for (StartSession's). The relay, by variant (--workers N,
repeatable; bench.relays):
- 1: an in-process RelayServer, so this process's CPU is the relay's (the "1 process" figure);
- N ≥ 2: `python -m relay_server serve --workers N` as a subprocess: a front serving gRPC that
  places each session on the worker process running the fewest; the relay's CPU is the front's
  and the workers', broken down per process.
Processors, by kind (--processor, repeatable):
- effects: the passthrough effect pipeline: the processor decodes and encodes every frame, about
  what the relay itself costs per session, so on a small box the processors bound the count;
- loopback (`processor --loopback`): returns the H.264 it receives as it is, at almost no cost,
  so the count finds the relay's own ceiling.
One sweep per (variant, kind), one after the other: by default (DEFAULT_PLAN) effects and loopback
in-process, then loopback with 2 workers (--quick: loopback in-process and with 2 workers); with
--workers or --processor, every variant asked for (else in-process) with every kind asked for
(else the default kinds).

The sweep runs 1, 2, 4, 6, 8, … sessions at once (quick: 1, 2, 4). For each count, REPEATS times
(sessions started anew each time): once every session has settled (returns ≈ 30 fps) and after a
warm-up, a window of `seconds`; then the sessions stop. Per session:
- output fps: distinct source frames (by the index in their pixels) whose first appearance on the
  session's output arrived in the window, ÷ the window: repeats (the relay's fill, processor
  re-sends) do not count;
- latency p50/p99: output receive time − input publish time of the same index, for the frames
  published in the window (bench.e2e.join).
A count holds when, in every window, every session keeps output fps ≥ MIN_FPS and p99 ≤
MAX_P99_MS. The sweep stops at the first count that does not hold, after trying the counts between
it and the last that held, downwards, until one holds. Over each window the CPU is broken down by
the relay's threads and the helper processes (bench.cpubreakdown), which says what bounds the count:
a thread at a core, the box, or nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import math
import os
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from bench import cpubreakdown, livesource, report
from bench.cpubreakdown import CpuWindow
from bench.e2e import join
from bench.livesource import FPS, SourceProcess
from bench.readers import SESSIONS_PER_READER, ReaderPool
from bench.relays import Counters, ServedRelay, relay_variant, variant_label
from bench.threadnames import named_threads
from bench.webrtc import Processor
from relay_server.api.relay.v1 import relay_service_pb2 as pb
from relay_server.api.relay.v1 import relay_service_pb2_grpc as pb_grpc
from relay_server.media.scaler import ScaleMode

SIZE = (512, 512)  # the sessions'
# The session modes swept (--mode) → StartSession's, and the source's size and bitrate: a
# passthrough session's input must be H.264 at the session's size (2 Mbit/s, as bench passthrough).
MODES = {"transcode": pb.SESSION_MODE_TRANSCODE, "passthrough": pb.SESSION_MODE_PASSTHROUGH}
SOURCES = {"transcode": ((1280, 720), livesource.BITRATE), "passthrough": (SIZE, 2_000_000)}
# Processor kinds (--processor) → the processor command's options; swept by default (quick: the
# relay's own ceiling only).
PROCESSORS = {"effects": [], "loopback": ["--loopback"]}
DEFAULT_PROCESSORS = {True: ["loopback"], False: ["effects", "loopback"]}
# The sweeps run by default, (workers, processor kind) in order (workers 1: in-process): the
# relay's own ceiling in one process and spread over two workers, and effects processors (what a
# real processor costs) in-process only, since with them the processors bound the count.
DEFAULT_PLAN = {
    True: [(1, "loopback"), (2, "loopback")],
    False: [(1, "effects"), (1, "loopback"), (2, "loopback")],
}
# With loopback processors only the relay bounds the count: far above where effects ones stop.
COUNTS = {True: [1, 2, 4], False: [1, 2, 4, 6, 8, 10, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64]}
SECONDS = {True: 5.0, False: 15.0}
# Windows per count: at the edge of the box a count holds in some windows and not in others, so a
# count holds only when it held in every one of them (the table says in how many it did).
REPEATS = {True: 1, False: 3}
# The box is shared: a window in which something else (not the relay, its processors or the
# harness) kept more than OTHERS_MAX cores busy measures that load, not the relay's. It is
# discarded and run again, up to ATTEMPTS times (after a pause); the last one counts regardless.
OTHERS_MAX = 0.15
ATTEMPTS = 3
PAUSE = 10.0
WARMUP = 2.0  # seconds after every session settled (below), not measured
# Settled: a session returned at least this many frames in the last second (a reported figure:
# loss and latency count from StartSession, settling included).
SETTLED_FPS = 28
SETTLE_TIMEOUT = 20.0
GRACE = 1.0  # seconds the sessions run on after the window: frames published late in it arrive
CONNECT_TIMEOUT = 30.0

# A count holds when every session keeps this (30 fps nominal: ≥ 29 allows 1 frame in 30 lost).
MIN_FPS = 29.0
MAX_P99_MS = 250.0  # over the whole session, from StartSession
MAX_LOST_SHARE = 1 / 30  # of the frames published from StartSession
TARGET_SESSIONS = 4  # issue: ≥ 4 sessions with the processors on the box


# -- the box ------------------------------------------------------------------------------------


def rss_bytes(pid: int | str = "self") -> int:
    """VmRSS of a process (/proc/<pid>/status), bytes; 0 when unavailable."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


async def until(condition: Callable[[], bool | Awaitable[bool]], within: float, what: str) -> None:
    """Poll `condition` (a relay's counters: read at once, or over gRPC) until it holds."""
    deadline = time.monotonic() + within
    while True:
        outcome = condition()
        held = outcome if isinstance(outcome, bool) else await outcome
        if held:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {what} within {within:g} s")
        await asyncio.sleep(0.05)


async def settle(returned: Callable[[], Awaitable[list[int]]], within: float) -> float:
    """Wait until every session returned ≥ SETTLED_FPS frames over the last second (`returned`:
    each one's frames returned so far; at most `within` seconds: the window then shows whatever
    they do); when they began to: the start of that second, not its end (the second over which the
    rate is counted is no part of the time they took), or the deadline."""
    history: list[tuple[float, list[int]]] = []
    deadline = time.monotonic() + within
    while True:
        counts = await returned()
        now = time.monotonic()
        history.append((now, counts))
        while len(history) > 1 and history[1][0] <= now - 1.0:
            history.pop(0)
        then, before = history[0]
        span = now - then
        if span >= 0.95 and all(b - a >= SETTLED_FPS * span for a, b in zip(before, counts, strict=True)):
            return then
        if now > deadline:
            return now
        await asyncio.sleep(0.1)


async def start_processors(
    stack: contextlib.AsyncExitStack, count: int, args: Sequence[str] = ()
) -> list[Processor]:
    """`count` processors (with the processor command's options `args`), started at once; each
    is stopped when `stack` closes."""
    processors = [Processor(args) for _ in range(count)]
    entered = await asyncio.gather(
        *(stack.enter_async_context(processor) for processor in processors), return_exceptions=True
    )
    for outcome in entered:
        if isinstance(outcome, BaseException):
            raise outcome
    return processors


# -- one count ----------------------------------------------------------------------------------


def session_figures(
    published: list[tuple[int, float]], received: list[tuple[int | None, float]], start: float, end: float
) -> dict[str, Any]:
    """One session's figures over [start, end) from the source's publish times and the output's
    (index or None, receive time) in output order."""
    wall = end - start
    first: dict[int, float] = {}
    for code, at in received:
        if code is not None and code not in first:
            first[code] = at
    fresh = sum(1 for at in first.values() if start <= at < end)
    in_window = sum(1 for _, at in received if start <= at < end)
    joined = join(published, received, start, end)
    return {
        "output fps": fresh / wall,
        "output frames/s, repeats included": in_window / wall,
        "p50 ms": 1000 * joined.percentile(50),
        "p99 ms": 1000 * joined.percentile(99),
        "max ms": 1000 * max(joined.latencies, default=math.nan),
        "published": joined.published,
        "lost": joined.lost,
        "repeated": joined.repeated,
        "unreadable": joined.unreadable,
    }


class Sweep:
    """Counts of concurrent sessions on one relay (`workers`: 1, in-process; N ≥ 2, `serve
    --workers N`): `size`, session `mode` (StartSession's; transcode by default), ids
    `<prefix><count>-<repeat>-<number>`. Processors (with the processor command's options
    `processor_args`) and reader processes are started as counts need them and kept;
    `processors` and `readers` share pools with another sweep."""

    def __init__(
        self,
        source: SourceProcess,
        stack: contextlib.AsyncExitStack,
        max_sessions: int,
        *,
        size: tuple[int, int] = SIZE,
        mode: pb.SessionMode = pb.SESSION_MODE_TRANSCODE,  # the transcoding path unless told
        prefix: str = "cap",
        processor_args: Sequence[str] = (),
        processors: list[Processor] | None = None,
        readers: ReaderPool | None = None,
        workers: int = 1,
    ) -> None:
        self.source = source
        self.stack = stack
        self.size = size
        self.mode = mode
        self.prefix = prefix
        self.processor_args = list(processor_args)
        self.processors: list[Processor] = processors if processors is not None else []
        self.readers = readers or ReaderPool(stack, source.width, source.height)
        self.relay = relay_variant(workers, max_sessions)
        self.stub: pb_grpc.RelayServiceStub | None = None

    async def start(self) -> None:
        await self.relay.start(self.stack)
        self.stub = self.relay.stub

    def session_ids(self, count: int, repeat: int) -> list[str]:
        return [f"{self.prefix}{count}-{repeat}-{number}" for number in range(count)]

    def cpu_window(self, processors: list[Processor]) -> CpuWindow:
        """CPU over a window of these processors' sessions (and of the relay's processes as they
        are now: a worker started again since has another pid)."""
        assert self.source.process is not None
        relay = self.relay.processes()
        return CpuWindow(
            {
                "processors": [processor.process.pid for processor in processors if processor.process],
                "source": [self.source.process.pid],
                "readers": self.readers.pids,
                "harness": [] if relay is None else [os.getpid()],  # else it is part of the relay
            },
            relay,
        )

    async def returned(self, session_ids: Sequence[str]) -> list[int]:
        return [counters.returned for counters in await self.relay.counters(session_ids)]

    async def run(self, count: int, seconds: float, repeat: int = 0) -> dict[str, Any]:
        assert self.stub is not None
        if len(self.processors) < count:
            missing = count - len(self.processors)
            self.processors += await start_processors(self.stack, missing, self.processor_args)
        processors = self.processors[:count]
        await self.readers.ensure(count)
        ids = self.session_ids(count, repeat)
        reading: list[str] = []  # sessions whose output a reader process reads
        started: list[str] = []
        started_at: dict[str, float] = {}  # when each session was asked for
        result: dict[str, Any] = {"sessions": count}
        window = self.cpu_window(processors)
        restarts = self.relay.restarts if isinstance(self.relay, ServedRelay) else 0
        asked = time.monotonic()
        try:
            for slot, (session_id, processor) in enumerate(zip(ids, processors, strict=True)):
                output_url = self.source.channel_url(session_id)
                await self.readers.read(slot, session_id, output_url, ScaleMode.LETTERBOX)
                reading.append(session_id)
                started_at[session_id] = time.monotonic()
                await self.stub.StartSession(
                    pb.StartSessionRequest(
                        session_id=session_id,
                        subscribe_url=self.source.input,
                        publish_url=output_url,
                        processor_url=processor.url,
                        width=self.size[0],
                        height=self.size[1],
                        mode=self.mode,
                    )
                )
                started.append(session_id)
            returned = functools.partial(self.returned, ids)

            async def every_session_returned() -> bool:
                return all(count > 0 for count in await returned())

            await until(every_session_returned, CONNECT_TIMEOUT, "returned frame from every session")
            result["settle seconds"] = await settle(returned, SETTLE_TIMEOUT) - asked
            if isinstance(self.relay, ServedRelay):  # where the front placed them (before the window)
                result["sessions by worker"] = await self.relay.sessions_by_worker()
            await asyncio.sleep(WARMUP)
            counters_before = await self.relay.counters(ids)
            await window.start()
            await asyncio.sleep(seconds)
            await window.stop()
            counters_after = await self.relay.counters(ids)
            await asyncio.sleep(GRACE)
        except Exception as error:  # a session that never returns a frame: the count does not hold
            result["error"] = f"{type(error).__name__}: {error}"
            print(f"  {count} sessions: {result['error']}", flush=True)
        finally:
            await asyncio.gather(
                *(self.stub.StopSession(pb.StopSessionRequest(session_id=sid)) for sid in started),
                return_exceptions=True,
            )
            collected = await asyncio.gather(
                *(self.readers.collect(session_id, within=0.5) for session_id in reading),
                return_exceptions=True,
            )
            for session_id, outcome in zip(reading, collected, strict=True):
                if isinstance(outcome, RuntimeError):  # the reader's error: nothing received
                    continue
                if isinstance(outcome, BaseException):
                    raise outcome
                result.setdefault("received", {})[session_id] = outcome["received"]
        if isinstance(self.relay, ServedRelay) and self.relay.restarts > restarts:
            result["worker restarts"] = self.relay.restarts - restarts
        if "error" in result:
            result.pop("received", None)
            return result
        start, end = window.start_wall, window.end_wall
        published = (await self.source.request("published", start=asked - 1, end=end + 1))["published"]
        sessions = []
        for session_id, before, after in zip(ids, counters_before, counters_after, strict=True):
            received = [(index, at) for index, at, _ in result["received"].pop(session_id, [])]
            figures = session_figures(published, received, start, end)
            # The whole session: every frame published from its StartSession on, settling included.
            whole = session_figures(published, received, started_at[session_id], end)
            for key in ("p50 ms", "p99 ms", "lost", "published"):
                figures[f"{key} from start"] = whole[key]
            figures["session"] = session_id
            figures["input replaced"] = after.input_replaced - before.input_replaced
            figures["output replaced"] = after.output_replaced - before.output_replaced
            figures["filled"] = after.filled - before.filled
            figures["round trip p50 ms"] = 1000 * after.round_trip_p50
            sessions.append(figures)
        del result["received"]
        wall = end - start
        in_window = sorted(at for _, at in published if start <= at < end)
        fps = [session["output fps"] for session in sessions]
        p99 = [session["p99 ms from start"] for session in sessions]
        whole_lost = [s["lost from start"] / max(1, s["published from start"]) for s in sessions]
        failed = []  # the rules the count broke, with by how much
        if not all(f >= MIN_FPS for f in fps):
            failed.append(f"fps min {min(fps):.1f} < {MIN_FPS:g}")
        if not all(p <= MAX_P99_MS for p in p99):
            window_p99 = max(session["p99 ms"] for session in sessions)
            failed.append(
                f"p99 {max(p99):.0f} ms from StartSession > {MAX_P99_MS:g}"
                f" ({window_p99:.0f} ms in the window)"
            )
        if not all(share <= MAX_LOST_SHARE for share in whole_lost):
            failed.append(f"a session lost {max(whole_lost):.1%} of its frames from StartSession")
        if "worker restarts" in result:  # its sessions failed
            failed.append(f"{result['worker restarts']} worker(s) died and were started again")
        cpu = window.figures()
        result.update(
            {
                "seconds": round(wall, 2),
                "holds": not failed,
                "failed on": failed,
                **cpu,
                "source+readers cores": cpu["source cores"] + cpu["readers cores"],
                "source fps": len(in_window) / wall,
                "paced ms/s": paced_ms_per_second(counters_before, counters_after, wall),
                "fps min": min(fps),
                "fps median": statistics.median(fps),
                "p50 ms worst": max(session["p50 ms from start"] for session in sessions),
                "p99 ms worst": max(p99),
                "lost": sum(session["lost from start"] for session in sessions),
                "of": sum(session["published from start"] for session in sessions),
                "per session": sessions,
            }
        )
        result["bound"] = cpubreakdown.bound(result, os.cpu_count() or 1, result["holds"], failed)
        print(
            f"  {count} sessions: {'holds' if result['holds'] else 'does not hold'}; fps min"
            f" {result['fps min']:.1f}, p99 worst {result['p99 ms worst']:.0f} ms, lost {result['lost']}"
            f" of {result['of']} from StartSession, settled in {result['settle seconds']:.1f} s; relay"
            f" {relay_cpu_text(cpu)}, processors {cpu['processors cores']:.2f}, source"
            f" {cpu['source cores']:.2f}, readers {cpu['readers cores']:.2f}, box"
            f" {cpu['box busy cores']:.2f}; bound: {result['bound']}",
            flush=True,
        )
        return result


def paced_ms_per_second(before: Sequence[Counters], after: Sequence[Counters], wall: float) -> float:
    """Per session, ms a second its frames were held back until due (NaN: the relay does not say)."""
    held = sum(end.paced_seconds - start.paced_seconds for start, end in zip(before, after, strict=True))
    return 1000 * held / wall / len(before)


def relay_cpu_text(cpu: dict[str, Any]) -> str:
    """The relay's cores for the progress line: with its event loop's, or each process's."""
    processes = cpu.get("relay processes")
    if processes is None:
        return f"{cpu['relay cores']:.2f} cores (event loop {cpu['relay event loop cores']:.2f})"
    each = ", ".join(
        f"{label} {process['cores']:.2f} (busiest thread {process['thread max cores']:.2f})"
        for label, process in processes.items()
    )
    return f"{cpu['relay cores']:.2f} cores ({each}), harness {cpu['harness cores']:.2f}"


# Besides the CPU breakdown's (cpubreakdown.FIGURES).
FIGURES = [
    "fps min",
    "fps median",
    "p50 ms worst",
    "p99 ms worst",
    "lost",
    "of",
    "source+readers cores",
    "source fps",
    "settle seconds",
]


def aggregate(count: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One count's runs: held in how many, the median of each figure over the measured ones, and
    what bounds it by those."""
    measured = [run for run in runs if "error" not in run]
    held = sum(1 for run in runs if run.get("holds"))
    result: dict[str, Any] = {"sessions": count, "held": held, "holds": held == len(runs), "runs": runs}
    errors = [run["error"] for run in runs if "error" in run]
    if errors:
        result["errors"] = errors
    if measured:
        result.update(cpubreakdown.aggregate(measured))
        result.update({key: report.median([run[key] for run in measured]) for key in FIGURES})
        failed = [*errors, *(failure for run in measured for failure in run["failed on"])]
        result["bound"] = cpubreakdown.bound(result, os.cpu_count() or 1, result["holds"], failed)
    placements = {
        "/".join(map(str, run["sessions by worker"].values())) for run in runs if "sessions by worker" in run
    }
    if placements:  # sessions on worker 0/1/…, as the front placed them in each run
        result["sessions by worker"] = ", ".join(sorted(placements))
    return result


async def clean_run(
    sweep: Sweep,
    count: int,
    seconds: float,
    repeat: int,
    discarded: list[dict[str, Any]],
    attempts: int = ATTEMPTS,
) -> dict[str, Any]:
    """A window in which nothing else used more than OTHERS_MAX cores, if one comes in
    `attempts` (session ids stay those of ATTEMPTS tries per repeat)."""
    for attempt in range(attempts):
        result = await sweep.run(count, seconds, repeat * ATTEMPTS + attempt)
        others = result.get("others cores", 0.0)
        if others <= OTHERS_MAX or attempt == attempts - 1:
            result["others over limit"] = others > OTHERS_MAX
            return result
        print(f"  discarded: something else used {others:.2f} cores; again in {PAUSE:g} s", flush=True)
        discarded.append({"sessions": count, "others cores": others, "held": result.get("holds", False)})
        await asyncio.sleep(PAUSE)
    raise AssertionError("unreachable")


async def sweep_counts(counts: list[int], measure: Callable[[int], Awaitable[bool]]) -> None:
    """Measure the counts in order until one does not hold; then the counts between the last
    that held and that one, downwards, until one holds."""
    last_held = 0
    for count in counts:
        if not await measure(count):
            for between in range(count - 1, last_held, -1):
                if await measure(between):
                    break
            return
        last_held = count


def plan(
    quick: bool, processors: Sequence[str] | None, workers: Sequence[int] | None
) -> list[tuple[int, str]]:
    """The sweeps, (workers, processor kind) in order: DEFAULT_PLAN unless told; told either,
    every variant asked for (else in-process) with every kind asked for (else the default)."""
    if not processors and not workers:
        return DEFAULT_PLAN[quick]
    kinds = list(processors or DEFAULT_PROCESSORS[quick])
    return [(count, kind) for count in dict.fromkeys(workers or [1]) for kind in kinds]


async def sweep_processors(
    source: SourceProcess, kind: str, mode: str, quick: bool, workers: int = 1
) -> dict[str, Any]:
    """The counts with `kind` processors and `mode` sessions, on a relay of their own (`workers`:
    1, in-process; N ≥ 2, `serve --workers N`); its processors and reader processes are stopped
    at the end."""
    counts, seconds = COUNTS[quick], SECONDS[quick]
    results: dict[str, Any] = {
        "processor": kind,
        "mode": mode,
        "workers": workers,
        "counts": [],
        "discarded": [],
    }
    async with contextlib.AsyncExitStack() as stack:
        sweep = Sweep(
            source,
            stack,
            max(counts),
            mode=MODES[mode],
            # Ids name the channels on the one trickle server: another relay's, other ids.
            prefix=f"{kind}-" if workers == 1 else f"{kind}-w{workers}-",
            processor_args=PROCESSORS[kind],
            workers=workers,
        )
        results["relay"] = sweep.relay.label
        await sweep.start()

        async def measure(count: int) -> bool:
            runs = [
                await clean_run(sweep, count, seconds, repeat, results["discarded"])
                for repeat in range(REPEATS[quick])
            ]
            result = aggregate(count, runs)
            results["counts"].append(result)
            return bool(result["holds"])

        await sweep_counts(counts, measure)
    if isinstance(sweep.relay, ServedRelay):  # stopped with the stack: it drained (0), or not
        results["relay exit code"] = sweep.relay.exit_code
        results["worker restarts"] = sweep.relay.restarts
    results["counts"].sort(key=lambda result: result["sessions"])
    held = [result["sessions"] for result in results["counts"] if result.get("holds")]
    results["held"] = max(held, default=0)
    return results


async def run(
    quick: bool,
    processors: Sequence[str] | None = None,
    mode: str = "transcode",
    workers: Sequence[int] | None = None,
) -> dict[str, Any]:
    """A sweep for each (relay variant, processor kind) of plan() in turn, `mode` sessions, all
    on one source."""
    sweeps = plan(quick, processors, workers)
    (width, height), bitrate = SOURCES[mode]
    results: dict[str, Any] = {
        "quick": quick,
        "seconds": SECONDS[quick],
        "warmup": WARMUP,
        "source": f"{width}x{height} {FPS} fps {bitrate / 1e6:g} Mbit/s, one input channel shared by"
        " every session",
        "size": f"{SIZE[0]}x{SIZE[1]}",
        "mode": mode,
        "plan": [{"workers": count, "processor": kind} for count, kind in sweeps],
        "sessions per reader process": SESSIONS_PER_READER,
        "repeats": REPEATS[quick],
        "min fps": MIN_FPS,
        "max p99 ms": MAX_P99_MS,
        "sweeps": {},
        "held": {},
    }
    with named_threads():  # the in-process relay's threads by kind (bench.cpubreakdown)
        async with SourceProcess(width, height, bitrate=bitrate) as source:
            for count, kind in sweeps:
                name = sweep_name(kind, count)
                print(f"  {name}, {mode} sessions:", flush=True)
                sweep = results["sweeps"][name] = await sweep_processors(source, kind, mode, quick, count)
                results["held"][name] = sweep["held"]
    return results


def sweep_name(kind: str, workers: int) -> str:
    """ "loopback processors, 1 process", "loopback processors, 2 workers"."""
    return f"{kind} processors, {variant_label(workers)}"


def main(
    quick: bool = False,
    processors: Sequence[str] | None = None,
    mode: str = "transcode",
    workers: Sequence[int] | None = None,
) -> Path:
    return write(
        report.timed_run(functools.partial(run, processors=processors, mode=mode, workers=workers), quick)
    )


def count_row(result: dict[str, Any]) -> dict[str, Any]:
    """One swept count (aggregate()'s result) as a report row; the figures only if a window ran."""
    count = result["sessions"]
    row: dict[str, Any] = {
        "sessions": count,
        "holds": "yes" if result["holds"] else "no",
        "held in": f"{result['held']}/{len(result['runs'])}",
    }
    if "fps min" in result:
        row.update(
            {
                "fps min": report.rounded(result["fps min"], 1),
                "fps median": report.rounded(result["fps median"], 1),
                "p50 ms worst": report.rounded(result["p50 ms worst"], 0),
                "p99 ms worst": report.rounded(result["p99 ms worst"], 0),
                "lost": result["lost"],
                "of": result["of"],
                "relay cores": report.rounded(result["relay cores"], 2),
                "relay cores/session": report.rounded(result["relay cores"] / count, 3),
                "processors cores": report.rounded(result["processors cores"], 2),
                "processors cores/session": report.rounded(result["processors cores"] / count, 3),
                "source+readers cores": report.rounded(result["source+readers cores"], 2),
                "others cores": report.rounded(result["others cores"], 2),
                "box idle cores": report.rounded(result["box idle cores"], 2),
                "source fps": report.rounded(result["source fps"], 1),
                "settle s": report.rounded(result["settle seconds"], 1),
                "bound": result["bound"],
            }
        )
    return row


def aligned(rows: list[dict[str, Any]], columns: list[str] | None = None) -> list[dict[str, Any]]:
    """Rows with the same columns, blank where missing: those of `columns` some row has (in that
    order), or else those of the fullest row."""
    if columns is None:
        columns = list(max(rows, key=len)) if rows else []
    present = [column for column in columns if any(column in row for row in rows)]
    return [{column: row.get(column) for column in present} for row in rows]


CAPACITY_COLUMNS = [
    "processor", "relay", "mode", "sessions", "holds", "held in", "fps min", "fps median", "p50 ms worst",
    "p99 ms worst", "lost", "of", "relay cores", "relay cores/session", "processors cores",
    "source+readers cores", "others cores", "box idle cores", "source fps", "settle s", "bound",
]  # fmt: skip


def held_line(name: str, sweep: dict[str, Any]) -> str:
    """One sweep in words: held, the relay's cores per session there, and what bounds the
    largest count measured."""
    failed = [result["sessions"] for result in sweep["counts"] if not result["holds"]]
    if failed:
        stop = f"{min(failed)} sessions did not hold"
    else:
        stop = f"every count swept held: the sweep ended at {sweep['held']}"
    verdict = "met" if sweep["held"] >= TARGET_SESSIONS else "missed"
    line = f"- {name}, {sweep['mode']} sessions: held **{sweep['held']}** at once ({stop})"
    by_count = {result["sessions"]: result for result in sweep["counts"]}
    if "relay cores" in by_count.get(sweep["held"], {}):
        line += f", relay {by_count[sweep['held']]['relay cores'] / sweep['held']:.3f} cores/session there"
    measured = [result for result in sweep["counts"] if "bound" in result]
    if measured:
        largest = measured[-1]
        line += f"; bound at {largest['sessions']} sessions, the most measured: {largest['bound']}"
    line += f". Target ≥ {TARGET_SESSIONS}: {verdict}. {len(sweep['discarded'])} window(s) discarded."
    if "relay exit code" in sweep:
        line += (
            f" serve exited with {sweep['relay exit code']} on SIGTERM (0: drained);"
            f" {sweep['worker restarts']} worker restart(s)."
        )
    return line


def write(results: dict[str, Any]) -> Path:
    cpus = os.cpu_count() or 1
    rows, breakdown, held_lines = [], [], []
    for name, sweep in results["sweeps"].items():
        sweep_of = {"processor": sweep["processor"], "relay": sweep["relay"], "mode": sweep["mode"]}
        for result in sweep["counts"]:
            rows.append({**sweep_of, **count_row(result)})
            if "relay cores" in result:
                breakdown.append(
                    {
                        **sweep_of,
                        "sessions": result["sessions"],
                        "holds": "yes" if result["holds"] else "no",
                        **cpubreakdown.table_row(result),
                        "per worker": result.get("sessions by worker"),
                        "bound": result["bound"],
                    }
                )
        held_lines.append(held_line(name, sweep))
    rows = aligned(rows, CAPACITY_COLUMNS)
    breakdown = aligned(breakdown)
    held_text = "\n".join(held_lines)
    repeats, seconds = results["repeats"], results["seconds"]
    notes = f"""
{held_text}

The target (issue) is ≥ {TARGET_SESSIONS} sessions with their processors on the same box. Processors:
effects = the passthrough effect pipeline (the processor decodes every frame and encodes it again
with aiortc's stock x264: per session about what the relay costs); loopback (`processor
--loopback`) = the H.264 received sent back as it is, at almost no cost, so that the relay's own
ceiling shows. Sessions: {results["mode"]} (StartSession's mode).

A count holds when, in each of {repeats} runs (sessions started anew for each), every session,
over its whole life from StartSession (settling included), loses at most one frame in 30 of those
published and keeps end-to-end p99 ≤ {MAX_P99_MS:g} ms, and keeps output fps ≥ {MIN_FPS:g} in a
window of {seconds:g} s from {WARMUP:g} s after every session settled (settle s, below), where CPU is
measured; `held in` says in how many runs it did, the figures are medians over the runs.
{results["total seconds"]:g} s in all, on {cpus} CPUs. Source: {results["source"]};
sessions {results["size"]} letterboxed, each with its own output channel, its own output reader
and its own processor process, all started through the gRPC API.

- The box is shared with other work: a window in which something else kept more than
  {OTHERS_MAX:g} cores busy (`others`) is discarded and run again after {PAUSE:g} s, up to {ATTEMPTS} times
  (the last one counts regardless).
- fps min / median: over the sessions, distinct source frames (by the index in their pixels) that
  first appeared on the session's output in the window, ÷ the window; the relay's fill and any
  repeats do not count. p50/p99 worst: the worst session's over its whole life from
  StartSession, output receive − input publish of the same frame (as in bench e2e). lost/of:
  frames published from each session's StartSession on that never came out, summed over the
  sessions.
- relay: the variant. 1 process = a RelayServer in the benchmark's own process (SessionManager
  with the sweep's max_sessions, default LinkSettings). N workers = `python -m relay_server serve
  --workers N` as a subprocess (--max-sessions the same, across its workers; every other option
  at its default: RELAY_* variables but RELAY_EVENT_LOOP are left out of its environment,
  TRICKLE_* ones pass), sessions started through its front, which places each on the worker
  running the fewest: nothing the in-process relay is given is out of reach of serve's flags.
  Its counters come from GetSession (polled while the sessions settle, not in the window), which
  has no pacing time (`paced ms/s` NaN in the JSON).
- CPU, in cores (1 = one CPU busy) over the window: relay = for 1 process, this process (every
  relay thread, the idle gRPC server and the harness's own polling on the event loop); for N
  workers, the front and the worker processes (/proc), and the harness (this process) apart;
  processors = every processor process; source+readers = the source's child process (the live
  source's x264, the trickle server) and the reader processes ({results["sessions per reader process"]}
  sessions each: one decoder per output): load a real deployment would not put on the relay's box.
  others = the box's busy time (/proc/stat) minus those: anything else running meanwhile. box
  idle: what was left.
- source fps: frames the live source published in the window; below 30 the box was too busy for
  the source itself, which the sessions then see as input jitter.
- settle s: StartSession of the first session → the start of the first second in which every
  session returned ≥ {SETTLED_FPS} frames; the window starts {WARMUP:g} s after that second (at most
  {SETTLE_TIMEOUT:g} s is waited for: a count that never settles is measured anyway). Every session
  joins the live input mid-segment: the segment so far is skipped to the live edge (join_skipped),
  not counted as lost.
- bound: every thread at ≥ {cpubreakdown.SATURATED:g} of a core (one thread runs on one core at a time:
  it cannot do more; with workers, each process's busiest thread too, named by its process),
  busiest first, and the box when ≥ {cpubreakdown.SATURATED:g} × {cpus} cores were busy; "none" when neither
  and the count held.

CPU by thread and process over the window, in cores (medians over the runs): the relay's threads by
kind (the event loop: HTTP, RTP, pacing, gRPC calls; decode: the input's demux, decode and scale,
with their codec threads; send-encode: our x264 for the send leg; return decode: aiortc's decoder
of the returned video; output-encode: the output's x264 and mux; grpc: gRPC's own threads; other:
the rest, and threads that ended in the window), "Σ / max" = all of that kind / the busiest single
thread; processors and readers "Σ / max" = all of them / the busiest process, `processor thread
max` = the busiest thread of any processor. With workers, the kinds sum over the front and the
workers (whose threads' names are their kernel names, cut at 15 characters), `front /max` and
`worker K /max` = that process / its busiest thread, harness = this process, and `per worker` =
the sessions each worker ran, as the front placed them (its metrics, once they settled; one entry
per distinct placement over the runs). The JSON names each kind's busiest thread (and process).

{report.markdown_table(breakdown)}"""
    return report.write("capacity", "Capacity: concurrent 512×512 30 fps sessions", results, rows, notes)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1, 2 and 4 sessions, short windows")
    parser.add_argument(
        "--processor",
        action="append",
        choices=PROCESSORS,
        help="the processors' kind (repeat for several sweeps, in that order); default: effects"
        " then loopback (--quick: loopback)",
    )
    parser.add_argument(
        "--workers",
        action="append",
        type=int,
        metavar="N",
        help="the relay (repeat for several sweeps, in that order): 1, in this process; N ≥ 2, `serve"
        " --workers N` as a subprocess; default: 1 (with neither this nor --processor: effects and"
        " loopback in-process, then loopback with 2 workers; --quick: loopback in-process and with 2)",
    )
    parser.add_argument("--mode", choices=MODES, default="transcode", help="the sessions' video mode")
    parser.add_argument(
        "--counts",
        type=lambda text: [int(count) for count in text.split(",")],
        help="the session counts swept, e.g. 4,8,16,32 (a machine with many cores: bench/manycore)",
    )
    parser.add_argument("--windows", type=int, help=f"windows per count (default {REPEATS[False]})")
    parser.add_argument("--seconds", type=float, help=f"seconds per window (default {SECONDS[False]:g})")
    args = parser.parse_args()
    if any(count < 1 for count in args.workers or []):
        parser.error("--workers: 1 (in-process) or more")
    if any(count < 1 for count in args.counts or []) or (args.windows or 1) < 1 or (args.seconds or 1) <= 0:
        parser.error("--counts, --windows and --seconds: positive")
    # The sweep's shape, told: this run's only (one process, one sweep plan).
    COUNTS[args.quick] = sorted(set(args.counts or COUNTS[args.quick]))
    REPEATS[args.quick] = args.windows or REPEATS[args.quick]
    SECONDS[args.quick] = args.seconds or SECONDS[args.quick]
    print(main(args.quick, args.processor, args.mode, args.workers).read_text())
