"""Signaling with a ComfyStream-compatible processor: one POST {url}/offer, no trickle ICE.

The offer carries every ICE candidate (aiortc gathers them all in setLocalDescription), the
session's prompts and its resolution; the answer carries the processor's. With prompts the
processor warms its pipeline up inside the request, so the timeout is generous and configurable.
The POST follows no redirect (relay_server.redirects): a 3xx is AnswerRefused, and so is an
answer none of whose ICE candidates is on an allowed host, when there is an allow-list (the
others are removed before the answer is applied: candidates.py).

Unless asked to keep it, the offer leaves out the abs-send-time RTP header extension, which
aiortc's bandwidth estimation needs, so that no estimate runs on either side: the send leg's
bitrate is the relay's own, and the processor is asked for one (RTCP REMB,
jitter.bitrate_request). ComfyStream pins its encoder to 2 Mbit/s whatever it is told; an aiortc
processor that follows the estimate re-creates its encoder, with a keyframe, each time the
estimate moves by 10 % (an output segment cut short each time, when the relay remuxes), and the
estimate costs both sides CPU for every packet (~11 µs a packet, measured on the relay).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Any

import aiohttp
from aiortc import RTCPeerConnection, RTCSessionDescription

from relay_server import redirects
from relay_server.webrtc.candidates import Allowed, keep_allowed

log = logging.getLogger(__name__)

# The header extension's line in an SDP media section, whatever its id.
ABS_SEND_TIME = re.compile(
    r"^a=extmap:\d+ http://www\.webrtc\.org/experiments/rtp-hdrext/abs-send-time\r?\n", re.M
)


class ProcessorError(ConnectionError):
    """The processor could not be reached, or its answer was not an SDP answer: worth a retry."""


class OfferRejected(ProcessorError):
    """The processor refused the offer (ComfyStream answers any failure, an invalid prompt for
    one, with a plain-text 500); `message` is what it said."""

    def __init__(self, url: str, status: int, message: str) -> None:
        super().__init__(f"POST {url}: the processor answered {status}: {message or '(no reason given)'}")
        self.status = status
        self.message = message


class AnswerRefused(ProcessorError):
    """The relay will not take the processor's answer, and asking again cannot change that: the
    offer was answered with a redirect (never followed: relay_server.redirects), or none of the
    answer's ICE candidates is on an allowed host (candidates.py)."""


async def negotiate(
    pc: RTCPeerConnection,
    http: aiohttp.ClientSession,
    url: str,
    *,
    prompts: list[dict[str, Any]] | None,
    width: int,
    height: int,
    within: float,
    estimate_bandwidth: bool = False,
    allowed_hosts: frozenset[str] = frozenset(),
) -> None:
    """Offer `pc` to the processor at `url` (its base URL) and apply the answer, waiting at most `within`
    seconds for it; with `estimate_bandwidth`, the offer is aiortc's as it is. With `allowed_hosts`,
    the answer's ICE candidates outside them are removed first (candidates.py)."""
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp if estimate_bandwidth else ABS_SEND_TIME.sub("", pc.localDescription.sdp)
    body: dict[str, Any] = {
        "offer": {"sdp": sdp, "type": pc.localDescription.type},
        "resolution": {"width": width, "height": height},
    }
    if prompts:
        body["prompts"] = prompts  # none: the processor runs in passthrough mode
    endpoint = f"{url.rstrip('/')}/offer"
    try:
        async with http.post(
            endpoint, json=body, timeout=aiohttp.ClientTimeout(total=within), allow_redirects=False
        ) as response:
            refused = redirects.refusal(endpoint, response)
            # A redirect's body is not read: it is no answer from the processor.
            text = "" if refused is not None else await response.text()
            status = response.status
    except TimeoutError as error:
        raise ProcessorError(f"POST {endpoint}: no answer within {within:g} s") from error
    except aiohttp.ClientError as error:
        raise ProcessorError(f"POST {endpoint}: {error or type(error).__name__}") from error
    if refused is not None:
        raise AnswerRefused(f"POST {refused}")
    if status != 200:
        raise OfferRejected(endpoint, status, text.strip()[:1000])
    try:
        answer = json.loads(text)
        description = RTCSessionDescription(sdp=answer["sdp"], type=answer["type"])
    except (ValueError, TypeError, KeyError) as error:
        raise ProcessorError(f"POST {endpoint}: the answer is not an SDP answer: {text[:200]!r}") from error
    if allowed_hosts:
        description = await _allowed_candidates(description, allowed_hosts, endpoint, within)
    await pc.setRemoteDescription(description)


async def _allowed_candidates(
    answer: RTCSessionDescription, hosts: frozenset[str], endpoint: str, within: float
) -> RTCSessionDescription:
    try:
        async with asyncio.timeout(within):
            allowed = await Allowed.resolve(hosts)
    except TimeoutError as error:
        raise ProcessorError(
            f"POST {endpoint}: the allowed hosts did not resolve within {within:g} s"
        ) from error
    sdp, removed, left = keep_allowed(answer.sdp, allowed)
    if not left:
        offered = ", ".join(sorted(set(removed))) or "none"
        raise AnswerRefused(
            f"POST {endpoint}: none of the answer's ICE candidates is on an allowed host"
            f" (its addresses: {offered}; allowed: {', '.join(sorted(hosts))})"
        )
    if removed:
        log.info("answer from %s: ICE candidates outside the allow-list removed: %s", endpoint, removed)
    return RTCSessionDescription(sdp=sdp, type=answer.type)
