"""Running the clients against a real relay: the relay on loopback in this process, the clients
as subprocesses (so the event loop keeps serving while they work)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.struct_pb2 import Struct

from relay_server.api.relay.v1 import relay_service_pb2 as pb
from relay_server.api.relay.v1 import relay_service_pb2_grpc as pb_grpc
from relay_server.service.server import RelayServer
from relay_server.session.manager import MAX_SESSIONS, SessionManager
from relay_server.trickle.server import TrickleServer

ROOT = Path(__file__).resolve().parents[2]
RELAYCTL = ROOT / "clients" / "python" / "relayctl.py"
NODE_CLIENT = ROOT / "clients" / "node"
CLIENT_TIMEOUT = 20.0  # seconds any one client run may take
SESSION_HEADER = "relay-session-id"  # the proxy in front of the replicas routes by it
SOURCE_FRAMES = 30 * 60  # a minute of 30 fps pattern: longer than any test, cancelled at teardown


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def client_env(**extra: str) -> dict[str, str]:
    """The environment without the caller's relay settings, so a test sees only its own."""
    env = {k: v for k, v in os.environ.items() if k not in ("RELAY_ADDRESS", "RELAY_AUTH_TOKEN")}
    env.update(extra)
    return env


async def run(
    argv: Sequence[str | Path], *, cwd: Path | None = None, env: dict[str, str] | None = None
) -> Result:
    """Run a client to completion (killed after CLIENT_TIMEOUT)."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        env=env if env is not None else client_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(CLIENT_TIMEOUT):
            stdout, stderr = await process.communicate()
    except TimeoutError:
        process.kill()
        stdout, stderr = await process.communicate()
        pytest.fail(f"{argv} still running after {CLIENT_TIMEOUT:g} s; stderr: {stderr.decode()}")
    assert process.returncode is not None
    return Result(process.returncode, stdout.decode(), stderr.decode())


async def relayctl(address: str, *args: str, env: dict[str, str] | None = None) -> Result:
    return await run([sys.executable, RELAYCTL, "--server", address, *args], env=env)


async def node(address: str, *args: str) -> Result:
    return await run(["node", "client.js", "--server", address, *args], cwd=NODE_CLIENT)


@dataclass
class Call:
    """One RPC as the relay received it."""

    method: str  # "StartSession", ...
    metadata: dict[str, str]


class RecordCalls(grpc.aio.ServerInterceptor):
    """Keeps every call the server receives, in order, before it is handled."""

    def __init__(self) -> None:
        self.calls: list[Call] = []

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        metadata = {key: str(value) for key, value in handler_call_details.invocation_metadata or ()}
        self.calls.append(Call(handler_call_details.method.rsplit("/", 1)[-1], metadata))
        return await continuation(handler_call_details)


@dataclass
class Relay:
    """What a client needs to know: the relay's address, the channels and the processor; and
    the calls the relay has received."""

    address: str
    trickle: TrickleServer
    processor_url: str
    server: RelayServer
    calls: list[Call]

    def input_url(self) -> str:
        return self.trickle.channel_url("in")

    def output_url(self, name: str) -> str:
        return self.trickle.channel_url(f"out-{name}")

    def waiting_session(self, name: str) -> list[str]:
        """`start` flags for a session that waits, and so stays: it reads the input channel, which
        nobody publishes to on a relay without media, and names a processor nobody serves, of
        its own (no other session's processor is in use by it)."""
        return [
            "--subscribe-url", self.input_url(),
            "--publish-url", self.output_url(name),
            "--processor-url", f"{unserved_url()}/{name}",
        ]  # fmt: skip

    async def calls_during(self, client: Awaitable[Result]) -> tuple[Result, list[Call]]:
        """Run a client; its result and the calls the relay received meanwhile."""
        first = len(self.calls)
        result = await client
        return result, self.calls[first:]

    async def relayctl(self, *args: str, env: dict[str, str] | None = None) -> Result:
        return await relayctl(self.address, *args, env=env)

    async def relayctl_streaming(self, *args: str) -> Streaming:
        return await Streaming.start([sys.executable, RELAYCTL, "--server", self.address, *args])

    async def node(self, *args: str) -> Result:
        return await node(self.address, *args)


@contextlib.asynccontextmanager
async def relay_server(
    trickle: TrickleServer,
    processor_url: str = "",
    credentials: grpc.ServerCredentials | None = None,
    max_sessions: int = MAX_SESSIONS,
) -> AsyncIterator[Relay]:
    recorder = RecordCalls()
    server = RelayServer(
        SessionManager(max_sessions=max_sessions), interceptors=[recorder], credentials=credentials
    )
    await server.start()
    try:
        yield Relay(server.address, trickle, processor_url, server, recorder.calls)
    finally:
        await server.drain(grace=1.0)


def unserved_url() -> str:
    """http://127.0.0.1:PORT with a port nobody listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


async def start_bulky_sessions(relay: Relay, count: int) -> list[str]:
    """Start `count` sessions (through the API) whose prompts are about 1 MiB each, so that a
    listing of them takes several pages. They read a channel nobody publishes to and name a
    processor nobody serves, and wait."""
    processor = unserved_url()
    workflow = Struct()
    workflow.update({"1": {"class_type": "Invert", "inputs": {"notes": "x" * 1_000_000}}})
    ids = [f"bulky-{index}" for index in range(count)]
    async with grpc.aio.insecure_channel(relay.address) as channel:
        stub = pb_grpc.RelayServiceStub(channel)
        for index, session_id in enumerate(ids):
            request = pb.StartSessionRequest(
                session_id=session_id,
                subscribe_url=relay.input_url(),
                publish_url=relay.output_url(session_id),
                processor_url=f"{processor}/{index}",
                prompts=[workflow],
            )
            await stub.StartSession(request, timeout=CLIENT_TIMEOUT)
    return ids


@dataclass
class StartRefusals:
    full: list[Result]  # refused while the relay was full: with default --attempts, then 2
    draining: Result  # refused while the relay drained, with --attempts 4


async def refused_starts(relay: Relay, client: Callable[..., Awaitable[Result]]) -> StartRefusals:
    """StartSession refused through `client` (relay.relayctl or relay.node) on a relay with room
    for one session: which refusals it tries again, how often, and what it reports (the first line
    of its error); the client's own wording is left to its test."""
    occupant = await client("start", "--id", "occupant", *relay.waiting_session("occupant"))
    assert occupant.returncode == 0, occupant.stderr

    # Full: tried --attempts times (3 by default), then the last refusal is reported.
    full = []
    for attempts, expected in [([], 3), (["--attempts", "2"], 2)]:
        refused, calls = await relay.calls_during(client("start", *attempts, *relay.waiting_session("more")))
        assert refused.returncode == 1
        assert refused.stderr.startswith("error: RESOURCE_EXHAUSTED: ")
        assert [call.method for call in calls] == ["StartSession"] * expected
        full.append(refused)

    # With an id the proxy would send every attempt to the same replica: one call.
    named, calls = await relay.calls_during(client("start", "--id", "x", *relay.waiting_session("x")))
    assert (named.returncode, len(calls)) == (1, 1)
    assert named.stderr.startswith("error: RESOURCE_EXHAUSTED: ")

    # Any other error is not tried again: in general it may have created the session.
    invalid, calls = await relay.calls_during(
        client("start", "--subscribe-url", "ftp://x", "--publish-url", relay.output_url("y"))
    )
    assert (invalid.returncode, len(calls)) == (1, 1)
    assert invalid.stderr.startswith("error: INVALID_ARGUMENT: ")

    await relay.server.manager.drain()  # the relay takes no new sessions from now on
    draining, calls = await relay.calls_during(
        client("start", "--attempts", "4", *relay.waiting_session("late"))
    )
    assert draining.returncode == 1
    assert draining.stderr.startswith("error: UNAVAILABLE: ")
    assert len(calls) == 4
    return StartRefusals(full, draining)


class Streaming:
    """A client left running (watch): its output read line by line, each wait bounded."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []

    @classmethod
    async def start(cls, argv: Sequence[str | Path], *, cwd: Path | None = None) -> Streaming:
        process = await asyncio.create_subprocess_exec(
            *argv,
            cwd=cwd,
            env=client_env(),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        return cls(process)

    async def until(self, matches: Callable[[str], bool], within: float = CLIENT_TIMEOUT) -> str:
        """The first line from now on that `matches`; fails on a timeout or the end of output."""
        assert self.process.stdout is not None
        try:
            async with asyncio.timeout(within):
                while line := (await self.process.stdout.readline()).decode():
                    self.lines.append(line)
                    if matches(line):
                        return line
        except TimeoutError:
            pass
        pytest.fail(f"no matching line within {within:g} s; got: {''.join(self.lines[-5:])}")

    async def finish(self, within: float = CLIENT_TIMEOUT) -> Result:
        """Wait for the client to exit by itself; the rest of its output."""
        try:
            async with asyncio.timeout(within):
                stdout, stderr = await self.process.communicate()
        except TimeoutError:
            self.process.kill()
            await self.process.wait()
            pytest.fail(f"the client did not exit within {within:g} s")
        assert self.process.returncode is not None
        self.lines += stdout.decode().splitlines(keepends=True)
        return Result(self.process.returncode, "".join(self.lines), stderr.decode())

    async def close(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


def self_signed(directory: Path) -> tuple[grpc.ServerCredentials, Path]:
    """Server credentials for 127.0.0.1 and the PEM a client verifies them with."""
    # cryptography comes with aiortc.
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relay test")])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pem = certificate.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path = directory / "relay-ca.pem"
    path.write_bytes(pem)
    return grpc.ssl_server_credentials([(key_pem, pem)]), path
