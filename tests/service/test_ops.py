"""Operations: `trickle-relay serve` and the RelayApp behind it — health through a drain, bearer
tokens, TLS, Prometheus metrics, structured logs, signals and exit codes.

Everything is real: gRPC servers and clients on loopback, the trickle server sessions read from,
the metrics endpoint scraped over HTTP, the command run as a process. A session whose processor
is a loopback port nobody listens on stays STARTING (its link retries), which is all a test of
operations needs from one.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import io
import ipaddress
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from relay_server import cli
from relay_server.api.relay.v1 import relay_service_pb2 as pb
from relay_server.api.relay.v1 import relay_service_pb2_grpc as pb_grpc
from relay_server.media.handoff import CAPACITY
from relay_server.service.app import RelayApp, ServeOptions
from relay_server.service.logs import make_handler
from relay_server.trickle import Publisher
from relay_server.trickle.server import TrickleServer
from tests.media.clips import ClipSpec, make_clip
from tests.service.conftest import seconds
from tests.service.test_api import status_details

SERVICE = "relay.v1.RelayService"
TOKEN = "s3cret-token"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
RPC_TIMEOUT = 10.0


# -- helpers ---------------------------------------------------------------------------------------


def options(**overrides: Any) -> ServeOptions:
    """Both servers on free loopback ports; a short grace so that no test waits long on a stream."""
    values: dict[str, Any] = {
        "listen": ("127.0.0.1", 0),
        "metrics_listen": ("127.0.0.1", 0),
        "drain_grace": 1.0,
    }
    return ServeOptions(**{**values, **overrides})


MakeApp = Callable[..., Awaitable[RelayApp]]


@pytest.fixture
async def make_app(trickle_server: TrickleServer) -> AsyncIterator[MakeApp]:
    """`await make_app(auth_token=...)`: a started RelayApp (options() with those overrides),
    drained at teardown, while the trickle server its sessions use is still up; every session it
    had must have ended by then."""
    apps: list[RelayApp] = []

    async def make(**overrides: Any) -> RelayApp:
        app = RelayApp(options(**overrides))
        await app.start()
        apps.append(app)
        return app

    yield make
    for app in reversed(apps):
        await app.drain()
        for snapshot in app.manager.snapshots():
            assert snapshot.state.ended, snapshot


@contextlib.asynccontextmanager
async def channel_to(app: RelayApp, credentials: grpc.ChannelCredentials | None = None) -> AsyncIterator[Any]:
    if credentials is None:
        channel = grpc.aio.insecure_channel(app.target)
    else:
        channel = grpc.aio.secure_channel(app.target, credentials)
    async with channel:
        yield channel


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [
        (sample.name, sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def value(text: str, name: str, **labels: str) -> float | None:
    """The value of the sample `name` whose labels include `labels` (None: no such sample)."""
    found = [
        v for n, sample_labels, v in samples(text) if n == name and labels.items() <= sample_labels.items()
    ]
    assert len(found) <= 1, f"{name}{labels} matches {len(found)} samples"
    return found[0] if found else None


async def scrape(url: str) -> str:
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        assert response.status == 200
        assert response.content_type == "text/plain"
        return await response.text()


# -- health and drain ------------------------------------------------------------------------------


async def test_health_is_serving_after_start_and_not_serving_from_the_start_of_a_drain(
    make_app: MakeApp, start_request: Callable[[str], pb.StartSessionRequest]
) -> None:
    # A grace longer than the drain is waited for below: a stream left open would show.
    app = await make_app(drain_grace=60.0)
    async with channel_to(app) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT)
            assert reply.status == SERVING, service

        stub = pb_grpc.RelayServiceStub(channel)
        started = await stub.StartSession(start_request("drained"), timeout=RPC_TIMEOUT)
        assert started.session.state == pb.SESSION_STATE_STARTING
        session_watch = stub.WatchSession(pb.WatchSessionRequest(session_id="drained"))
        first = await session_watch.read()
        assert first.session.state == pb.SESSION_STATE_STARTING  # the processor never answers

        health_watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE))
        assert (await health_watch.read()).status == SERVING
        drain = asyncio.create_task(app.drain())
        assert (await health_watch.read()).status == NOT_SERVING

        # The session is stopped by the drain, and its watchers see it end before the server goes.
        states = [first.session]
        while (response := await session_watch.read()) is not grpc.aio.EOF:
            states.append(response.session)
        assert states[-1].state == pb.SESSION_STATE_STOPPED
        assert states[-1].reason == "the relay is shutting down"
        assert pb.SESSION_STATE_STOPPING in [s.state for s in states]
        # The health watch, still open, is ended once the sessions are: the server's stop does
        # not wait out its grace for it.
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await health_watch.read()
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        assert ended.value.details() == "the server is shutting down"
        await asyncio.wait_for(drain, 10)

        # Afterwards: nothing serves any more, the session has ended for good.
        assert app.manager.get("drained").state.value == "stopped"
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await health.Check(health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_draining_relay_takes_no_new_sessions(
    make_app: MakeApp, start_request: Callable[[str], pb.StartSessionRequest]
) -> None:
    app = await make_app()
    async with channel_to(app) as channel:
        stub = pb_grpc.RelayServiceStub(channel)
        await stub.StartSession(start_request("first"), timeout=RPC_TIMEOUT)
        watch = stub.WatchSession(pb.WatchSessionRequest(session_id="first"))
        await watch.read()
        drain = asyncio.create_task(app.drain())
        # Read until the drain has begun stopping the session: the manager takes nothing new now.
        ending = (pb.SESSION_STATE_STOPPING, pb.SESSION_STATE_STOPPED)
        while (response := await watch.read()) is not grpc.aio.EOF:
            if response.session.state in ending:
                break
        else:
            raise AssertionError("the watch ended without the session stopping")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.StartSession(start_request("second"), timeout=RPC_TIMEOUT)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        await asyncio.wait_for(drain, 10)


async def test_a_named_replica_qualifies_the_session_ids_it_makes_and_no_others(
    make_app: MakeApp, start_request: Callable[[str], pb.StartSessionRequest]
) -> None:
    """Behind a proxy, the ids a replica makes say whose sessions they are (the proxy routes by
    them); an id the client chose stays as it is."""
    named, plain = await make_app(replica="edge-7"), await make_app()
    made = []
    for app in (named, plain):
        async with channel_to(app) as channel:
            stub = pb_grpc.RelayServiceStub(channel)
            request, chosen = start_request(""), start_request("cam-1")
            for each in (request, chosen):
                each.publish_url += f"-{app.port}"
                each.allow_shared_processor = True
            made.append((await stub.StartSession(request, timeout=RPC_TIMEOUT)).session.session_id)
            assert (await stub.StartSession(chosen, timeout=RPC_TIMEOUT)).session.session_id == "cam-1"
    replica, qualified = made[0].split(".", 1)
    assert replica == "edge-7" and uuid.UUID(qualified)
    assert uuid.UUID(made[1])


# -- authentication --------------------------------------------------------------------------------


async def test_relay_calls_need_the_bearer_token_health_and_reflection_do_not(make_app: MakeApp) -> None:
    app = await make_app(auth_token=TOKEN)
    async with channel_to(app) as channel:
        stub = pb_grpc.RelayServiceStub(channel)
        cases = {
            "missing credentials": (),
            "invalid bearer token": bearer("wrong-token"),
            "malformed credentials": (("authorization", f"Basic {TOKEN}"),),
        }
        for message, metadata in cases.items():
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.ListSessions(pb.ListSessionsRequest(), metadata=metadata, timeout=RPC_TIMEOUT)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, message
            assert message in (refused.value.details() or ""), refused.value.details()
            info = status_details(refused.value)[error_details_pb2.ErrorInfo]  # as every error has
            assert isinstance(info, error_details_pb2.ErrorInfo) and info.reason == "UNAUTHENTICATED"

        # A streaming call is refused the same way, before the servicer sees it.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in stub.WatchSession(pb.WatchSessionRequest(session_id="any"), timeout=RPC_TIMEOUT):
                pass
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED

        # The right token: through to the servicer (which answers NOT_FOUND for an unknown id).
        reply = await stub.ListSessions(pb.ListSessionsRequest(), metadata=bearer(TOKEN), timeout=RPC_TIMEOUT)
        assert list(reply.sessions) == []
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.GetSession(
                pb.GetSessionRequest(session_id="nobody"), metadata=bearer(TOKEN), timeout=RPC_TIMEOUT
            )
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        # The scheme is case-insensitive (RFC 7235).
        await stub.ListSessions(
            pb.ListSessionsRequest(), metadata=(("authorization", f"bearer {TOKEN}"),), timeout=RPC_TIMEOUT
        )

        health = health_pb2_grpc.HealthStub(channel)
        reply_health = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=RPC_TIMEOUT)
        assert reply_health.status == SERVING

        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = reflection.ServerReflectionInfo(timeout=RPC_TIMEOUT)
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        listed = await call.read()
        await call.done_writing()
        names = {service.name for service in listed.list_services_response.service}
        assert SERVICE in names, names


# -- TLS -------------------------------------------------------------------------------------------


def self_signed(directory: Path) -> tuple[Path, Path, bytes]:
    """A certificate for localhost and 127.0.0.1 and its key, as PEM files; and the certificate."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        return self_signed_openssl(directory)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = certificate.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (directory / "cert.pem").write_bytes(cert_pem)
    (directory / "key.pem").write_bytes(key_pem)
    return directory / "cert.pem", directory / "key.pem", cert_pem


def self_signed_openssl(directory: Path) -> tuple[Path, Path, bytes]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    command = [
        "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
        "-keyout", str(key), "-out", str(cert),
    ]  # fmt: skip
    try:
        subprocess.run(command, check=True, capture_output=True, timeout=60)
    except (OSError, subprocess.CalledProcessError) as error:
        pytest.skip(f"no way to make a test certificate: cryptography is missing, openssl failed ({error})")
    return cert, key, cert.read_bytes()


async def test_tls_serves_clients_that_trust_the_certificate_and_no_plaintext(
    make_app: MakeApp, tmp_path: Path
) -> None:
    cert, key, cert_pem = self_signed(tmp_path)
    app = await make_app(tls_cert=cert, tls_key=key, auth_token=TOKEN)
    async with channel_to(app, grpc.ssl_channel_credentials(root_certificates=cert_pem)) as channel:
        reply = await pb_grpc.RelayServiceStub(channel).ListSessions(
            pb.ListSessionsRequest(), metadata=bearer(TOKEN), timeout=RPC_TIMEOUT
        )
        assert list(reply.sessions) == []
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT
        )
        assert health.status == SERVING

    async with channel_to(app) as plaintext:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await health_pb2_grpc.HealthStub(plaintext).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_tls_options_are_checked_before_anything_starts(tmp_path: Path) -> None:
    cert, _, _ = self_signed(tmp_path)
    with pytest.raises(ValueError, match="both a certificate and a key"):
        RelayApp(options(tls_cert=cert))
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello")
    with pytest.raises(ValueError, match="is not PEM"):
        RelayApp(options(tls_cert=cert, tls_key=not_pem))


# -- metrics ---------------------------------------------------------------------------------------


async def test_metrics_count_rpcs_by_method_and_code(make_app: MakeApp) -> None:
    app = await make_app(auth_token=TOKEN)
    assert app.metrics_url is not None
    async with channel_to(app) as channel:
        stub = pb_grpc.RelayServiceStub(channel)
        await stub.ListSessions(pb.ListSessionsRequest(), metadata=bearer(TOKEN), timeout=RPC_TIMEOUT)
        await stub.ListSessions(pb.ListSessionsRequest(), metadata=bearer(TOKEN), timeout=RPC_TIMEOUT)
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.GetSession(pb.GetSessionRequest(session_id="x"), metadata=bearer(TOKEN), timeout=5)
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.ListSessions(pb.ListSessionsRequest(), timeout=RPC_TIMEOUT)  # no token
        health = health_pb2_grpc.HealthStub(channel)
        await health.Check(health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT)

    text = await scrape(app.metrics_url)
    unary = {"grpc_type": "unary", "grpc_service": SERVICE}
    handled = "grpc_server_handled_total"
    assert value(text, handled, **unary, grpc_method="ListSessions", grpc_code="OK") == 2
    assert value(text, handled, **unary, grpc_method="ListSessions", grpc_code="Unauthenticated") == 1
    assert value(text, handled, **unary, grpc_method="GetSession", grpc_code="NotFound") == 1
    assert value(text, "grpc_server_started_total", **unary, grpc_method="ListSessions") == 3
    histogram = {**unary, "grpc_method": "ListSessions"}
    assert value(text, "grpc_server_handling_seconds_count", **histogram) == 3
    assert value(text, "grpc_server_handling_seconds_bucket", **histogram, le="+Inf") == 3
    assert (
        value(text, handled, grpc_service="grpc.health.v1.Health", grpc_method="Check", grpc_code="OK") == 1
    )


async def test_metrics_show_the_sessions_at_scrape_time(
    make_app: MakeApp, start_request: Callable[[str], pb.StartSessionRequest]
) -> None:
    app = await make_app(max_sessions=3)
    assert app.metrics_url is not None
    text = await scrape(app.metrics_url)
    assert value(text, "relay_sessions", state="starting") == 0
    assert value(text, "relay_sessions_max") == 3

    async with channel_to(app) as channel:
        stub = pb_grpc.RelayServiceStub(channel)
        await stub.StartSession(start_request("metered"), timeout=RPC_TIMEOUT)
        text = await scrape(app.metrics_url)
        got = await stub.GetSession(pb.GetSessionRequest(session_id="metered"), timeout=RPC_TIMEOUT)

        assert value(text, "relay_sessions", state="starting") == 1
        assert value(text, "relay_sessions", state="running") == 0
        sid = {"session_id": "metered"}
        assert value(text, "relay_session_state", **sid, state="starting") == 1
        assert value(text, "relay_session_state", **sid, state="running") == 0
        for stage in ("decoded", "sent", "returned", "encoded"):
            assert value(text, f"relay_session_frames_{stage}_total", **sid) == 0, stage
        assert value(text, "relay_session_processor_connections_total", **sid) == 0
        assert value(text, "relay_session_reconnects_total", **sid) == 0
        # AUTO, before any input: the send leg encodes (nothing qualified yet), the output remuxes.
        legs = (("send", "forward"), ("send", "encode"), ("output", "remux"), ("output", "encode"))
        paths = {
            (leg, path): value(text, "relay_session_path", **sid, leg=leg, path=path) for leg, path in legs
        }
        assert paths == {
            ("send", "forward"): 0,
            ("send", "encode"): 1,
            ("output", "remux"): 1,
            ("output", "encode"): 0,
        }
        assert value(text, "relay_session_path_switches_total", **sid) == 0
        # Queues and drop reasons: the same names the session's own stats use.
        snapshot = app.manager.get("metered").snapshot()
        queues = {labels["queue"] for n, labels, _ in samples(text) if n == "relay_session_queue_depth"}
        assert queues == {queue.name for queue in snapshot.stats.queues}
        assert value(text, "relay_session_queue_capacity", **sid, queue="decoded_frames") == CAPACITY
        reasons = {labels["reason"] for n, labels, _ in samples(text) if n == "relay_session_drops_total"}
        assert reasons == set(snapshot.stats.drops)
        # No latency measured yet: no latency series rather than NaN.
        assert value(text, "relay_session_latency_seconds", **sid, quantile="0.5") is None
        assert got.session.state == pb.SESSION_STATE_STARTING

        await stub.StopSession(pb.StopSessionRequest(session_id="metered"), timeout=RPC_TIMEOUT)
    text = await scrape(app.metrics_url)
    assert value(text, "relay_sessions", state="starting") == 0
    assert value(text, "relay_sessions", state="stopped") == 1
    assert value(text, "relay_session_state", session_id="metered", state="stopped") == 1


async def test_each_app_has_its_own_registry(make_app: MakeApp) -> None:
    first, second = await make_app(), await make_app()
    async with channel_to(first) as channel:
        await pb_grpc.RelayServiceStub(channel).ListSessions(pb.ListSessionsRequest(), timeout=RPC_TIMEOUT)
    assert first.metrics_url is not None and second.metrics_url is not None
    labels = {"grpc_method": "ListSessions", "grpc_code": "OK"}
    assert value(await scrape(first.metrics_url), "grpc_server_handled_total", **labels) == 1
    assert value(await scrape(second.metrics_url), "grpc_server_handled_total", **labels) is None


async def test_metrics_can_be_turned_off(make_app: MakeApp) -> None:
    app = await make_app(metrics_listen=None)
    assert app.metrics_url is None


# -- logs ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def captured_logs(log_format: str) -> Iterator[io.StringIO]:
    """relay_server's records at INFO and above, formatted as `serve` would, into a buffer."""
    stream = io.StringIO()
    handler = make_handler(log_format, stream)
    logger = logging.getLogger("relay_server")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


async def test_json_log_lines_carry_the_session_id(
    make_app: MakeApp, start_request: Callable[[str], pb.StartSessionRequest]
) -> None:
    app = await make_app()
    async with channel_to(app) as channel:
        stub = pb_grpc.RelayServiceStub(channel)
        with captured_logs("json") as stream:
            logging.getLogger("relay_server.test").info("outside any session")
            await stub.StartSession(start_request("logged"), timeout=RPC_TIMEOUT)
            # Stopping logs "stopping" in the RPC's task and "stopped" in the session's own task.
            await stub.StopSession(pb.StopSessionRequest(session_id="logged"), timeout=RPC_TIMEOUT)
            try:
                raise RuntimeError("boom")
            except RuntimeError:
                logging.getLogger("relay_server.test").exception("with a traceback")

    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert records, "nothing logged"
    for record in records:
        assert set(record) >= {"time", "level", "logger", "message", "session_id"}, record
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["time"]), record
    about = [r for r in records if "session logged:" in r["message"]]
    messages = [r["message"] for r in about]
    assert any("stopping" in m for m in messages) and any(": stopped" in m for m in messages), messages
    assert {r["session_id"] for r in about} == {"logged"}, about
    outside = next(r for r in records if r["message"] == "outside any session")
    assert outside["session_id"] is None
    failure = next(r for r in records if r["message"] == "with a traceback")
    assert failure["level"] == "ERROR" and failure["session_id"] is None
    assert "RuntimeError: boom" in failure["exc_info"]


async def test_text_log_lines_tag_the_session(
    make_app: MakeApp, start_request: Callable[[str], pb.StartSessionRequest]
) -> None:
    app = await make_app()
    async with channel_to(app) as channel:
        stub = pb_grpc.RelayServiceStub(channel)
        with captured_logs("text") as stream:
            await stub.StartSession(start_request("tagged"), timeout=RPC_TIMEOUT)
            await stub.StopSession(pb.StopSessionRequest(session_id="tagged"), timeout=RPC_TIMEOUT)
            logging.getLogger("relay_server.test").info("outside any session")
    lines = stream.getvalue().splitlines()
    stopped = [line for line in lines if "session tagged: stopped" in line]
    assert stopped and all(" [session=tagged]: " in line for line in stopped), lines
    assert any(line.endswith("relay_server.test: outside any session") for line in lines), lines


async def test_a_sessions_decode_thread_logs_with_its_session_id(
    make_app: MakeApp, trickle_server: TrickleServer, dead_processor: str
) -> None:
    clip = make_clip(ClipSpec(frames=15))
    source = Publisher(trickle_server.channel_url("decoded-in"))
    await source.create_channel()
    async with await source.segment() as segment:
        await segment.write(clip.data)
    request = pb.StartSessionRequest(
        session_id="decoded",
        subscribe_url=source.url,
        publish_url=trickle_server.channel_url("decoded-out"),
        processor_url=dead_processor,
        mode=pb.SESSION_MODE_TRANSCODE,  # decoded, not forwarded: the decoder logs its first frame
    )
    app = await make_app()
    async with channel_to(app) as channel:
        stub = pb_grpc.RelayServiceStub(channel)
        with captured_logs("json") as stream:
            await stub.StartSession(request, timeout=RPC_TIMEOUT)
            watch = stub.WatchSession(pb.WatchSessionRequest(session_id="decoded", interval=seconds(0.1)))
            async with asyncio.timeout(RPC_TIMEOUT):
                while (await watch.read()).session.stats.frames_decoded == 0:
                    pass
            watch.cancel()
            await stub.StopSession(pb.StopSessionRequest(session_id="decoded"), timeout=RPC_TIMEOUT)
    await source.close()
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    decoder = [r for r in records if r["logger"] == "relay_server.media.decoder"]
    assert any("first frame" in r["message"] for r in decoder), records
    assert {r["session_id"] for r in decoder} == {"decoded"}, decoder


# -- the command -----------------------------------------------------------------------------------


def command() -> list[str]:
    script = Path(sys.executable).with_name("trickle-relay")
    return [str(script)] if script.exists() else [sys.executable, "-m", "relay_server"]


async def serve_process(*flags: str, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    """`trickle-relay serve` with `flags`, logging at INFO to a pipe (stderr), nothing else."""
    return await asyncio.create_subprocess_exec(
        *command(),
        "serve",
        "--log-level=info",
        *flags,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )


async def read_until(stream: asyncio.StreamReader, pattern: str, seen: list[str]) -> re.Match[str]:
    """Read lines (kept in `seen`) until one matches `pattern`."""
    while True:
        line = (await stream.readline()).decode()
        if not line:
            raise AssertionError(f"the process ended its log without {pattern!r}:\n{''.join(seen)}")
        seen.append(line)
        match = re.search(pattern, line)
        if match:
            return match


async def test_serve_runs_until_sigterm_then_drains_and_exits_0(
    start_request: Callable[[str], pb.StartSessionRequest],
) -> None:
    env = {
        **os.environ,
        # Invalid on purpose: the flags given win over their variables.
        "RELAY_MAX_SESSIONS": "many",
        "RELAY_LOG_LEVEL": "chatty",
        "RELAY_METRICS_LISTEN": "nowhere",
    }
    process = await serve_process(
        "--listen=127.0.0.1:0", "--metrics-listen=127.0.0.1:0", "--max-sessions=2", "--drain-grace=2", env=env
    )
    assert process.stderr is not None
    log: list[str] = []
    try:
        async with asyncio.timeout(30):  # process start-up: imports, binding
            ready = await read_until(process.stderr, r"ready: grpc (\S+) .*, metrics (\S+),", log)
            target, metrics_url = ready[1], ready[2]
        async with grpc.aio.insecure_channel(target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            async with asyncio.timeout(30):
                while True:  # polled with a deadline: acceptable for a process starting up
                    try:
                        reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                    except grpc.aio.AioRpcError:
                        continue
                    if reply.status == SERVING:
                        break
            assert value(await scrape(metrics_url), "relay_sessions_max") == 2

            stub = pb_grpc.RelayServiceStub(channel)
            await stub.StartSession(start_request("in-process"), timeout=RPC_TIMEOUT)

            process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(10):
                rest = (await process.stderr.read()).decode()
                code = await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    log.append(rest)
    output = "".join(log)
    assert code == 0, output
    assert "signalled: draining" in output
    assert re.search(
        r"\[session=in-process\]: session in-process: stopped \(the relay is shutting down\)", output
    )
    assert "drained; exiting" in output


@pytest.mark.parametrize(
    ("arguments", "env", "message"),
    [
        (["--max-sessions", "zero"], {}, "argument --max-sessions: expected an integer, got 'zero'"),
        (["--max-sessions", "0"], {}, "argument --max-sessions: must be at least 1, got 0"),
        (["--listen", "localhost"], {}, "argument --listen: expected HOST:PORT, got 'localhost'"),
        (["--log-format", "xml"], {}, "argument --log-format: expected one of text, json, got 'xml'"),
        (["--log-level", "chatty"], {}, "RELAY_LOG_LEVEL: expected one of DEBUG"),
        (["--drain-grace", "-1"], {}, "argument --drain-grace: must be a finite number of seconds"),
        (["--allow-hosts", "http://a.example"], {}, "argument --allow-hosts: expected comma-separated host"),
        (["--tls-cert", "/nonexistent/cert.pem"], {}, "argument --tls-cert: no such file"),
        ([], {"RELAY_MAX_SESSIONS": "0"}, "RELAY_MAX_SESSIONS: must be at least 1, got 0"),
        ([], {"RELAY_LISTEN": "here"}, "RELAY_LISTEN: expected HOST:PORT, got 'here'"),
        ([], {"RELAY_METRICS_LISTEN": "127.0.0.1:99999"}, "RELAY_METRICS_LISTEN: expected HOST:PORT"),
        ([], {"RELAY_DRAIN_GRACE": "nan"}, "RELAY_DRAIN_GRACE: must be a finite number"),
        ([], {"RELAY_LOG_FORMAT": "xml"}, "RELAY_LOG_FORMAT: expected one of text, json"),
        ([], {"RELAY_TLS_KEY": "/nonexistent/key.pem"}, "RELAY_TLS_KEY: no such file"),
        (["--replica", "relay.0"], {}, "argument --replica: use 1-63 letters, digits, '_' or '-'"),
        ([], {"RELAY_REPLICA": "a" * 64}, "RELAY_REPLICA: use 1-63 letters"),
    ],
)
def test_invalid_options_exit_2_saying_what_is_wrong(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    arguments: list[str],
    env: dict[str, str],
    message: str,
) -> None:
    for name in [name for name in os.environ if name.startswith("RELAY_")]:
        monkeypatch.delenv(name)
    for name, text in env.items():
        monkeypatch.setenv(name, text)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["serve", *arguments])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_tls_needs_both_files(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    cert, _, _ = self_signed(tmp_path)
    monkeypatch.delenv("RELAY_TLS_KEY", raising=False)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["serve", "--tls-cert", str(cert)])
    assert exit_.value.code == 2
    assert "TLS needs both a certificate and a key" in capsys.readouterr().err


def test_the_command_exits_2_on_an_invalid_flag() -> None:
    done = subprocess.run(
        [*command(), "serve", "--max-sessions", "zero"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert "argument --max-sessions: expected an integer, got 'zero'" in done.stderr


@pytest.mark.parametrize("taken", ["--listen", "--metrics-listen"])
def test_the_command_exits_1_when_a_port_is_taken(taken: str) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        ports = {"--listen": "127.0.0.1:0", "--metrics-listen": "127.0.0.1:0"}
        ports[taken] = f"127.0.0.1:{sock.getsockname()[1]}"
        arguments = [f"{flag}={address}" for flag, address in ports.items()]
        done = subprocess.run([*command(), "serve", *arguments], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert "cannot start the relay service" in done.stderr


def test_serve_help_lists_every_variable(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["serve", "--help"])
    assert exit_.value.code == 0
    help_text = capsys.readouterr().out
    for name in (
        "RELAY_LISTEN",
        "RELAY_MAX_SESSIONS",
        "RELAY_ALLOW_HOSTS",
        "RELAY_METRICS_LISTEN",
        "RELAY_AUTH_TOKEN",
        "RELAY_TLS_CERT",
        "RELAY_TLS_KEY",
        "RELAY_LOG_FORMAT",
        "RELAY_LOG_LEVEL",
        "RELAY_DRAIN_GRACE",
        "RELAY_REPLICA",
        "TRICKLE_CHUNK_SIZE",
        "TRICKLE_BUFFER_SIZE",
        "TRICKLE_TIMEOUT",
        "TRICKLE_WORKERS",
    ):
        assert name in help_text, name
