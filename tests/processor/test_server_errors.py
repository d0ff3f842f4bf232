"""Requests the embedded processor cannot read: 400 for what is not JSON or not an SDP, 413 for a
body over its limit, each with a plain-text reason, and no peer connection left behind."""

from __future__ import annotations

import json

import aiohttp
import pytest

from relay_server.processor import ProcessorServer
from relay_server.processor.server import MAX_BODY


async def post(url: str, data: bytes) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(url, data=data, headers={"Content-Type": "application/json"}) as response,
    ):
        return response.status, await response.text()


def offer(sdp: str) -> bytes:
    return json.dumps({"offer": {"sdp": sdp, "type": "offer"}}).encode()


@pytest.mark.parametrize("route", ["/offer", "/prompt", "/live/offer"])
async def test_a_body_that_is_not_json_is_400(processor: ProcessorServer, route: str) -> None:
    status, text = await post(processor.url + route, b"{not json")
    assert status == 400
    assert text.startswith("the body is not JSON: ")


@pytest.mark.parametrize("route", ["/offer", "/prompt"])
async def test_a_body_over_the_limit_is_413(processor: ProcessorServer, route: str) -> None:
    status, text = await post(processor.url + route, b" " * (MAX_BODY + 1))
    assert status == 413
    assert text == f"the body is larger than {MAX_BODY} bytes, the most this processor takes"
    # At the limit the body is read (and refused for what it is, not for its size).
    status, _ = await post(processor.url + route, b" " * MAX_BODY)
    assert status == 400


@pytest.mark.parametrize("sdp", ["garbage", "v=0\r\n", "", "m=video 9 UDP/TLS/RTP/SAVPF 96\r\n"])
async def test_an_sdp_that_cannot_be_parsed_is_400(processor: ProcessorServer, sdp: str) -> None:
    status, text = await post(f"{processor.url}/offer", offer(sdp))
    assert status == 400
    assert text.startswith("the offer's SDP could not be parsed")
    assert processor.peers == []
