"""The relay a capacity sweep runs its sessions on, in one of two variants, and what the sweep reads
of each session:

- InProcessRelay: a RelayServer in this process (bench.e2e.serve_relay), on a SessionManager with
  the sweep's max_sessions and the default LinkSettings. This process's CPU is the relay's, the
  harness's own (the gRPC client, the polling) included: the "1 process" figure.
- ServedRelay: `python -m relay_server serve --workers N` as a subprocess, as it is deployed: a
  front serving gRPC that places each session on the worker process running the fewest. The
  relay's CPU is the front's and the workers' (their pids from the front's log lines). The
  subprocess gets bench/relayhook on its PYTHONPATH, which names every process's threads as an
  in-process relay's are named, so the CPU breakdown groups them by kind alike.

Both start sessions through the same gRPC API and give per session the same Counters: the
in-process relay's RelayStats, the served relay's GetSession (SessionStats has no pacing time).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import signal
import sys
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
from prometheus_client.parser import text_string_to_metric_families

from bench.e2e import serve_relay
from relay_server.api.relay.v1 import relay_service_pb2 as pb
from relay_server.api.relay.v1 import relay_service_pb2_grpc as pb_grpc
from relay_server.session.manager import SessionManager
from relay_server.session.relay import RelayStats
from relay_server.session.session import SessionState

# bench/relayhook (its sitecustomize names the threads) and the checkout, for `bench` itself: at
# start-up, when sitecustomize is imported, the working directory is not on sys.path yet.
HOOK = Path(__file__).resolve().parent / "relayhook"
CHECKOUT = Path(__file__).resolve().parent.parent
# What the front logs on stderr once it serves (the workers log "ready" lines of their own, on
# unix sockets, without "in N workers"), and as each worker (re)starts.
READY = re.compile(
    r"ready: grpc (?P<target>\S+) \(.*\), metrics (?P<metrics>\S+), sessions at most \d+ in \d+ workers"
)
WORKER_STARTED = re.compile(r"worker (?P<index>\d+) started \(pid (?P<pid>\d+)\)")
START_TIMEOUT = 120.0  # seconds: the front and every worker import the relay, on a busy box
STOP_TIMEOUT = 60.0  # seconds to drain after SIGTERM (no session runs by then) before it is killed
LOG_TAIL = 40  # lines of its log kept, to say why it did not start
ACTIVE_STATES = {state.value for state in SessionState if not state.ended}


def variant_label(workers: int) -> str:
    """How results name the relay variant for `workers` (relay_variant's)."""
    return "1 process" if workers == 1 else f"{workers} workers"


@dataclass(frozen=True)
class Counters:
    """A session's counters the sweep reads, whichever the relay."""

    returned: int  # frames the processor returned
    input_replaced: int  # decoded frames let go before they could be sent (drops: input_overflow)
    output_replaced: int  # returned frames replaced by a newer one before encoding
    filled: int  # frames repeated into the output while none came back
    round_trip_p50: float  # seconds, sent → returned through the processor
    paced_seconds: float  # frames held back until due; NaN where GetSession does not say

    @classmethod
    def of_stats(cls, stats: RelayStats) -> Counters:
        return cls(
            returned=stats.frames_returned,
            input_replaced=stats.frames_dropped,
            output_replaced=stats.pipeline.frames_dropped,
            filled=stats.frames_filled,
            round_trip_p50=stats.link.latency_p50,
            paced_seconds=stats.link.send.paced_seconds,
        )

    @classmethod
    def of_session(cls, stats: pb.SessionStats) -> Counters:
        return cls(
            returned=stats.frames_returned,
            input_replaced=stats.drops.get("input_overflow", 0),
            output_replaced=stats.drops.get("output_replaced", 0),
            filled=stats.frames_filled,
            round_trip_p50=stats.latency.p50.ToTimedelta().total_seconds(),
            paced_seconds=math.nan,
        )


class InProcessRelay:
    """A RelayServer in this process, running `max_sessions` sessions at most."""

    label = variant_label(1)

    def __init__(self, max_sessions: int) -> None:
        self.manager = SessionManager(max_sessions=max_sessions)
        self.stub: pb_grpc.RelayServiceStub | None = None

    async def start(self, stack: contextlib.AsyncExitStack) -> None:
        _, self.stub = await serve_relay(stack, self.manager)

    def processes(self) -> None:
        """None: the relay is this process."""
        return None

    async def counters(self, session_ids: Sequence[str]) -> list[Counters]:
        return [Counters.of_stats(self.manager.get(session_id).relay.stats) for session_id in session_ids]


class ServedRelay:
    """`serve --workers N` as a subprocess, running `max_sessions` sessions at most (across its
    workers), with every other option at its default; stopped (SIGTERM: it drains) when the stack
    given to start() closes. `exit_code` says how it ended, `restarts` how many times a worker
    was started again after it died."""

    def __init__(self, workers: int, max_sessions: int) -> None:
        self.workers = workers
        self.max_sessions = max_sessions
        self.label = variant_label(workers)
        self.stub: pb_grpc.RelayServiceStub | None = None
        self.metrics_url = ""
        self.pids: dict[str, int] = {}  # "front", "worker K"
        self.restarts = 0
        self.exit_code: int | None = None
        self.process: asyncio.subprocess.Process | None = None
        self._log: deque[str] = deque(maxlen=LOG_TAIL)
        self._ready = asyncio.Event()
        self._target = ""
        self._reading: asyncio.Task[None] | None = None

    async def start(self, stack: contextlib.AsyncExitStack) -> None:
        # The in-process relay reads no RELAY_* option from the environment: nor does this one
        # (auth, TLS, allowed hosts...), but for the event loop, which both run on.
        environment = {
            name: value
            for name, value in os.environ.items()
            if not name.startswith("RELAY_") or name == "RELAY_EVENT_LOOP"
        }
        python_path = [str(HOOK), str(CHECKOUT), *filter(None, [os.environ.get("PYTHONPATH")])]
        environment["PYTHONPATH"] = os.pathsep.join(python_path)
        stack.push_async_callback(self.stop)
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "relay_server",
            "serve",
            f"--workers={self.workers}",
            "--listen=127.0.0.1:0",
            "--metrics-listen=127.0.0.1:0",
            f"--max-sessions={self.max_sessions}",
            "--log-format=text",
            "--log-level=INFO",  # the ready line and the workers' pids are INFO
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=environment,
            limit=1024 * 1024,  # a log line longer than the default 64 KiB would stop the reading
        )
        self.pids["front"] = self.process.pid
        self._reading = asyncio.create_task(self._read_log())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(START_TIMEOUT):
                await self._ready.wait()
        workers = [label for label in self.pids if label != "front"]
        if not self._target or len(workers) != self.workers:
            log = "\n".join(self._log)
            raise RuntimeError(f"serve --workers {self.workers} did not start:\n{log}")
        channel = grpc.aio.insecure_channel(self._target)
        stack.push_async_callback(channel.close)
        self.stub = pb_grpc.RelayServiceStub(channel)

    async def stop(self) -> None:
        process = self.process
        if process is not None and process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(STOP_TIMEOUT):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()
        if process is not None:
            self.exit_code = process.returncode
        if self._reading is not None:
            await self._reading

    async def _read_log(self) -> None:
        """Every line of its stderr (the front's and its workers'): kept, so that the pipe never
        fills, and read for the ready line and the workers' pids; ready is also set at the end."""
        assert self.process is not None and self.process.stderr is not None
        try:
            while raw := await self.process.stderr.readline():  # b"" only at the end
                line = raw.decode(errors="replace").rstrip()
                self._log.append(line)
                if started := WORKER_STARTED.search(line):
                    if self._ready.is_set():  # once all had started: one that died, again
                        self.restarts += 1
                    self.pids[f"worker {started['index']}"] = int(started["pid"])
                elif ready := READY.search(line):
                    self._target, self.metrics_url = ready["target"], ready["metrics"]
                    self._ready.set()
        finally:
            self._ready.set()

    def processes(self) -> Mapping[str, int]:
        """The relay's processes by label: the front, then each worker's current run in order."""
        return dict(sorted(self.pids.items(), key=lambda item: _worker_index(item[0])))

    async def counters(self, session_ids: Sequence[str]) -> list[Counters]:
        assert self.stub is not None
        sessions = await asyncio.gather(
            *(self.stub.GetSession(pb.GetSessionRequest(session_id=sid)) for sid in session_ids)
        )
        return [Counters.of_session(reply.session.stats) for reply in sessions]

    async def sessions_by_worker(self) -> dict[str, int]:
        """Sessions running on each worker, by its index, from the front's metrics (which read
        every worker's): where the front placed them."""
        async with (
            aiohttp.ClientSession() as http,
            http.get(self.metrics_url, timeout=aiohttp.ClientTimeout(total=10)) as response,
        ):
            response.raise_for_status()
            text = await response.text()
        running: dict[str, int] = {}
        for family in text_string_to_metric_families(text):
            if family.name != "relay_sessions":
                continue
            for sample in family.samples:
                if "worker" in sample.labels and sample.labels.get("state") in ACTIVE_STATES:
                    worker = sample.labels["worker"]
                    running[worker] = running.get(worker, 0) + round(sample.value)
        return dict(sorted(running.items(), key=lambda item: int(item[0])))


def _worker_index(label: str) -> int:
    return -1 if label == "front" else int(label.removeprefix("worker "))


Relay = InProcessRelay | ServedRelay


def relay_variant(workers: int, max_sessions: int) -> Relay:
    """The relay variant for `workers`: 1, this process; N ≥ 2, `serve --workers N`."""
    return InProcessRelay(max_sessions) if workers == 1 else ServedRelay(workers, max_sessions)
