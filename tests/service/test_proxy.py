"""Three relay replicas behind nginx, configured as deploy/nginx/nginx.conf ships.

Real parts only: three `trickle-relay serve --replica relay-N` processes, Debian's nginx proxying
gRPC to them by the `relay-session-id` metadata (the test skips, saying so, where nginx is not
installed; `make test` installs it), a real gRPC client. Sessions read a channel that gets no
media and name a processor nobody listens on, so they stay STARTING: routing is what is tested.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import textwrap
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from relay_server.api.relay.v1 import relay_service_pb2 as pb
from relay_server.api.relay.v1 import relay_service_pb2_grpc as pb_grpc
from relay_server.trickle.server import TrickleServer
from tests.clients import harness
from tests.service.test_ops import RPC_TIMEOUT, SERVING, read_until, serve_process

CONFIG = Path(__file__).parents[2] / "deploy" / "nginx" / "nginx.conf"
REPLICAS = ("relay-0", "relay-1", "relay-2")
SHIPPED_UPSTREAMS = ("127.0.0.1:50061", "127.0.0.1:50062", "127.0.0.1:50063")
STARTUP = 30.0  # seconds a process may take to start (imports, binding)
NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.path.exists(p)), None)

pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (make test installs it)")

Processes = list[asyncio.subprocess.Process]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def stopped(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.kill()
        await process.wait()


@pytest.fixture
def limits() -> tuple[int, ...]:
    """Sessions each replica runs at most."""
    return (24, 24, 24)


@pytest.fixture
async def replicas(limits: tuple[int, ...]) -> AsyncIterator[tuple[Processes, list[str]]]:
    """The three replicas, each on a port of its own: their processes and gRPC targets."""
    # Sessions wait for their input for as long as the test runs, not the default 10 s.
    env = {**os.environ, "TRICKLE_STARTUP_GRACE": "600"}
    processes: Processes = []
    targets: list[str] = []
    readers: list[asyncio.Task[bytes]] = []  # the rest of each log, read so that no pipe fills up
    try:
        for name, limit in zip(REPLICAS, limits, strict=True):
            process = await serve_process(
                "--listen=127.0.0.1:0",
                "--metrics-listen=off",
                f"--replica={name}",
                f"--max-sessions={limit}",
                "--drain-grace=2",
                env=env,
            )
            processes.append(process)
            assert process.stderr is not None
            async with asyncio.timeout(STARTUP):
                ready = await read_until(process.stderr, r"ready: grpc (\S+) ", [])
            targets.append(ready[1])
            readers.append(asyncio.create_task(process.stderr.read()))
        yield processes, targets
    finally:
        for process in processes:
            await stopped(process)
        await asyncio.gather(*readers)


@pytest.fixture
async def proxy(replicas: tuple[Processes, list[str]], tmp_path: Path) -> AsyncIterator[str]:
    """nginx with the shipped configuration, its upstreams and port replaced by the test's."""
    _, targets = replicas
    port = free_port()
    config = CONFIG.read_text()
    for shipped, target in zip(SHIPPED_UPSTREAMS, targets, strict=True):
        config = config.replace(shipped, target)
    config = config.replace("listen 127.0.0.1:50051", f"listen 127.0.0.1:{port}")
    # One nginx worker: one round robin, whichever connection a call comes on.
    config = config.replace("worker_processes auto;", "worker_processes 1;")
    # Paths of the test's own, so that nginx runs without touching the system's.
    own = "".join(
        f"    {kind}_temp_path {tmp_path / kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    config = config.replace("http {\n", "http {\n" + own, 1)
    (tmp_path / "nginx.conf").write_text(config)
    assert NGINX is not None
    process = await asyncio.create_subprocess_exec(
        NGINX,
        "-p",
        str(tmp_path),
        "-c",
        str(tmp_path / "nginx.conf"),
        "-e",
        "stderr",
        "-g",
        f"daemon off; pid {tmp_path / 'nginx.pid'}; error_log stderr warn;",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
    )
    target = f"127.0.0.1:{port}"
    try:
        async with grpc.aio.insecure_channel(target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            async with asyncio.timeout(STARTUP):
                while True:  # polled with a deadline: acceptable for a process starting up
                    assert process.returncode is None, "nginx exited"
                    with contextlib.suppress(grpc.aio.AioRpcError):
                        reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                        if reply.status == SERVING:
                            break
                    await asyncio.sleep(0.1)
        yield target
    finally:
        if process.returncode is None:
            process.terminate()
            await process.wait()


def waiting(
    trickle: TrickleServer, quiet_channel: str, processor: str, output: str, session_id: str = ""
) -> pb.StartSessionRequest:
    """A session that stays STARTING: its input gets no media, its processor is nobody's."""
    return pb.StartSessionRequest(
        session_id=session_id,
        subscribe_url=quiet_channel,
        publish_url=trickle.channel_url(f"out-{output}"),
        processor_url=processor,
        allow_shared_processor=True,
    )


def routed(session_id: str) -> tuple[tuple[str, str], ...]:
    """The metadata every call naming a session carries (what relayctl and the Node client send)."""
    return (("relay-session-id", session_id),)


async def owned(target: str) -> set[str]:
    """The ids of the sessions a replica runs, asked directly."""
    async with grpc.aio.insecure_channel(target) as channel:
        reply = await pb_grpc.RelayServiceStub(channel).ListSessions(
            pb.ListSessionsRequest(), timeout=RPC_TIMEOUT
        )
    return {session.session_id for session in reply.sessions if session.state == pb.SESSION_STATE_STARTING}


async def test_nginx_routes_every_call_to_the_replica_owning_the_session_and_a_drain_ends_only_its_own(
    trickle_server: TrickleServer,
    quiet_channel: str,
    dead_processor: str,
    replicas: tuple[Processes, list[str]],
    proxy: str,
) -> None:
    processes, targets = replicas

    def request(session_id: str = "", output: str = "") -> pb.StartSessionRequest:
        return waiting(trickle_server, quiet_channel, dead_processor, output or session_id, session_id)

    async with grpc.aio.insecure_channel(proxy) as channel:
        stub = pb_grpc.RelayServiceStub(channel)
        # 30 sessions the relays name, then 6 with ids of the client's own.
        named = [
            (await stub.StartSession(request(output=str(n)), timeout=RPC_TIMEOUT)).session.session_id
            for n in range(30)
        ]
        chosen = [f"cam-{n}" for n in range(6)]
        for session_id in chosen:
            await stub.StartSession(request(session_id), metadata=routed(session_id), timeout=RPC_TIMEOUT)

        owners = [await owned(target) for target in targets]
        assert sorted(set().union(*owners)) == sorted(named + chosen)
        assert sum(len(ids) for ids in owners) == 36  # each session on one replica only
        # A session the relay named is named after its replica, and they all took some.
        counts = Counter(session_id.split(".", 1)[0] for session_id in named)
        assert set(counts) == set(REPLICAS), counts
        for name, ids in zip(REPLICAS, owners, strict=True):
            assert {i for i in named if i.startswith(f"{name}.")} == {i for i in ids if i in named}

        # Every later call reaches the owner (any other replica would answer NOT_FOUND).
        watches: dict[str, grpc.aio.UnaryStreamCall] = {}
        for session_id in named + chosen:
            reply = await stub.GetSession(
                pb.GetSessionRequest(session_id=session_id), metadata=routed(session_id), timeout=RPC_TIMEOUT
            )
            assert reply.session.session_id == session_id
            watch = stub.WatchSession(
                pb.WatchSessionRequest(session_id=session_id), metadata=routed(session_id)
            )
            first = await watch.read()
            assert first.session.state == pb.SESSION_STATE_STARTING
            watches[session_id] = watch

        # SIGTERM drains relay-1: its sessions stop cleanly (their watchers, through the proxy,
        # see them stopped), it exits 0, and every other session runs on.
        drained = owners[1]
        processes[1].send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            assert await processes[1].wait() == 0
        for session_id, watch in watches.items():
            if session_id in drained:
                states = []
                while (update := await watch.read()) is not grpc.aio.EOF:
                    states.append(update.session)
                assert states and states[-1].state == pb.SESSION_STATE_STOPPED, (session_id, states)
                assert "shutting down" in states[-1].reason
        for session_id in set(named + chosen) - drained:
            reply = await stub.GetSession(
                pb.GetSessionRequest(session_id=session_id), metadata=routed(session_id), timeout=RPC_TIMEOUT
            )
            assert reply.session.state == pb.SESSION_STATE_STARTING
            watches[session_id].cancel()

        # New sessions go to the replicas still there.
        later = [
            (await stub.StartSession(request(output=f"later-{n}"), timeout=RPC_TIMEOUT)).session.session_id
            for n in range(6)
        ]
        assert {session_id.split(".", 1)[0] for session_id in later} <= {"relay-0", "relay-2"}


def test_the_kubernetes_proxy_routes_as_the_tested_configuration() -> None:
    """deploy/k8s/proxy.yaml's nginx.conf (which cannot run here: it resolves cluster DNS names)
    has the routing tested above: the same map, and an upstream per replica that the
    StatefulSet in relay.yaml names."""
    shipped = CONFIG.read_text()
    manifest = (CONFIG.parents[1] / "k8s" / "proxy.yaml").read_text()
    config = textwrap.dedent(manifest.split("nginx.conf: |\n", 1)[1].split("\n---", 1)[0])

    def routing(text: str) -> list[str]:
        block = text.split("map $http_relay_session_id $relay_upstream {", 1)[1].split("}", 1)[0]
        return [" ".join(line.split()) for line in block.strip().splitlines()]

    assert routing(config) == routing(shipped)
    statefulset = (CONFIG.parents[1] / "k8s" / "relay.yaml").read_text()
    replicas = int(statefulset.split("replicas: ", 1)[1].split()[0])
    for n in range(replicas):
        assert f"upstream relay-{n} {{" in config
        assert config.count(f"server relay-{n}.relay-replicas.") == 3  # its own, any, by id


@pytest.mark.parametrize("limits", [(1, 1, 8)])
async def test_the_clients_go_on_to_a_replica_with_room(
    trickle_server: TrickleServer,
    quiet_channel: str,
    dead_processor: str,
    replicas: tuple[Processes, list[str]],
    proxy: str,
) -> None:
    """relay-0 and relay-1 are full: a start that lets the relay name the session is refused
    there (RESOURCE_EXHAUSTED, nothing started), and relayctl and the Node client try again,
    through the proxy's round robin, until relay-2 takes it."""
    _, targets = replicas
    for target in targets[:2]:
        async with grpc.aio.insecure_channel(target) as channel:
            occupant = waiting(trickle_server, quiet_channel, dead_processor, target)
            await pb_grpc.RelayServiceStub(channel).StartSession(occupant, timeout=RPC_TIMEOUT)
    clients = [harness.relayctl]
    if shutil.which("node") and (harness.NODE_CLIENT / "node_modules").is_dir():
        clients.append(harness.node)
    started = []
    for client in clients:
        for n in range(3):  # the round robin comes to each full replica at least once
            flags = [
                "--subscribe-url", quiet_channel,
                "--publish-url", trickle_server.channel_url(f"out-{client.__name__}-{n}"),
                "--processor-url", dead_processor,
                "--allow-shared-processor",
            ]  # fmt: skip
            result = await client(proxy, "start", *flags)
            assert result.returncode == 0, result.stderr
            printed = json.loads(result.stdout)
            session = printed.get("session", printed)  # relayctl: the response; Node: the session
            started.append(session.get("sessionId") or session["session_id"])
    assert [session_id.split(".", 1)[0] for session_id in started] == ["relay-2"] * len(started)
    assert await owned(targets[2]) == set(started)
