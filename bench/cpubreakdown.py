"""Who used the CPU over a window, and what bounded it: the relay's threads by kind, the helper
processes (processors, the source's, the readers') with their busiest threads, and the box.

- The relay, in this process (bench.relays.InProcessRelay): every thread, sampled each second
  (e2e.ThreadSampler: a thread that ends meanwhile counts up to its last sample), grouped by kind
  from its name (e2e's stages, and gRPC's threads); what the process spent beyond its sampled
  threads (threads that ended between samples) counts as "other".
- The relay in processes of its own (bench.relays.ServedRelay: the front and its workers): each
  process's CPU and its threads' as for a helper (below), grouped by kind as in-process (their
  threads are named alike; a process's main thread is its event loop); threads born in the
  window count from 0, what ended in it as "other". Per process too: its CPU and its busiest
  thread. This process is then the harness, a helper of its own.
- A helper process: its own CPU (utime + stime), and its threads' at the window's ends only (its
  busiest thread lives as long as it does), read on a worker thread: with dozens of processes
  that is thousands of files, which would stall the event loop. Its main thread is its event loop.
- The box: /proc/stat.

A thread runs on one core at a time: one at SATURATED of a core or more bounds whatever it serves.
So does the box at SATURATED of its CPUs.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench import report
from bench.child import process_cpu_seconds
from bench.e2e import OTHER, ThreadSampler, stage_of, thread_cpu

SATURATED = 0.9

# The relay's threads by kind: e2e's stages by thread name, as they read here (aiortc's default
# executor serves no stage of the relay's own), and gRPC's threads (C-core's and the aio poller)
# out of e2e's other threads.
KIND_OF_STAGE = {
    "event loop: HTTP, RTP, pacing, gRPC": "event loop",
    "input: demux, decode, scale": "decode",
    "send leg: x264 (ours)": "send-encode",
    "return leg: aiortc decode": "return decode",
    "output: x264, mux": "output-encode",
}
# The aio poller is "Thread-N (_poll_wrapper)", in a kernel name cut to "Thread-N (_poll".
GRPC_THREADS = ("grpc", "event_engine", "lifeguard", "(_poll")
KINDS = [*KIND_OF_STAGE.values(), "grpc", "other"]
# Helper processes by group (the key of its figures) → what one of them is called.
# The harness: this process, when the relay runs in processes of its own.
HELPERS = {"processors": "processor", "source": "source", "readers": "reader", "harness": "harness"}
EVENT_LOOP = "event loop"  # a helper process's main thread
RELAY = "relay"  # the relay's processes among a window's ends (when out of this process)
MAIN_THREAD = "MainThread"  # a relay process's main thread, by its Python name: its event loop


def system_cpu() -> tuple[float, float]:
    """CPU seconds the whole box has been busy and idle so far, over all CPUs (/proc/stat)."""
    try:
        fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return math.nan, math.nan
    idle = fields[3] + fields[4]  # idle + iowait
    busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal
    tick = os.sysconf("SC_CLK_TCK")
    return busy / tick, idle / tick


def relay_kind(name: str) -> str:
    stage = stage_of(name)
    if stage == OTHER and any(part in name for part in GRPC_THREADS):
        return "grpc"
    return KIND_OF_STAGE.get(stage, "other")


def thread_key(who: str) -> str:
    """The figure of the busiest thread of `who`: a relay kind or a helper group."""
    return f"relay {who} thread max cores" if who in KINDS else f"{who} thread max cores"


# Every busiest-thread figure → whose thread it is.
THREAD_FIGURES = {
    **{thread_key(kind): f"relay {kind}" for kind in KINDS},
    **{thread_key(group): one for group, one in HELPERS.items()},
}
# Every figure a window gives (besides "busiest threads", their names), in cores.
FIGURES = [
    "relay cores",
    *(f"relay {kind} cores" for kind in KINDS),
    *(f"{group} {figure}" for group in HELPERS for figure in ("cores", "max cores")),
    *THREAD_FIGURES,
    "box busy cores",
    "box idle cores",
    "others cores",
]

ProcessCpu = tuple[float, float, dict[int, tuple[str, float]]]  # when read, its CPU, its threads'
Threads = list[tuple[float, str]]  # (cores, name) of each thread over the window


def _process_cpu(pids: Sequence[int]) -> list[ProcessCpu]:
    """Per process: when read, its CPU seconds so far, and its threads'."""
    return [(time.monotonic(), process_cpu_seconds(pid), thread_cpu(pid)) for pid in pids]


class CpuWindow:
    """CPU from start() to stop(), of the relay, of the helper processes (`helpers`: pids by
    HELPERS group) and of the box; figures() then. The relay is this process, or the processes
    `relay` names (pids by label: "front", "worker 0", …). `start_wall` and `end_wall` are the
    window's ends (time.monotonic)."""

    def __init__(self, helpers: Mapping[str, Sequence[int]], relay: Mapping[str, int] | None = None) -> None:
        self.helpers = {group: list(helpers.get(group, [])) for group in HELPERS}
        self.relay = dict(relay) if relay is not None else None
        self.sampler = ThreadSampler()
        self.start_wall = self.end_wall = math.nan
        self._relay: list[float] = []  # in this process: process_time at the ends
        self._box: list[tuple[float, float]] = []
        self._ends: list[dict[str, list[ProcessCpu]]] = []  # helper groups', and the relay's

    async def start(self) -> None:
        self._ends.append(await asyncio.to_thread(self._processes_now))
        if self.relay is None:
            self.sampler.start()
        self.start_wall = time.monotonic()
        self._relay.append(time.process_time())
        self._box.append(system_cpu())

    async def stop(self) -> None:
        self.end_wall = time.monotonic()
        self._relay.append(time.process_time())
        self._box.append(system_cpu())
        if self.relay is None:
            await self.sampler.stop()
        self._ends.append(await asyncio.to_thread(self._processes_now))

    def _processes_now(self) -> dict[str, list[ProcessCpu]]:
        ends = {group: _process_cpu(pids) for group, pids in self.helpers.items()}
        if self.relay is not None:
            ends[RELAY] = _process_cpu(list(self.relay.values()))
        return ends

    def _relay_processes(self) -> dict[str | None, tuple[float, Threads]]:
        """Each relay process's cores and its threads' (label None: this process)."""
        wall = self.end_wall - self.start_wall
        if self.relay is None:
            first, last = self.sampler.first, self.sampler.last
            threads = [
                ((seconds - first.get(tid, (name, 0.0))[1]) / wall, name)  # born in the window: from 0
                for tid, (name, seconds) in last.items()
            ]
            return {None: ((self._relay[1] - self._relay[0]) / wall, threads)}
        processes: dict[str | None, tuple[float, Threads]] = {}
        before, after = self._ends[0][RELAY], self._ends[1][RELAY]
        for (label, pid), (t0, cpu0, threads0), (t1, cpu1, threads1) in zip(
            self.relay.items(), before, after, strict=True
        ):
            threads = []
            for tid, (name, seconds) in threads1.items():
                born = threads0.get(tid, (name, 0.0))[1]  # born in the window: from 0
                threads.append(((seconds - born) / (t1 - t0), MAIN_THREAD if tid == pid else name))
            processes[label] = ((cpu1 - cpu0) / (t1 - t0), threads)
        return processes

    def figures(self) -> dict[str, Any]:
        wall = self.end_wall - self.start_wall
        figures: dict[str, Any] = {}
        busiest: dict[str, str] = {}
        busiest_processes: dict[str, str] = {}  # of the relay's kinds, out of this process
        spent: dict[str, list[tuple[float, str, str | None]]] = {kind: [] for kind in KINDS}
        relay = ended = 0.0
        per_process: dict[str, dict[str, Any]] = {}
        for label, (cores, threads) in self._relay_processes().items():
            relay += cores
            for thread_cores, name in threads:
                spent[relay_kind(name)].append((thread_cores, name, label))
            # What no thread accounts for: threads that ended in the window (between samples).
            ended += max(0.0, cores - sum(thread_cores for thread_cores, _ in threads))
            if label is not None:
                top_cores, top_name = max(threads, default=(0.0, ""))
                per_process[label] = {
                    "cores": cores,
                    "thread max cores": top_cores,
                    "busiest thread": top_name,
                    "busiest kind": relay_kind(top_name),
                }
        figures["relay cores"] = relay
        for kind, of_kind in spent.items():
            top = max(of_kind, default=(0.0, "", None))
            figures[f"relay {kind} cores"] = sum(cores for cores, _, _ in of_kind) + (
                ended if kind == "other" else 0
            )
            figures[thread_key(kind)] = top[0]
            busiest[thread_key(kind)] = top[1]
            if top[2] is not None:
                busiest_processes[thread_key(kind)] = top[2]
        helpers = 0.0
        before, after = self._ends
        for group, pids in self.helpers.items():
            processes, helper_threads = [], []
            for pid, (t0, cpu0, threads0), (t1, cpu1, threads1) in zip(
                pids, before[group], after[group], strict=True
            ):
                processes.append((cpu1 - cpu0) / (t1 - t0))
                for tid, (name, seconds) in threads1.items():
                    if tid in threads0:  # lived through the window
                        cores = (seconds - threads0[tid][1]) / (t1 - t0)
                        helper_threads.append((cores, EVENT_LOOP if tid == pid else name))
            helper_top = max(helper_threads, default=(0.0, ""))
            figures[f"{group} cores"] = sum(processes)
            figures[f"{group} max cores"] = max(processes, default=0.0)
            figures[thread_key(group)] = helper_top[0]
            busiest[thread_key(group)] = helper_top[1]
            helpers += sum(processes)
        box_busy = (self._box[1][0] - self._box[0][0]) / wall
        figures["box busy cores"] = box_busy
        figures["box idle cores"] = (self._box[1][1] - self._box[0][1]) / wall
        figures["others cores"] = box_busy - relay - helpers
        figures["busiest threads"] = busiest
        if per_process:
            figures["busiest processes"] = busiest_processes
            figures["relay processes"] = per_process
        return figures


def aggregate(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Windows' figures (one at least) as one: the median of each, and the name of each busiest
    thread (and its relay process) in the window where it was busiest; per relay process, the
    medians over the windows it ran in, its busiest thread named likewise."""
    result: dict[str, Any] = {key: report.median([run[key] for run in runs]) for key in FIGURES}
    result["busiest threads"], busiest_processes = {}, {}
    for key in THREAD_FIGURES:
        top = max(runs, key=lambda run: run[key])
        result["busiest threads"][key] = top["busiest threads"][key]
        if key in top.get("busiest processes", {}):
            busiest_processes[key] = top["busiest processes"][key]
    labels = dict.fromkeys(label for run in runs for label in run.get("relay processes", {}))
    if labels:
        result["busiest processes"] = busiest_processes
        result["relay processes"] = {}
        for label in labels:
            ran = [run["relay processes"][label] for run in runs if label in run["relay processes"]]
            top = max(ran, key=lambda process: process["thread max cores"])
            result["relay processes"][label] = {
                "cores": report.median([process["cores"] for process in ran]),
                "thread max cores": report.median([process["thread max cores"] for process in ran]),
                "busiest thread": top["busiest thread"],
                "busiest kind": top["busiest kind"],
            }
    return result


def _who(key: str, name: str, process: str | None = None) -> str:
    """How a bound calls the busiest thread of figure `key`, named `name`, of relay process
    `process` (None: in this process, or a helper's)."""
    who = THREAD_FIGURES[key]
    if process is not None:
        who = f"{process} {who.removeprefix('relay ')}"  # "worker 1 decode"
    if key == thread_key(EVENT_LOOP):
        return who
    if name == EVENT_LOOP:
        return f"{who} {EVENT_LOOP}"
    return f"{who} thread ({name})"


def bound(figures: Mapping[str, Any], cpus: int, holds: bool, failed: Sequence[str]) -> str:
    """What bounds a count: every busiest thread at SATURATED of a core or more (each kind's and
    each relay process's, busiest first), and the box at SATURATED of its CPUs; if neither,
    "none" when the count held, else the rules it broke (`failed`), which no CPU explains."""
    names, processes = figures["busiest threads"], figures.get("busiest processes", {})
    candidates = [(figures[key], _who(key, names[key], processes.get(key))) for key in THREAD_FIGURES]
    for label, process in figures.get("relay processes", {}).items():
        key = thread_key(process["busiest kind"])
        candidates.append((process["thread max cores"], _who(key, process["busiest thread"], label)))
    busiest: dict[str, float] = {}  # a thread both its kind's and its process's busiest: once
    for cores, who in candidates:
        busiest[who] = max(cores, busiest.get(who, 0.0))
    threads = sorted(((cores, who) for who, cores in busiest.items()), reverse=True)
    saturated = [f"{who} {cores:.2f} cores" for cores, who in threads if cores >= SATURATED]
    box = figures["box busy cores"]
    if box >= SATURATED * cpus:
        saturated.append(f"box {box:.2f} of {cpus} cores busy")
    if saturated:
        return "; ".join(saturated)
    if holds:
        return "none"
    cores, who = threads[0]
    return (
        f"no CPU bound (busiest thread: {who} {cores:.2f} cores; box {box:.2f} of {cpus} cores busy);"
        f" failed on: {'; '.join(failed) or 'see the runs'}"
    )


def table_row(figures: Mapping[str, Any]) -> dict[str, Any]:
    """The breakdown as table cells, in cores: "sum / busiest thread" for kinds with several
    threads, "sum / busiest process" for helper groups with several processes; a relay out of
    this process adds each of its processes ("process / its busiest thread") and the harness."""

    def cores(key: str) -> Any:
        return report.rounded(figures[key], 2)

    def pair(total: str, top: str) -> str:
        return f"{figures[total]:.2f} / {figures[top]:.2f}"

    row: dict[str, Any] = {"relay cores": cores("relay cores"), "event loop": cores("relay event loop cores")}
    for kind in ("decode", "send-encode", "return decode", "output-encode"):
        row[f"{kind} Σ/max"] = pair(f"relay {kind} cores", thread_key(kind))
    row["grpc"] = cores("relay grpc cores")
    row["other"] = cores("relay other cores")
    for label, process in figures.get("relay processes", {}).items():
        row[f"{label} /max"] = f"{process['cores']:.2f} / {process['thread max cores']:.2f}"
    if "relay processes" in figures:
        row["harness"] = cores("harness cores")
    row["processors Σ/max"] = pair("processors cores", "processors max cores")
    row["processor thread max"] = cores(thread_key("processors"))
    row["source"] = cores("source cores")
    row["readers Σ/max"] = pair("readers cores", "readers max cores")
    row["box busy"] = cores("box busy cores")
    return row
