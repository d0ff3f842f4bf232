"""`trickle-relay serve --workers 2`: one endpoint, the sessions in two worker processes.

The command runs as a process, its workers as its children; everything is real (gRPC, the
metrics endpoint, signals). Sessions read a channel that gets no media and name a processor nobody
listens on, so they stay STARTING: placement, routing and a worker's death are what is tested.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from relay_server.api.relay.v1 import relay_service_pb2 as pb
from relay_server.api.relay.v1 import relay_service_pb2_grpc as pb_grpc
from relay_server.errors import SessionNotFound
from relay_server.service.app import ServeOptions
from relay_server.service.workers import KEEP_DEAD, WorkerPool, available_cores, worker_count
from relay_server.session.manager import KEEP_ENDED
from relay_server.trickle.server import TrickleServer
from tests.service.test_api import status_details
from tests.service.test_ops import NOT_SERVING, RPC_TIMEOUT, SERVING, scrape, serve_process, value

STARTUP = 60.0  # seconds the command may take to start, its workers included
STARTING = pb.SESSION_STATE_STARTING


@dataclass
class Node:
    """The running command: its process, endpoints, and the workers' pids as its log tells them."""

    process: asyncio.subprocess.Process
    target: str = ""
    metrics: str = ""
    log: list[str] = field(default_factory=list)
    pids: dict[int, int] = field(default_factory=dict)  # worker → pid, the latest start
    starts: asyncio.Queue[tuple[int, int]] = field(default_factory=asyncio.Queue)

    async def read_log(self) -> None:
        assert self.process.stderr is not None
        while line := (await self.process.stderr.readline()).decode():
            self.log.append(line)
            started = re.search(r"worker (\d+) started \(pid (\d+)\)", line)
            if started:
                worker, pid = int(started[1]), int(started[2])
                self.pids[worker] = pid
                self.starts.put_nowait((worker, pid))
            ready = re.search(r"ready: grpc (\S+) .*metrics (\S+), .* in 2 workers", line)
            if ready:
                self.target, self.metrics = ready[1], ready[2]
                self.starts.put_nowait((-1, 0))


@pytest.fixture
async def node() -> AsyncIterator[Node]:
    env = {**os.environ, "TRICKLE_STARTUP_GRACE": "600"}  # sessions wait for input all along
    process = await serve_process(
        "--workers=2", "--listen=127.0.0.1:0", "--metrics-listen=127.0.0.1:0", env=env
    )
    node = Node(process)
    reading = asyncio.create_task(node.read_log())
    try:
        async with asyncio.timeout(STARTUP):
            while (await node.starts.get())[0] != -1:
                pass
        yield node
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        # The workers share its stderr: the log ends once they have ended too.
        async with asyncio.timeout(30):
            await reading
        print("".join(node.log))  # shown when the test failed


async def sessions_on(node: Node) -> dict[str, float | None]:
    """STARTING sessions per worker, from the front's metrics."""
    text = await scrape(node.metrics)
    return {w: value(text, "relay_sessions", state="starting", worker=w) for w in ("0", "1")}


async def test_sessions_spread_over_the_workers_and_each_call_reaches_the_owner(
    trickle_server: TrickleServer, start_request: Callable[[str], pb.StartSessionRequest], node: Node
) -> None:
    def request(n: int) -> pb.StartSessionRequest:
        made = start_request("")
        made.publish_url += f"-{n}"
        made.allow_shared_processor = True
        return made

    async with grpc.aio.insecure_channel(node.target) as channel:
        stub = pb_grpc.RelayServiceStub(channel)
        ids = [
            (await stub.StartSession(request(n), timeout=RPC_TIMEOUT)).session.session_id for n in range(4)
        ]
        assert await sessions_on(node) == {"0": 2, "1": 2}  # each to the one running fewer

        # Every call reaches the session's worker; the listing walks both, a page at a time.
        for session_id in ids:
            got = await stub.GetSession(pb.GetSessionRequest(session_id=session_id), timeout=RPC_TIMEOUT)
            assert (got.session.session_id, got.session.state) == (session_id, STARTING)
        listed, token = [], ""
        while True:
            page = await stub.ListSessions(
                pb.ListSessionsRequest(page_size=1, page_token=token), timeout=RPC_TIMEOUT
            )
            listed += [session.session_id for session in page.sessions]
            if not (token := page.next_page_token):
                break
        assert sorted(listed) == sorted(ids)

        # Errors come back as a single relay gives them, details and all.
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await stub.GetSession(pb.GetSessionRequest(session_id="nobody"), timeout=RPC_TIMEOUT)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        bad = request(9)
        bad.publish_url = "ftp://nowhere/out"
        with pytest.raises(grpc.aio.AioRpcError) as invalid:
            await stub.StartSession(bad, timeout=RPC_TIMEOUT)
        assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        violations = status_details(invalid.value)[error_details_pb2.BadRequest]
        assert [v.field for v in violations.field_violations] == ["publish_url"]  # type: ignore[attr-defined]
        with pytest.raises(grpc.aio.AioRpcError) as token_error:
            await stub.ListSessions(pb.ListSessionsRequest(page_token="bm90LWEtdG9rZW4"), timeout=RPC_TIMEOUT)
        assert token_error.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        # A worker killed fails only its own sessions, with the reason, and is started again.
        watches = {
            session_id: stub.WatchSession(pb.WatchSessionRequest(session_id=session_id)) for session_id in ids
        }
        for watch in watches.values():
            assert (await watch.read()).session.state == STARTING
        killed = node.pids[0]
        os.kill(killed, signal.SIGKILL)
        async with asyncio.timeout(30):
            assert await node.starts.get() == (0, node.pids[0]) and node.pids[0] != killed
        failed, running = [], []
        for session_id, watch in watches.items():
            got = await stub.GetSession(pb.GetSessionRequest(session_id=session_id), timeout=RPC_TIMEOUT)
            if got.session.state == pb.SESSION_STATE_FAILED:
                assert got.session.reason == f"worker 0 (pid {killed}) was killed by SIGKILL"
                last = [update async for update in _rest(watch)]
                assert last[-1].session.state == pb.SESSION_STATE_FAILED
                failed.append(session_id)
            else:
                assert got.session.state == STARTING
                running.append(session_id)
        assert len(failed) == len(running) == 2
        assert await sessions_on(node) == {"0": 0, "1": 2}
        # The restarted worker takes the next session: it runs the fewest.
        await stub.StartSession(request(5), timeout=RPC_TIMEOUT)
        assert await sessions_on(node) == {"0": 1, "1": 2}

        # SIGTERM drains every worker: the sessions still running stop, and the command exits 0.
        node.process.send_signal(signal.SIGTERM)
        for session_id in running:
            last = [update async for update in _rest(watches[session_id])]
            assert last[-1].session.state == pb.SESSION_STATE_STOPPED, last
        async with asyncio.timeout(60):
            assert await node.process.wait() == 0
    for pid in node.pids.values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert "drained; exiting" in "".join(node.log)


async def _rest(watch: grpc.aio.UnaryStreamCall) -> AsyncIterator[pb.WatchSessionResponse]:
    """What a watch still gives until it ends (its end by an error included, as a worker's)."""
    try:
        while (update := await watch.read()) is not grpc.aio.EOF:
            yield update
    except grpc.aio.AioRpcError:
        return


async def test_health_follows_the_workers_and_none_outlives_the_front(node: Node) -> None:
    """NOT_SERVING while no worker is up, SERVING again once one is; and the workers end with
    the front, even when it is killed and cannot tell them."""
    async with grpc.aio.insecure_channel(node.target) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        assert (await watch.read()).status == SERVING
        killed = dict(node.pids)
        for pid in killed.values():
            os.kill(pid, signal.SIGKILL)
        async with asyncio.timeout(30):
            assert (await watch.read()).status == NOT_SERVING
            assert (await watch.read()).status == SERVING
            restarted = {(await node.starts.get())[0] for _ in killed}
        assert restarted == set(killed)
        watch.cancel()
    survivors = [os.pidfd_open(pid) for pid in node.pids.values()]  # before the kill: no pid reuse
    node.process.kill()
    await node.process.wait()
    async with asyncio.timeout(30):
        await asyncio.gather(*(_exited(pidfd) for pidfd in survivors))


async def _exited(pidfd: int) -> None:
    """Wait until the process behind `pidfd` (not a child of this one) has exited."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    loop.add_reader(pidfd, done.set_result, None)
    try:
        await done
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)


async def test_the_front_forgets_sessions_its_workers_no_longer_know() -> None:
    """The routing map stays bounded: once it passes its bound, the sessions no live worker lists
    any more (ended and forgotten there) go, and all but KEEP_DEAD of those of dead runs. The
    workers here are stand-ins: thousands of real sessions would be needed to pass the bound."""

    class Listing:
        def __init__(self, ids: list[str]) -> None:
            self.ids = ids

        async def ListSessions(self, request: pb.ListSessionsRequest, **_: object) -> pb.ListSessionsResponse:
            start = int(request.page_token or 0)
            end = start + request.page_size
            token = str(end) if end < len(self.ids) else ""
            sessions = [pb.Session(session_id=i) for i in self.ids[start:end]]
            return pb.ListSessionsResponse(sessions=sessions, next_page_token=token)

    pool = WorkerPool(ServeOptions(max_sessions=1), 2)
    live, dead = pool.workers
    try:
        dead.generation = 1
        for n in range(KEEP_DEAD + 200):
            await pool.own(f"dead-{n}", dead)  # a run of worker 1 that then died
        dead.generation, dead.deaths[1] = 2, "worker 1 (pid 1) was killed by SIGKILL"
        still = [f"live-{n}" for n in range(150)]  # more than a page
        live.stub = Listing(still)  # type: ignore[assignment]
        live.process = SimpleNamespace(returncode=None)  # type: ignore[assignment]
        for session_id in still:
            await pool.own(session_id, live)
        for n in range(2 * (2 * (1 + KEEP_ENDED) + KEEP_DEAD)):  # past the bound: pruned
            await pool.own(f"gone-{n}", live)
        assert [i for i in still if pool.running(i) is live] == still
        assert not any(_known(pool, f"gone-{n}") for n in range(100))
        kept_dead = [n for n in range(KEEP_DEAD + 200) if _known(pool, f"dead-{n}")]
        assert kept_dead == list(range(200, KEEP_DEAD + 200))  # the newest KEEP_DEAD
    finally:
        live.process = live.stub = None
        await pool.drain()


def _known(pool: WorkerPool, session_id: str) -> bool:
    try:
        pool.owner(session_id)
    except SessionNotFound:
        return False
    return True


@pytest.mark.parametrize(
    ("files", "limit"),
    [
        ({"cpu.max": "150000 100000\n"}, 2),  # cgroup v2: 1.5 cores, rounded up
        ({"cpu.max": "max 100000\n"}, None),  # no limit
        ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),  # v1
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),  # no cgroup files at all
    ],
)
def test_workers_by_default_fit_the_cores_a_container_may_use(
    tmp_path: Path, files: dict[str, str], limit: int | None
) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    cores = len(os.sched_getaffinity(0))
    expected = cores if limit is None else min(cores, limit)
    assert available_cores(tmp_path) == expected
    assert worker_count(0, tmp_path) == max(1, expected // 2) and worker_count(3, tmp_path) == 3
