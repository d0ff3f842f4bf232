"""The offer the relay posts: what it asks the processor to negotiate."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection

from relay_server.webrtc.signaling import OfferRejected, negotiate
from tests.processor.client import PatternTrack


async def test_the_offer_leaves_out_bandwidth_estimation_and_keeps_the_rest() -> None:
    """No abs-send-time header extension (aiortc estimates bandwidth with it, on both sides);
    the media section, its other extension (mid) and REMB feedback stay."""
    offers: list[dict[str, Any]] = []

    async def offer(request: web.Request) -> web.Response:
        offers.append(await request.json())
        return web.Response(status=500, text="seen")

    app = web.Application()
    app.router.add_post("/offer", offer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        pc.addTransceiver(PatternTrack(), direction="sendrecv")
        async with aiohttp.ClientSession() as http:
            with pytest.raises(OfferRejected, match="seen"):
                await negotiate(
                    pc, http, f"http://127.0.0.1:{port}", prompts=None, width=64, height=64, within=10
                )
    finally:
        await pc.close()
        await runner.cleanup()
    local = pc.localDescription.sdp
    sent = offers[0]["offer"]["sdp"]
    assert "abs-send-time" in local  # what aiortc offers by itself
    assert "abs-send-time" not in sent
    assert sent == "".join(line for line in local.splitlines(keepends=True) if "abs-send-time" not in line)
    assert "urn:ietf:params:rtp-hdrext:sdes:mid" in sent and "goog-remb" in sent
