"""The error model through the gRPC API: URLs taken apart in full at StartSession, the processor
guard comparing addresses, and every error the API returns carrying its details (ErrorInfo with a
stable reason always; BadRequest, RetryInfo, PreconditionFailure where they apply).

Sessions here need no media: they read a channel nobody publishes to and name a processor that
never answers.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable

import grpc
import pytest
from google.rpc import error_details_pb2

from relay_server.api.relay.v1 import relay_service_pb2 as pb
from tests.service.conftest import INVERT, MakeRelay, Relay, drain_under_way, struct
from tests.service.test_api import rpc_error, start_request, status_details

URL_FIELDS = ("subscribe_url", "publish_url", "processor_url", "control_url", "events_url", "data_url")


def no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    logged = [(r.name, r.getMessage()) for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not logged, logged


@pytest.mark.parametrize(
    ("url", "description"),
    [
        ("http://127.0.0.1:99999/in", "is not a valid URL (Port out of range 0-65535)"),
        ("http://127.0.0.1:abc/in", "is not a valid URL (Port could not be cast to integer value as 'abc')"),
        ("http://127.0.0.1:0/in", "port must be 1-65535, got 0"),
        ("http://[::1/in", "is not a valid URL (Invalid IPv6 URL)"),
        ("http://[zz]/in", "is not a valid URL ('zz' does not appear to be an IPv4 or IPv6 address)"),
        ("http://a\uff03b/in", "has characters that NFKC normalisation changes"),  # a full-width '#'
        (
            "http://TRICKLE_HOST:PORT/in",
            "is not a valid URL (Port could not be cast to integer value as 'PORT')",
        ),
        ("http://user:secret@127.0.0.1/in", "must not carry user info (user@ or user:password@)"),
        ("http://127.0.0.1/in#top", "must not have a fragment (#...)"),
        ("http://127.0.0.1/in put", "has spaces or control characters"),
        ("http://999.1.1.1/in", "host '999.1.1.1' is not a valid host name or address"),
        ("http://-bad-.example/in", "host '-bad-.example' is not a valid host name or address"),
        ("ftp://127.0.0.1/in", "must be an http(s) URL with a host, got 'ftp://127.0.0.1/in'"),
        ("http://127.0.0.1/" + "x" * 2040, "2057 characters, at most 2048"),
    ],
    ids=[
        "port_99999",
        "port_abc",
        "port_0",
        "open_bracket",
        "not_ipv6",
        "nfkc",
        "placeholder",
        "userinfo",
        "fragment",
        "space",
        "bad_ipv4",
        "bad_label",
        "scheme",
        "long",
    ],
)
async def test_a_malformed_url_is_invalid_argument_naming_its_field(
    relay: Relay,
    idle_channel: str,
    closed_port_url: str,
    caplog: pytest.LogCaptureFixture,
    url: str,
    description: str,
) -> None:
    code = grpc.StatusCode.INVALID_ARGUMENT
    for field in URL_FIELDS:
        request = start_request("bad", idle_channel, closed_port_url, **{field: url})
        got = await rpc_error(relay.stub.StartSession(request), code, f"{field}: {description}")
        assert got == [(field, description)]
    assert not (await relay.stub.ListSessions(pb.ListSessionsRequest())).sessions
    no_traceback(caplog)


async def test_the_same_channel_in_and_out_is_refused(
    relay: Relay, idle_channel: str, closed_port_url: str
) -> None:
    description = "must differ from subscribe_url: the output would feed the input"
    code = grpc.StatusCode.INVALID_ARGUMENT
    # Spelled the same, and spelled differently (scheme and host case, the default port, a slash).
    host, path = idle_channel.removeprefix("http://").split("/", 1)
    for publish in (idle_channel, f"HTTP://{host}/{path}/"):
        request = start_request("loop", idle_channel, closed_port_url, publish_url=publish)
        got = await rpc_error(relay.stub.StartSession(request), code, f"publish_url: {description}")
        assert got == [("publish_url", description)]
    default_port = start_request(
        "loop", "http://127.0.0.1/in", closed_port_url, publish_url="http://127.0.0.1:80/in/"
    )
    got = await rpc_error(relay.stub.StartSession(default_port), code, f"publish_url: {description}")
    assert got == [("publish_url", description)]


async def test_localhost_and_127_0_0_1_are_the_same_processor(
    relay: Relay, idle_channel: str, closed_port_url: str
) -> None:
    port = closed_port_url.rsplit(":", 1)[1]
    await relay.stub.StartSession(start_request("first", idle_channel, f"http://127.0.0.1:{port}/p"))
    same = f"http://localhost:{port}/p/"
    second = relay.stub.StartSession(start_request("second", idle_channel, same))
    message = f"processor {same} is in use by session 'first'; set allow_shared_processor on both to share it"
    error = await failed(second, grpc.StatusCode.FAILED_PRECONDITION, message)
    failure = status_details(error)[error_details_pb2.PreconditionFailure]
    assert isinstance(failure, error_details_pb2.PreconditionFailure)
    assert [(v.type, v.subject, v.description) for v in failure.violations] == [
        ("PROCESSOR_FREE", same, "in use by session 'first', which does not share it")
    ]
    # Another path on the same host and port is another processor; so is another port. Every
    # spelling of a host is taken: IPv6 in brackets, https, a name with an underscore.
    others = (
        f"http://localhost:{port}/q",
        f"http://[::1]:{port}/r",
        f"https://localhost:{port}/s",
        f"http://trickle_host.local:{port}/t",
        f"http://localhost:{int(port) + 1 if int(port) < 65535 else 1}/p",
    )
    for index, url in enumerate(others):
        other = start_request(f"other-{index}", idle_channel, url, events_url=f"{idle_channel}-events?x=1")
        assert (await relay.stub.StartSession(other)).session.state == pb.SESSION_STATE_STARTING


async def failed(call: Awaitable[object], code: grpc.StatusCode, message: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert (caught.value.code(), caught.value.details()) == (code, message)
    return caught.value


async def test_every_error_carries_error_info_and_the_details_of_its_code(
    make_relay: MakeRelay, idle_channel: str, closed_port_url: str, unresponsive_url: str
) -> None:
    relay = await make_relay(max_sessions=3, allowed_hosts=frozenset({"127.0.0.1"}))
    stub = relay.stub
    await stub.StartSession(start_request("s", idle_channel, closed_port_url))
    await stub.StartSession(start_request("ended", idle_channel, closed_port_url + "/e"))
    await stub.StopSession(pb.StopSessionRequest(session_id="ended"))
    await stub.StartSession(
        start_request("pass", idle_channel, closed_port_url + "/p", mode=pb.SESSION_MODE_PASSTHROUGH)
    )
    calls: list[tuple[str, Awaitable[object], grpc.StatusCode, str]] = [
        (
            "INVALID_FIELD",
            stub.StartSession(start_request("bad id", idle_channel, closed_port_url)),
            "INVALID_ARGUMENT",
            "",
        ),
        (
            "HOST_NOT_ALLOWED",
            stub.StartSession(
                start_request("h", idle_channel.replace("127.0.0.1", "localhost"), closed_port_url)
            ),
            "PERMISSION_DENIED",
            "",
        ),
        ("SESSION_NOT_FOUND", stub.GetSession(pb.GetSessionRequest(session_id="ghost")), "NOT_FOUND", ""),
        (
            "SESSION_EXISTS",
            stub.StartSession(start_request("s", idle_channel, closed_port_url)),
            "ALREADY_EXISTS",
            "",
        ),
        (
            "PROCESSOR_IN_USE",
            stub.StartSession(start_request("t", idle_channel, closed_port_url)),
            "FAILED_PRECONDITION",
            "PROCESSOR_FREE",
        ),
        (
            "SESSION_ENDED",
            stub.UpdateSession(pb.UpdateSessionRequest(session_id="ended", prompts=[struct(INVERT)])),
            "FAILED_PRECONDITION",
            "SESSION_ACTIVE",
        ),
        (
            "SESSION_NOT_RESIZABLE",
            stub.UpdateSession(pb.UpdateSessionRequest(session_id="pass", width=640, height=360)),
            "FAILED_PRECONDITION",
            "SESSION_RESIZABLE",
        ),
        (
            "PROCESSOR_UNAVAILABLE",
            stub.UpdateSession(pb.UpdateSessionRequest(session_id="s", prompts=[struct(INVERT)])),
            "UNAVAILABLE",
            "",
        ),
    ]
    await stub.StartSession(start_request("third", idle_channel, closed_port_url + "/3"))
    calls.append(
        (
            "SESSION_LIMIT_REACHED",
            stub.StartSession(start_request("fourth", idle_channel, closed_port_url + "/4")),
            "RESOURCE_EXHAUSTED",
            "",
        )
    )
    seen = set()
    for reason, call, code_name, precondition in calls:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        code = caught.value.code()
        assert code.name == code_name, (reason, caught.value.details())
        check_details(caught.value, reason, precondition)
        seen.add(code_name)

    # Draining: UNAVAILABLE with a reason of its own (a session with a hung events gateway keeps
    # the drain under way for its grace).
    await stub.StopSession(pb.StopSessionRequest(session_id="third"))
    lingering = start_request("lingering", idle_channel, closed_port_url + "/l", events_url=unresponsive_url)
    async with drain_under_way(relay, lingering):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.StartSession(start_request("late", idle_channel, closed_port_url + "/late"))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        check_details(caught.value, "DRAINING", "")
    assert seen | {"UNAVAILABLE"} == {
        "INVALID_ARGUMENT",
        "PERMISSION_DENIED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "FAILED_PRECONDITION",
        "UNAVAILABLE",
        "RESOURCE_EXHAUSTED",
    }


def check_details(error: grpc.aio.AioRpcError, reason: str, precondition: str) -> None:
    """ErrorInfo with `reason` always; BadRequest for INVALID_ARGUMENT and PERMISSION_DENIED,
    RetryInfo for UNAVAILABLE and RESOURCE_EXHAUSTED, PreconditionFailure of type `precondition`
    for FAILED_PRECONDITION, and nothing else."""
    details = status_details(error)
    info = details[error_details_pb2.ErrorInfo]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert (info.reason, info.domain) == (reason, "trickle-relay")
    code = error.code()
    expected = {error_details_pb2.ErrorInfo}
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED):
        expected.add(error_details_pb2.BadRequest)
        bad = details[error_details_pb2.BadRequest]
        assert isinstance(bad, error_details_pb2.BadRequest) and bad.field_violations
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED):
        expected.add(error_details_pb2.RetryInfo)
        retry = details[error_details_pb2.RetryInfo]
        assert isinstance(retry, error_details_pb2.RetryInfo) and retry.retry_delay.ToNanoseconds() > 0
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        expected.add(error_details_pb2.PreconditionFailure)
        failure = details[error_details_pb2.PreconditionFailure]
        assert isinstance(failure, error_details_pb2.PreconditionFailure)
        assert [v.type for v in failure.violations] == [precondition]
        assert all(v.subject and v.description for v in failure.violations)
    assert set(details) == expected, (reason, set(details))
