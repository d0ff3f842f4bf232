"""The offer to the processor: no redirect followed, ICE candidates kept to the allow-list, and an
offer in flight when the link stops let finish, its connection closed the way the processor sees.

The processor is the embedded one; what sits between it and the link is a real aiohttp server of
the test's (a redirect, a forged candidate, an answer held back), never a mock of the link.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aioice.ice import get_host_addresses

from relay_server.processor import ProcessorServer
from relay_server.processor.peer import Peer
from relay_server.webrtc import LinkError, LinkSettings
from tests.redirecting import FORBIDDEN_BODY, FORBIDDEN_HOST, redirect_pair
from tests.webrtc.conftest import MakeProcessor, MakeRig
from tests.webrtc.support import Rig, solid

GREY = solid(128)
# The addresses aiortc gathers its host candidates on (the processor's among them): loopback is
# never one of them.
HOST_ADDRESSES = frozenset(get_host_addresses(use_ipv4=True, use_ipv6=True))


@dataclass
class OfferProxy:
    """POST /offer passed on to `processor`; `edit` may change the answer's SDP on the way back,
    and with `hold` set the answer waits for `release`. Every peer the offers made is in `peers`,
    with the connection states it went through."""

    processor: ProcessorServer
    edit: Callable[[str], str] = lambda sdp: sdp
    hold: bool = False
    url: str = ""
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    peers: list[tuple[Peer, list[str]]] = field(default_factory=list)
    client_waiting: list[bool] = field(default_factory=list)  # at each answer: was the link still there?

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.arrived.set()
        if self.hold:
            await self.release.wait()
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"{self.processor.url}/offer", data=body) as response,
        ):
            answer = await response.json()
        peer = self.processor.peers[-1]
        states: list[str] = []
        peer.pc.on("connectionstatechange", lambda: states.append(peer.pc.connectionState))
        self.peers.append((peer, states))
        transport = request.transport
        self.client_waiting.append(transport is not None and not transport.is_closing())
        answer["sdp"] = self.edit(answer["sdp"])
        return web.json_response(answer)


MakeProxy = Callable[..., Awaitable[OfferProxy]]


@pytest.fixture
async def make_proxy() -> AsyncIterator[MakeProxy]:
    runners: list[web.AppRunner] = []

    async def make(processor: ProcessorServer, **options: Any) -> OfferProxy:
        proxy = OfferProxy(processor, **options)
        app = web.Application()
        app.router.add_post("/offer", proxy.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        runners.append(runner)
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        proxy.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        return proxy

    yield make
    for runner in runners:
        await runner.cleanup()


class Datagrams(asyncio.DatagramProtocol):
    """A UDP port that counts what it receives: where a forged ICE candidate points."""

    def __init__(self) -> None:
        self.received = 0
        self.transport: asyncio.DatagramTransport | None = None
        self.port = 0

    @classmethod
    async def open(cls, host: str) -> Datagrams:
        protocol = cls()
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: protocol, local_addr=(host, 0))
        protocol.transport = transport
        protocol.port = transport.get_extra_info("sockname")[1]
        return protocol

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        self.received += 1

    def close(self) -> None:
        assert self.transport is not None
        self.transport.close()


def with_forged_candidate(target: Datagrams) -> Callable[[str], str]:
    """An answer edit adding a host candidate at `target`, of the highest priority, so that ICE
    tries it first."""

    def edit(sdp: str) -> str:
        forged = f"a=candidate:forged 1 udp 2130706431 {FORBIDDEN_HOST} {target.port} typ host\r\n"
        head, marker, tail = sdp.partition("a=candidate:")
        assert marker, "the answer carries candidates"
        return head + forged + marker + tail

    return edit


async def ended(rig: Rig) -> BaseException | None:
    await rig.until(lambda: rig.task is not None and rig.task.done(), 20, "run() ended")
    assert rig.task is not None
    return rig.task.exception()


async def test_an_offer_answered_with_a_redirect_fails_the_link(make_rig: MakeRig) -> None:
    async with redirect_pair() as (redirector, recorder):
        rig = make_rig(redirector.url, image=GREY)
        error = await ended(rig)
        assert isinstance(error, LinkError)
        assert str(error) == (
            f"POST {redirector.url}/offer answered 307 (a redirect to {recorder.url}/offer);"
            " redirects are not followed"
        )
        assert FORBIDDEN_BODY not in rig.link.reason
        assert redirector.requests == [("POST", "/offer")]  # not tried again
        assert recorder.requests == []


async def test_candidates_outside_the_allow_list_are_never_tried(
    make_processor: MakeProcessor,
    make_proxy: MakeProxy,
    make_rig: MakeRig,
) -> None:
    processor = await make_processor()
    unlisted, listed = await Datagrams.open(FORBIDDEN_HOST), await Datagrams.open(FORBIDDEN_HOST)
    try:
        # Without an allow-list the forged candidate is tried, first: it is reachable.
        proxy = await make_proxy(processor, edit=with_forged_candidate(unlisted))
        rig = make_rig(proxy.url, image=GREY)
        await rig.returned(1)
        assert unlisted.received > 0
        await rig.close()

        proxy = await make_proxy(processor, edit=with_forged_candidate(listed))
        # Loopback allowed: this machine's own addresses are too (the processor's candidates).
        allowed = frozenset({"127.0.0.1"})
        rig = make_rig(proxy.url, image=GREY, settings=LinkSettings(allowed_hosts=allowed))
        await rig.returned(1)
        assert listed.received == 0
    finally:
        unlisted.close()
        listed.close()


async def test_an_answer_with_no_allowed_candidate_fails_the_link(
    make_processor: MakeProcessor, make_rig: MakeRig
) -> None:
    processor = await make_processor()
    elsewhere = frozenset({"198.51.100.7"})  # a host that is not this machine
    rig = make_rig(processor.url, image=GREY, settings=LinkSettings(allowed_hosts=elsewhere))
    error = await ended(rig)
    assert isinstance(error, LinkError)
    message = str(error)
    assert message.startswith(
        f"POST {processor.url}/offer: none of the answer's ICE candidates is on an allowed host"
    )
    assert all(address in message for address in HOST_ADDRESSES)
    assert message.endswith("allowed: 198.51.100.7)")
    assert rig.returns == []


async def test_an_offer_in_flight_at_stop_is_let_finish_and_its_connection_closed(
    make_processor: MakeProcessor,
    make_proxy: MakeProxy,
    make_rig: MakeRig,
) -> None:
    processor = await make_processor()
    proxy = await make_proxy(processor, hold=True)
    rig = make_rig(proxy.url, image=GREY)
    async with asyncio.timeout(20):
        await proxy.arrived.wait()
    await rig.link.stop()
    proxy.release.set()
    assert await ended(rig) is None
    assert proxy.client_waiting == [True]  # the answer went back to a link still waiting for it
    ((peer, states),) = proxy.peers
    # The processor learns of the close from the connection itself (DTLS close_notify), not by
    # its ICE giving up a minute later; the guard only keeps a failure from hanging.
    async with asyncio.timeout(10):
        await peer.closed.wait()
    assert "connected" in states and states[-1] == "closed", states
    assert processor.peers == []
