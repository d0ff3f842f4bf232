"""Workers: one gRPC endpoint, the sessions in N worker processes (`serve --workers N`).

    clients ─gRPC─▶ front (this process: RelayService, health, reflection, metrics, token, TLS)
                      ├─unix socket─▶ worker 0 (worker.py: a RelayApp, its own loop and GIL)
                      └─unix socket─▶ worker 1 …

The front does no media. It places a new session on the worker running the fewest (counted from
the workers' metrics at that moment, one placement at a time; the node's max_sessions counts
across all of them), remembers which worker runs which session, and forwards every later call
there as it is; answers and errors (with their details) come back as the worker gave them.
ListSessions walks the workers in turn; its page token says where it stopped.

A worker that dies fails only its own sessions: from then on the front answers for them itself,
FAILED with the reason (which worker, how it ended), and starts the worker again, after a delay
that grows while it keeps failing to start. SIGTERM drains: health NOT_SERVING, SIGTERM to every
worker (each stops its sessions), then the front stops. The workers listen on unix sockets in a
directory only this user can open; the front's metrics endpoint shows theirs, every series
labelled with its worker.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import itertools
import json
import logging
import math
import os
import re
import secrets
import shutil
import signal
import sys
import tempfile
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import grpc
from google.protobuf.message import Message
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from relay_server.api.relay.v1 import relay_service_pb2 as pb
from relay_server.api.relay.v1 import relay_service_pb2_grpc as pb_grpc
from relay_server.errors import (
    ConfigError,
    FieldViolation,
    LimitReached,
    NotAccepting,
    SessionEnded,
    SessionNotFound,
    WorkerDown,
)
from relay_server.service import bounds, pages
from relay_server.service.convert import to_config
from relay_server.service.servicer import reported
from relay_server.session.manager import KEEP_ENDED
from relay_server.session.session import SessionState
from relay_server.waits import until_set

if TYPE_CHECKING:
    from relay_server.service.app import ServeOptions

log = logging.getLogger(__name__)

START_TIMEOUT = 60.0  # seconds a worker may take to start (imports, binding)
RESTART_DELAYS = (0.5, 1.0, 2.0, 5.0, 10.0)  # after a worker died, or failed to start again
STOP_TIMEOUT = 60.0  # seconds a worker may take to drain after SIGTERM, beyond its drain grace
CGROUP = Path("/sys/fs/cgroup")
KEEP_DEAD = 4096  # sessions of dead workers the front still answers for (the oldest go first)
KEEP_DEATHS = 64  # why a worker's last runs ended
DEATH_WAIT = 2.0  # seconds a broken call waits for its worker's process to be reaped
ACTIVE_STATES = {state.value for state in SessionState if not state.ended}
TOKEN = re.compile(r"(?P<worker>[0-9]{1,4}):(?P<inner>[A-Za-z0-9_=-]{0,64})")
READY = "ready"  # what a worker prints on stdout once it serves
# The node's options a worker runs with: the rest (endpoint, TLS, token, metrics port, workers)
# are the front's own.
INHERITED = ("max_sessions", "log_format", "log_level", "drain_grace", "replica")


def worker_count(requested: int, cgroup: Path = CGROUP) -> int:
    """0: what this machine's cores support, one worker per two cores (a session's codecs run on
    threads of their own besides its worker's event loop)."""
    return requested or max(1, available_cores(cgroup) // 2)


def available_cores(cgroup: Path = CGROUP) -> int:
    """The cores this process may use: those it may run on, fewer if its cgroup's CPU quota
    (a container's CPU limit, v2 or v1) allows less."""
    cores = len(os.sched_getaffinity(0))
    quota = period = None
    with contextlib.suppress(OSError, ValueError):
        text = (cgroup / "cpu.max").read_text().split()
        if text[0] != "max":
            quota, period = int(text[0]), int(text[1])
    if quota is None:
        with contextlib.suppress(OSError, ValueError):
            quota = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
            period = int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
    if quota is not None and period and quota > 0:
        cores = min(cores, max(1, math.ceil(quota / period)))
    return cores


def options_json(options: ServeOptions) -> str:
    inherited = {name: getattr(options, name) for name in INHERITED}
    return json.dumps({**inherited, "allow_hosts": sorted(options.allow_hosts)})


def how_it_ended(code: int) -> str:
    return f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"


@dataclass(frozen=True)
class Owner:
    worker: Worker
    generation: int  # which run of the worker: a restarted one knows nothing of the sessions before


class Worker:
    """One worker process, started again as often as it dies (`generation` counts the runs)."""

    def __init__(self, index: int, directory: Path, options: ServeOptions) -> None:
        self.index = index
        self.socket = directory / f"worker-{index}.grpc"
        self.metrics_socket = directory / f"worker-{index}.metrics"
        self.generation = 0
        self.deaths: dict[int, str] = {}  # generation → why it ended
        self.process: asyncio.subprocess.Process | None = None
        self.stub: pb_grpc.RelayServiceStub | None = None
        self._options = options_json(options)
        self._channel: grpc.aio.Channel | None = None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None and self.stub is not None

    async def start(self) -> None:
        # The last run's channel closes only now: closed while its calls were failing, it would
        # cancel them instead, under the front's RPCs that wait on them.
        await self.close_channel()
        for path in (self.socket, self.metrics_socket):
            path.unlink(missing_ok=True)
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "relay_server.service.worker",
            self._options,
            str(self.socket),
            str(self.metrics_socket),
            stdin=asyncio.subprocess.PIPE,  # never written: it ends when this process does
            stdout=asyncio.subprocess.PIPE,
        )
        self.process = process
        assert process.stdout is not None
        try:
            async with asyncio.timeout(START_TIMEOUT):
                line = await process.stdout.readline()
        except TimeoutError:
            line = b""
        if line.decode().strip() != READY:
            await self.kill()
            raise RuntimeError(f"worker {self.index} did not start ({how_it_ended(process.returncode or 0)})")
        self.generation += 1
        self._channel = grpc.aio.insecure_channel(f"unix:{self.socket}")
        self.stub = pb_grpc.RelayServiceStub(self._channel)
        log.info("worker %d started (pid %d)", self.index, process.pid)

    async def ended(self) -> int:
        """Wait until the process has ended; its exit code."""
        assert self.process is not None
        return await self.process.wait()

    def died(self, code: int) -> str:
        """Record why the current run ended (once) and say it."""
        assert self.process is not None
        reason = f"worker {self.index} (pid {self.process.pid}) {how_it_ended(code)}"
        reason = self.deaths.setdefault(self.generation, reason)
        while len(self.deaths) > KEEP_DEATHS:
            del self.deaths[min(self.deaths)]
        self.stub = None
        return reason

    async def death(self, generation: int) -> str | None:
        """Why run `generation` ended; None while it runs. A call to it that just broke may come
        before its process is reaped: that is waited for a moment."""
        if generation in self.deaths or generation != self.generation or self.process is None:
            return self.deaths.get(generation)
        try:
            code = await asyncio.wait_for(asyncio.shield(self.process.wait()), DEATH_WAIT)
        except TimeoutError:
            return None
        return self.died(code)

    async def stop(self, within: float) -> None:
        """SIGTERM (the worker drains), killed if it has not ended `within` seconds."""
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(within):
                    await self.process.wait()
            except TimeoutError:
                log.error("worker %d did not drain within %g s: killed", self.index, within)
                await self.kill()
        await self.close_channel()

    async def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()

    async def close_channel(self) -> None:
        if self._channel is not None:
            channel, self._channel, self.stub = self._channel, None, None
            await channel.close()

    async def metrics(self) -> str:
        """The worker's metrics, in the text format."""
        connector = aiohttp.UnixConnector(path=str(self.metrics_socket))
        async with (
            aiohttp.ClientSession(connector=connector) as http,
            http.get("http://worker/metrics", timeout=aiohttp.ClientTimeout(total=5)) as response,
        ):
            response.raise_for_status()
            return await response.text()


class WorkerPool:
    """The workers, and which runs which session."""

    def __init__(self, options: ServeOptions, count: int) -> None:
        self.max_sessions = options.max_sessions
        self._grace = options.drain_grace + STOP_TIMEOUT
        self._directory = Path(tempfile.mkdtemp(prefix="trickle-relay-workers-"))  # mode 0700
        self.workers = [Worker(index, self._directory, options) for index in range(count)]
        self.restarts = 0
        self.accepting = True
        self.placing = asyncio.Lock()  # one placement at a time: each sees the sessions before it
        self._owners: OrderedDict[str, Owner] = OrderedDict()
        self._supervisors: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._families: list[Metric] = []  # the workers' metrics at the last scrape
        # Told whether any worker is up whenever one dies or starts again (the front's health).
        self.on_up: Callable[[bool], Awaitable[None]] | None = None

    async def start(self) -> None:
        try:
            await asyncio.gather(*(worker.start() for worker in self.workers))
        except BaseException:
            await self.drain()
            raise
        self._supervisors = [
            asyncio.create_task(self._supervise(worker), name=f"worker {worker.index}")
            for worker in self.workers
        ]

    async def drain(self) -> None:
        """Take no new sessions; SIGTERM to every worker, each stopping its sessions, and wait."""
        self.accepting = False
        self._stopping.set()
        await asyncio.gather(*self._supervisors, return_exceptions=True)
        await asyncio.gather(*(worker.stop(self._grace) for worker in self.workers))
        shutil.rmtree(self._directory, ignore_errors=True)

    async def _supervise(self, worker: Worker) -> None:
        """Start the worker again whenever it dies, until the pool drains."""
        while True:
            ended = await until_set(worker.ended(), self._stopping)
            if self._stopping.is_set():
                return
            log.error("%s: its sessions failed; starting it again", worker.died(ended.result()))
            await self._tell_up()
            for delay in itertools.chain(RESTART_DELAYS, itertools.repeat(RESTART_DELAYS[-1])):
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._stopping.wait()
                        return
                try:
                    await worker.start()
                    await self._tell_up()
                    break
                except (OSError, RuntimeError) as error:
                    log.error("worker %d could not be started again: %s", worker.index, error)
            self.restarts += 1

    async def _tell_up(self) -> None:
        if self.on_up is not None:
            await self.on_up(any(worker.alive for worker in self.workers))

    # -- routing --------------------------------------------------------------------------------

    def owner(self, session_id: str) -> Owner:
        owner = self._owners.get(session_id)
        if owner is None:
            raise SessionNotFound(session_id)
        return owner

    def running(self, session_id: str) -> Worker | None:
        """The live worker that runs (or ran and still knows) the session, if any."""
        owner = self._owners.get(session_id)
        if owner is None or owner.generation != owner.worker.generation or not owner.worker.alive:
            return None
        return owner.worker

    async def own(self, session_id: str, worker: Worker) -> None:
        """Remember where the session runs; forget what no worker knows any more, now and then."""
        self._owners.pop(session_id, None)
        self._owners[session_id] = Owner(worker, worker.generation)
        if len(self._owners) > 2 * (len(self.workers) * (self.max_sessions + KEEP_ENDED) + KEEP_DEAD):
            await self._forget_gone()

    async def _forget_gone(self) -> None:
        """Forget the sessions their live workers no longer know (ended, and forgotten there
        too), and all but KEEP_DEAD of those of dead runs. Under `placing`: no session starts
        meanwhile, so none is forgotten before its worker lists it."""
        known: set[str] = set()
        for worker in self.workers:
            token = ""
            while worker.alive and worker.stub is not None:
                page = await worker.stub.ListSessions(
                    pb.ListSessionsRequest(page_size=pages.MAX_PAGE_SIZE, page_token=token), timeout=10
                )
                known.update(session.session_id for session in page.sessions)
                if not (token := page.next_page_token):
                    break
        dead = []
        for key, owner in list(self._owners.items()):
            if owner.generation != owner.worker.generation:
                dead.append(key)
            elif owner.worker.alive and key not in known:
                del self._owners[key]
        for key in dead[: max(0, len(dead) - KEEP_DEAD)]:
            del self._owners[key]

    async def place(self) -> Worker:
        """The live worker running the fewest sessions (LimitReached when the node is full)."""
        live = [worker for worker in self.workers if worker.alive]
        if not self.accepting:
            raise NotAccepting("the relay is shutting down and takes no new sessions")
        loads = await asyncio.gather(*(self._load(worker) for worker in live))
        if not live or sum(loads) >= self.max_sessions:
            raise LimitReached(
                f"this relay runs at most {self.max_sessions} sessions",
                metadata={"max_sessions": str(self.max_sessions)},
            )
        return min(zip(loads, live, strict=True), key=lambda pair: (pair[0], pair[1].index))[1]

    async def _load(self, worker: Worker) -> int:
        families = text_string_to_metric_families(await worker.metrics())
        return round(
            sum(
                sample.value
                for family in families
                if family.name == "relay_sessions"
                for sample in family.samples
                if sample.labels.get("state") in ACTIVE_STATES
            )
        )

    # -- metrics --------------------------------------------------------------------------------

    async def scrape(self) -> None:
        """Read every live worker's metrics, for the next collect()."""
        live = [worker for worker in self.workers if worker.alive]
        texts = await asyncio.gather(*(worker.metrics() for worker in live), return_exceptions=True)
        merged: dict[str, Metric] = {}
        for worker, text in zip(live, texts, strict=True):
            if isinstance(text, BaseException):
                log.warning("worker %d's metrics could not be read: %s", worker.index, text)
                continue
            for family in text_string_to_metric_families(text):
                if family.name.startswith("grpc_"):
                    continue  # the front counts the calls clients make
                into = merged.setdefault(family.name, Metric(family.name, family.documentation, family.type))
                for sample in family.samples:
                    into.add_sample(sample.name, {**sample.labels, "worker": str(worker.index)}, sample.value)
        self._families = list(merged.values())

    def collect(self) -> Iterator[Metric]:
        yield from self._families
        workers = Metric("relay_workers", "Worker processes running sessions, by state.", "gauge")
        up = sum(worker.alive for worker in self.workers)
        workers.add_sample("relay_workers", {"state": "up"}, up)
        workers.add_sample("relay_workers", {"state": "down"}, len(self.workers) - up)
        yield workers
        restarts = Metric("relay_worker_restarts", "Workers started again after they died.", "counter")
        restarts.add_sample("relay_worker_restarts_total", {}, self.restarts)
        yield restarts


class WorkerMetrics(Collector):
    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool

    def describe(self) -> list[Metric]:
        return []  # names are not known without collecting: no duplicate check at registration

    def collect(self) -> Iterator[Metric]:
        return self.pool.collect()


class ForwardingServicer(pb_grpc.RelayServiceServicer):
    """RelayService by way of the workers."""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool
        self.epoch = secrets.token_hex(4)  # tells this front's page tokens from another's

    async def StartSession(
        self, request: pb.StartSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.StartSessionResponse:
        async with reported(context):
            bounds.check_prompts(request.prompts)
            to_config(request)  # refused here as a single relay would, before it counts as full
            async with self.pool.placing:
                # A known id goes to its worker, which says whether the session still runs.
                worker = self.pool.running(request.session_id) or await self.pool.place()
                reply = await _forwarded(context, worker, "StartSession", request)
                await self.pool.own(reply.session.session_id, worker)
        return reply

    async def StopSession(
        self, request: pb.StopSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.StopSessionResponse:
        reply: pb.StopSessionResponse = await self._answered(context, "StopSession", request)
        return reply

    async def GetSession(
        self, request: pb.GetSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetSessionResponse:
        reply: pb.GetSessionResponse = await self._answered(context, "GetSession", request)
        return reply

    async def _answered(self, context: grpc.aio.ServicerContext, method: str, request: Message) -> Any:
        """The worker's answer to a call about one session, or, when the session ended with its
        worker, the session as it ended (both replies carry it in `session`)."""
        async with reported(context):
            ended = self._routed(request.session_id)  # type: ignore[attr-defined]
            if isinstance(ended, pb.Session):
                return getattr(pb, f"{method}Response")(session=ended)
            return await _forwarded(context, ended, method, request)

    async def UpdateSession(
        self, request: pb.UpdateSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpdateSessionResponse:
        async with reported(context):
            ended = self._routed(request.session_id)
            if isinstance(ended, pb.Session):
                raise SessionEnded(f"session {request.session_id!r} has ended: {ended.reason}")
            return await _forwarded(context, ended, "UpdateSession", request)

    async def WatchSession(
        self, request: pb.WatchSessionRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchSessionResponse]:
        async with reported(context):
            ended = self._routed(request.session_id)
        if isinstance(ended, pb.Session):
            yield pb.WatchSessionResponse(session=ended)
            return
        assert ended.stub is not None
        generation = ended.generation
        call = ended.stub.WatchSession(request)
        try:
            async for update in call:
                yield update
        except grpc.aio.AioRpcError as error:
            reason = await ended.death(generation)
            if reason is None:
                await context.abort(
                    error.code(), error.details() or "", tuple(error.trailing_metadata() or ())
                )
            else:  # the worker died under the watch: the session's end, as a Get gives it
                yield pb.WatchSessionResponse(session=self._dead(request.session_id, reason))
        finally:
            call.cancel()

    async def ListSessions(
        self, request: pb.ListSessionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListSessionsResponse:
        async with reported(context):
            size = pages.page_size(request.page_size)
            index, inner = self._decode_token(request.page_token)
            sessions: list[pb.Session] = []
            workers = self.pool.workers
            while index < len(workers) and len(sessions) < size:
                worker = workers[index]
                if worker.alive:
                    page = pb.ListSessionsRequest(page_size=size - len(sessions), page_token=inner)
                    reply = await _forwarded(context, worker, "ListSessions", page)
                    sessions.extend(reply.sessions)
                    if reply.next_page_token:
                        return pb.ListSessionsResponse(
                            sessions=sessions,
                            next_page_token=self._encode_token(index, reply.next_page_token),
                        )
                index, inner = index + 1, ""
        more = index < len(workers)
        token = self._encode_token(index, "") if more else ""
        return pb.ListSessionsResponse(sessions=sessions, next_page_token=token)

    def _routed(self, session_id: str) -> Worker | pb.Session:
        """The live worker running the session, or the session as it ended with its dead one."""
        bounds.check_session_id(session_id)
        owner = self.pool.owner(session_id)
        if owner.generation != owner.worker.generation or not owner.worker.alive:
            reason = owner.worker.deaths.get(owner.generation)
            if reason is not None:
                return self._dead(session_id, reason)
            raise WorkerDown(f"worker {owner.worker.index} is being started again")
        return owner.worker

    @staticmethod
    def _dead(session_id: str, reason: str) -> pb.Session:
        return pb.Session(session_id=session_id, state=pb.SESSION_STATE_FAILED, reason=reason)

    def _encode_token(self, worker: int, inner: str) -> str:
        return base64.urlsafe_b64encode(f"{self.epoch}/{worker}:{inner}".encode()).decode().rstrip("=")

    def _decode_token(self, token: str) -> tuple[int, str]:
        if not token:
            return 0, ""
        invalid = ConfigError(
            [FieldViolation("page_token", "not a page token of this relay: list from the start")]
        )
        try:
            text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode("ascii")
        except (binascii.Error, ValueError):
            raise invalid from None
        epoch, _, rest = text.partition("/")
        match = TOKEN.fullmatch(rest)
        if epoch != self.epoch or match is None or int(match["worker"]) >= len(self.pool.workers):
            raise invalid
        return int(match["worker"]), match["inner"]


async def _forwarded(context: grpc.aio.ServicerContext, worker: Worker, method: str, request: Message) -> Any:
    """`request` to the worker's `method`, within what is left of the caller's deadline; the
    worker's error, as it gave it, ends the caller's RPC."""
    stub = worker.stub
    if stub is None:  # it died since the call was routed
        raise WorkerDown(f"worker {worker.index} is being started again")
    remaining = context.time_remaining()
    try:
        return await getattr(stub, method)(
            request, timeout=None if remaining is None else max(0.0, remaining)
        )
    except grpc.aio.AioRpcError as error:
        await context.abort(error.code(), error.details() or "", tuple(error.trailing_metadata() or ()))
