"""Bounds on what a request carries, and ListSessions in pages, through the gRPC API (a real
server and a default client on loopback). Sessions here need no media: they read a channel
nobody publishes to and name a processor that never answers, so they wait until stopped.
"""

from __future__ import annotations

import logging

import grpc
import pytest

from relay_server.api.relay.v1 import relay_service_pb2 as pb
from tests.service.conftest import INVERT, MakeRelay, Relay, seconds, struct
from tests.service.test_api import rpc_error, start_request

GRPC_DEFAULT_MAX_MESSAGE = 4 * 1024 * 1024  # what a default client takes at most
MIB = 1 << 20
# The documented bounds (README): the API's contract, so spelled out here rather than imported.
MAX_PROMPT_BYTES = MIB
MAX_PAGE_BYTES = 3 * MIB


def bulky(size: int) -> dict[str, object]:
    """A workflow whose encoded Struct is about `size` bytes."""
    return {"1": {"class_type": "Invert", "inputs": {"notes": "x" * size}}}


def no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    logged = [(r.name, r.getMessage()) for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not logged, logged


async def test_prompts_past_1_mib_are_refused_naming_the_field(
    relay: Relay, idle_channel: str, closed_port_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Two workflows of 1.25 MB: 2.5 MB of prompts, which the relay would keep and send back in
    # every snapshot.
    prompts = [struct(bulky(1_250_000)) for _ in range(2)]
    size = sum(p.ByteSize() for p in prompts)
    request = start_request("big", idle_channel, closed_port_url, prompts=prompts)
    description = f"{size} bytes encoded, at most {MAX_PROMPT_BYTES} in all"
    code = grpc.StatusCode.INVALID_ARGUMENT
    got = await rpc_error(relay.stub.StartSession(request), code, f"prompts: {description}")
    assert got == [("prompts", description)]
    many = start_request("many", idle_channel, closed_port_url, prompts=[struct(INVERT)] * 17)
    got = await rpc_error(relay.stub.StartSession(many), code, "prompts: 17 workflows, at most 16")
    assert got == [("prompts", "17 workflows, at most 16")]
    assert not (await relay.stub.ListSessions(pb.ListSessionsRequest())).sessions

    # The same bound for an update; at the bound itself a session starts.
    fits = [struct(bulky(MAX_PROMPT_BYTES - 100))]
    assert sum(p.ByteSize() for p in fits) <= MAX_PROMPT_BYTES
    await relay.stub.StartSession(start_request("s", idle_channel, closed_port_url, prompts=fits))
    update = pb.UpdateSessionRequest(session_id="s", prompts=prompts)
    got = await rpc_error(relay.stub.UpdateSession(update), code, f"prompts: {description}")
    assert got == [("prompts", description)]
    no_traceback(caplog)


@pytest.mark.parametrize(
    ("call", "field", "description"),
    [
        ("get", "session_id", "use 1-128 letters, digits, '.', '_' or '-'"),
        ("gateway", "gateway_request_id", "use at most 128 printable ASCII characters, no spaces"),
        ("offer_timeout", "offer_timeout", "must be 0..600 s, got 1e+18"),
        ("pause", "pause", "unknown value 9"),
    ],
)
async def test_other_fields_are_bounded(
    relay: Relay,
    idle_channel: str,
    closed_port_url: str,
    caplog: pytest.LogCaptureFixture,
    call: str,
    field: str,
    description: str,
) -> None:
    stub, code = relay.stub, grpc.StatusCode.INVALID_ARGUMENT
    await stub.StartSession(start_request("s", idle_channel, closed_port_url))
    calls = {
        # A megabyte of id, which a NOT_FOUND message would have echoed into the trailers.
        "get": lambda: stub.GetSession(pb.GetSessionRequest(session_id="x" * MIB)),
        "gateway": lambda: stub.StartSession(
            start_request("g", idle_channel, closed_port_url + "/g", gateway_request_id="r" * 129)
        ),
        "offer_timeout": lambda: stub.StartSession(
            start_request("o", idle_channel, closed_port_url + "/o", offer_timeout=seconds(1e18))
        ),
        "pause": lambda: stub.UpdateSession(pb.UpdateSessionRequest(session_id="s", pause=9)),  # type: ignore[arg-type]
    }
    assert await rpc_error(calls[call](), code, f"{field}: {description}") == [(field, description)]
    no_traceback(caplog)


async def test_list_sessions_pages_stay_under_4_mb_and_show_each_session_once(
    make_relay: MakeRelay, idle_channel: str, closed_port_url: str
) -> None:
    relay = await make_relay(max_sessions=8)
    # Prompts at the bound: every session is about 1 MiB in a listing.
    prompts = [struct(bulky(MAX_PROMPT_BYTES - 100))]
    ids = [f"s{i}" for i in range(12)]
    for session_id in ids[:4]:  # ended ones are listed too
        await relay.stub.StartSession(
            start_request(session_id, idle_channel, closed_port_url, prompts=prompts)
        )
        await relay.stub.StopSession(pb.StopSessionRequest(session_id=session_id))
    for index, session_id in enumerate(ids[4:]):
        url = f"{closed_port_url}/{index}"
        await relay.stub.StartSession(start_request(session_id, idle_channel, url, prompts=prompts))

    seen: list[str] = []
    token = ""
    sizes: list[int] = []
    while True:
        page = await relay.stub.ListSessions(pb.ListSessionsRequest(page_token=token))
        sizes.append(page.ByteSize())
        seen += [session.session_id for session in page.sessions]
        if not page.next_page_token:
            break
        token = page.next_page_token
        if len(sizes) == 2:  # a session started between two pages comes in a later one
            await relay.stub.StopSession(pb.StopSessionRequest(session_id="s4"))
            await relay.stub.StartSession(start_request("late", idle_channel, closed_port_url + "/late"))
            ids.append("late")
    assert seen == ids  # each once, in start order
    assert len(sizes) >= 4 and max(sizes) < MAX_PAGE_BYTES < GRPC_DEFAULT_MAX_MESSAGE, sizes

    # page_size: 0 is the default, a larger one than the maximum is the maximum.
    small = await relay.stub.ListSessions(pb.ListSessionsRequest(page_size=1))
    assert [s.session_id for s in small.sessions] == ["s0"] and small.next_page_token
    rest = await relay.stub.ListSessions(
        pb.ListSessionsRequest(page_size=1000, page_token=small.next_page_token)
    )
    assert [s.session_id for s in rest.sessions] == ["s1", "s2"]  # 3 MiB of them


async def test_list_sessions_page_size_without_big_prompts(
    relay: Relay, idle_channel: str, closed_port_url: str
) -> None:
    for index in range(5):
        await relay.stub.StartSession(start_request(f"s{index}", idle_channel, f"{closed_port_url}/{index}"))
    first = await relay.stub.ListSessions(pb.ListSessionsRequest(page_size=2))
    second = await relay.stub.ListSessions(
        pb.ListSessionsRequest(page_size=2, page_token=first.next_page_token)
    )
    third = await relay.stub.ListSessions(
        pb.ListSessionsRequest(page_size=2, page_token=second.next_page_token)
    )
    listed = [[s.session_id for s in page.sessions] for page in (first, second, third)]
    assert listed == [["s0", "s1"], ["s2", "s3"], ["s4"]]
    assert third.next_page_token == ""
    everything = await relay.stub.ListSessions(pb.ListSessionsRequest())
    assert len(everything.sessions) == 5 and everything.next_page_token == ""


async def test_a_bad_page_token_or_size_is_invalid_argument(
    make_relay: MakeRelay, idle_channel: str, closed_port_url: str
) -> None:
    relay, other = await make_relay(), await make_relay()
    for index in range(3):
        await relay.stub.StartSession(start_request(f"s{index}", idle_channel, f"{closed_port_url}/{index}"))
        await other.stub.StartSession(start_request(f"o{index}", idle_channel, f"{closed_port_url}/o{index}"))
    theirs = (await other.stub.ListSessions(pb.ListSessionsRequest(page_size=1))).next_page_token
    ours = (await relay.stub.ListSessions(pb.ListSessionsRequest(page_size=1))).next_page_token
    description = "not a page token of this relay: list from the start"
    code = grpc.StatusCode.INVALID_ARGUMENT
    for token in (theirs, "not base64!", ours[:-2] + "zz", "A" * 5000):
        listing = relay.stub.ListSessions(pb.ListSessionsRequest(page_token=token))
        assert await rpc_error(listing, code, f"page_token: {description}") == [("page_token", description)]
    negative = relay.stub.ListSessions(pb.ListSessionsRequest(page_size=-1))
    got = await rpc_error(negative, code, "page_size: must not be negative, got -1")
    assert got == [("page_size", "must not be negative, got -1")]


async def test_ended_sessions_are_kept_within_a_byte_budget(
    make_relay: MakeRelay, idle_channel: str, closed_port_url: str
) -> None:
    # Room for three ended sessions with a megabyte of prompts each, and a count that never binds.
    relay = await make_relay(keep_ended=64, keep_ended_bytes=3 * MIB + MIB // 2)
    prompts = [struct(bulky(MIB - 100))]
    for index in range(6):
        session_id = f"s{index}"
        await relay.stub.StartSession(
            start_request(session_id, idle_channel, closed_port_url, prompts=prompts)
        )
        await relay.stub.StopSession(pb.StopSessionRequest(session_id=session_id))
    first = await relay.stub.ListSessions(pb.ListSessionsRequest())
    rest = await relay.stub.ListSessions(pb.ListSessionsRequest(page_token=first.next_page_token))
    assert not rest.next_page_token
    listed = [s.session_id for page in (first, rest) for s in page.sessions]
    assert listed == ["s3", "s4", "s5"]  # the oldest forgotten first
    gone = relay.stub.GetSession(pb.GetSessionRequest(session_id="s2"))
    await rpc_error(gone, grpc.StatusCode.NOT_FOUND, "no session 's2'")
