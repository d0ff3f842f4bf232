"""Signaling with a ComfyStream-compatible processor: one POST {url}/offer, no trickle ICE.

The offer carries every ICE candidate (aiortc gathers them all in setLocalDescription), the
session's prompts and its resolution; the answer carries the processor's. With prompts the
processor warms its pipeline up inside the request, so the timeout is generous and configurable.
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp
from aiortc import RTCPeerConnection, RTCSessionDescription


class ProcessorError(ConnectionError):
    """The processor could not be reached, or its answer was not an SDP answer: worth a retry."""


class OfferRejected(ProcessorError):
    """The processor refused the offer (ComfyStream answers any failure, an invalid prompt for
    one, with a plain-text 500); `message` is what it said."""

    def __init__(self, url: str, status: int, message: str) -> None:
        super().__init__(f"POST {url}: the processor answered {status}: {message or '(no reason given)'}")
        self.status = status
        self.message = message


async def negotiate(
    pc: RTCPeerConnection,
    http: aiohttp.ClientSession,
    url: str,
    *,
    prompts: list[dict[str, Any]] | None,
    width: int,
    height: int,
    within: float,
) -> None:
    """Offer `pc` to the processor at `url` (its base URL) and apply the answer, waiting at most `within`
    seconds for it."""
    await pc.setLocalDescription(await pc.createOffer())
    body: dict[str, Any] = {
        "offer": {"sdp": pc.localDescription.sdp, "type": pc.localDescription.type},
        "resolution": {"width": width, "height": height},
    }
    if prompts:
        body["prompts"] = prompts  # none: the processor runs in passthrough mode
    endpoint = f"{url.rstrip('/')}/offer"
    try:
        async with http.post(endpoint, json=body, timeout=aiohttp.ClientTimeout(total=within)) as response:
            text = await response.text()
            status = response.status
    except TimeoutError as error:
        raise ProcessorError(f"POST {endpoint}: no answer within {within:g} s") from error
    except aiohttp.ClientError as error:
        raise ProcessorError(f"POST {endpoint}: {error or type(error).__name__}") from error
    if status != 200:
        raise OfferRejected(endpoint, status, text.strip()[:1000])
    try:
        answer = json.loads(text)
        description = RTCSessionDescription(sdp=answer["sdp"], type=answer["type"])
    except (ValueError, TypeError, KeyError) as error:
        raise ProcessorError(f"POST {endpoint}: the answer is not an SDP answer: {text[:200]!r}") from error
    await pc.setRemoteDescription(description)
