"""The allow-list holds end to end: sessions started through the gRPC API of a relay with
`allowed_hosts` follow no redirect on any of their URLs and connect to no ICE candidate outside
the list. The redirect target is a real server on a host outside the list that records every
request; it must get none, and what it would answer never shows in a session's reason.
"""

from __future__ import annotations

from collections.abc import Callable

from aioice.ice import get_host_addresses

from relay_server.api.relay.v1 import relay_service_pb2 as pb
from relay_server.processor import ProcessorServer
from tests.redirecting import FORBIDDEN_BODY, redirect_pair
from tests.service.conftest import LiveSource, MakeRelay, Relay, Watcher

MakeWatcher = Callable[..., Watcher]

FAILED = pb.SESSION_STATE_FAILED
# 127.0.0.1 for the trickle server and the processor's HTTP; the processor's ICE candidates are
# on the addresses aiortc gathers on, never loopback.
WITH_CANDIDATES = frozenset({"127.0.0.1", *get_host_addresses(use_ipv4=True, use_ipv6=True)})


def refusal(method: str, url: str, target: str) -> str:
    return f"{method} {url} answered 307 (a redirect to {target}); redirects are not followed"


async def failure(relay: Relay, make_watcher: MakeWatcher, request: pb.StartSessionRequest) -> str:
    """Start the session, wait for it to fail, let it finish its run (StopSession waits for that)
    and return its reason."""
    await relay.stub.StartSession(request)
    watcher = make_watcher(relay.stub, request.session_id)
    index = await watcher.until(lambda session: session.state == FAILED)
    await relay.stub.StopSession(pb.StopSessionRequest(session_id=request.session_id))
    reason = watcher.sessions[index].reason
    assert FORBIDDEN_BODY not in reason
    return reason


async def test_an_input_url_that_redirects_fails_the_session(
    make_relay: MakeRelay, make_watcher: MakeWatcher, processor: ProcessorServer
) -> None:
    relay = await make_relay(allowed_hosts=WITH_CANDIDATES)
    async with redirect_pair() as (redirector, recorder):
        request = pb.StartSessionRequest(
            session_id="input",
            subscribe_url=f"{redirector.url}/in",
            publish_url=f"{redirector.url}/pub",
            processor_url=processor.url,
            control_url=f"{redirector.url}/ctl",
            events_url=f"{redirector.url}/ev",
        )
        reason = await failure(relay, make_watcher, request)
        assert reason == "RedirectRefused: " + refusal(
            "GET", f"{redirector.url}/in/-2", f"{recorder.url}/in/-2"
        )
        assert recorder.requests == []
        seen = set(redirector.requests)
        assert {("GET", "/in/-2"), ("POST", "/ev/0"), ("DELETE", "/pub")} <= seen, seen


async def test_output_control_and_events_urls_that_redirect_reach_nothing(
    make_relay: MakeRelay, make_watcher: MakeWatcher, processor: ProcessorServer, live_source: LiveSource
) -> None:
    relay = await make_relay(allowed_hosts=WITH_CANDIDATES)
    async with redirect_pair() as (redirector, recorder):
        request = pb.StartSessionRequest(
            session_id="output",
            subscribe_url=live_source.url,
            publish_url=f"{redirector.url}/pub",
            processor_url=processor.url,
            control_url=f"{redirector.url}/ctl",
            events_url=f"{redirector.url}/ev",
        )
        reason = await failure(relay, make_watcher, request)
        assert reason == "RedirectRefused: " + refusal(
            "POST", f"{redirector.url}/pub/0", f"{recorder.url}/pub/0"
        )
        assert recorder.requests == []
        seen = set(redirector.requests)
        assert {("GET", "/ctl/-1"), ("POST", "/ev/0"), ("POST", "/pub/0"), ("DELETE", "/pub")} <= seen, seen


async def test_a_processor_url_that_redirects_fails_the_session(
    make_relay: MakeRelay, make_watcher: MakeWatcher, trickle_server: object, live_source: LiveSource
) -> None:
    relay = await make_relay(allowed_hosts=WITH_CANDIDATES)
    async with redirect_pair() as (redirector, recorder):
        request = pb.StartSessionRequest(
            session_id="processor",
            subscribe_url=live_source.url,
            publish_url=live_source.url + "-out",
            processor_url=redirector.url,
        )
        reason = await failure(relay, make_watcher, request)
        assert reason == "LinkError: " + refusal("POST", f"{redirector.url}/offer", f"{recorder.url}/offer")
        assert recorder.requests == []
        assert redirector.requests == [("POST", "/offer")]


async def test_a_processor_on_this_machine_is_reached_with_only_loopback_allowed(
    make_relay: MakeRelay, make_watcher: MakeWatcher, processor: ProcessorServer, live_source: LiveSource
) -> None:
    """Its candidates are this machine's own addresses (never loopback): allowed with loopback."""
    relay = await make_relay(allowed_hosts=frozenset({"127.0.0.1"}))
    request = pb.StartSessionRequest(
        session_id="candidates",
        subscribe_url=live_source.url,
        publish_url=live_source.url + "-out",
        processor_url=processor.url,
    )
    await relay.stub.StartSession(request)
    watcher = make_watcher(relay.stub, request.session_id)
    index = await watcher.until(lambda session: session.state in (pb.SESSION_STATE_RUNNING, FAILED))
    assert watcher.sessions[index].state == pb.SESSION_STATE_RUNNING, watcher.sessions[index].reason
    await relay.stub.StopSession(pb.StopSessionRequest(session_id=request.session_id))
