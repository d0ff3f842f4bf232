"""ProcessorServer: the aiohttp app that speaks ComfyStream's signaling contract.

Routes (each also under /live): POST /offer, POST /prompt, GET /health, GET /streams/stats.
A request that cannot be read answers a plain-text 400 (not JSON, not the expected shape, an
offer whose SDP cannot be parsed) or 413 (a body over MAX_BODY bytes); a readable request that
cannot be served (an invalid prompt, an offer without H.264) a plain-text 500 with the reason,
as ComfyStream does.

One pipeline per server: an offer with prompts replaces the running prompts for every peer that
brought prompts; an offer without prompts gets a noop (passthrough) peer and leaves them alone.
"""

from __future__ import annotations

import asyncio
import json
import logging
from types import TracebackType
from typing import Any

from aiohttp import web
from aiortc.sdp import SessionDescription

from relay_server.processor.peer import Peer
from relay_server.processor.pipeline import Knobs, Pipeline
from relay_server.serving import bind, until_signalled

log = logging.getLogger(__name__)

# Bytes of a request body at most: aiohttp's default, as ComfyStream runs it, and many times the
# size of an offer with a workflow.
MAX_BODY = 1024 * 1024


class BadRequest(ValueError):
    """The request cannot be read: the client's fault, answered with 400."""


async def _json_body(request: web.Request) -> Any:
    """The body as JSON; BadRequest if it is not, HTTPRequestEntityTooLarge over MAX_BODY."""
    data = await request.read()
    try:
        return json.loads(data)
    except ValueError as error:
        raise BadRequest(f"the body is not JSON: {error}") from None


def _read_offer(body: Any) -> tuple[str, str]:
    """The offer's SDP and type."""
    if not isinstance(body, dict) or not isinstance(body.get("offer"), dict):
        raise BadRequest('the body must be {"offer": {"sdp", "type"}, ...}')
    offer = body["offer"]
    sdp, kind = offer.get("sdp"), offer.get("type")
    if not isinstance(sdp, str) or kind != "offer":
        raise BadRequest('"offer" needs an "sdp" string and "type": "offer"')
    return sdp, kind


def _parsed_sdp(sdp: str) -> SessionDescription:
    """`sdp` parsed; BadRequest unless it is a description with media."""
    # aiortc's parser takes anything, garbage included, as an SDP without media.
    try:
        description = SessionDescription.parse(sdp) if sdp.startswith("v=") else None
    except Exception as error:  # aiortc raises assorted errors on bad SDP
        raise BadRequest(f"the offer's SDP could not be parsed: {error}") from None
    if description is None or not description.media:
        raise BadRequest("the offer's SDP could not be parsed: no v= line or no media section (m=)")
    return description


def _too_large() -> web.Response:
    return web.Response(
        status=413, text=f"the body is larger than {MAX_BODY} bytes, the most this processor takes"
    )


def _resolution(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise BadRequest(f"resolution must be an object with width and height, got {value!r}")
    width, height = value.get("width"), value.get("height")
    if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
        raise BadRequest(f"resolution needs positive integer width and height, got {value!r}")
    return width, height


class ProcessorServer:
    """`start()` binds (port 0 picks a free one); `stop()` closes every peer connection, then the app."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, knobs: Knobs | None = None) -> None:
        self.host = host
        self.port = port
        self.url = ""
        self.pipeline = Pipeline(knobs)
        self.peers: list[Peer] = []
        self._runner: web.AppRunner | None = None
        # ComfyStream applies prompts one offer at a time; so do we (the pipeline is shared).
        self._prompts_lock = asyncio.Lock()

    async def start(self) -> None:
        app = web.Application(client_max_size=MAX_BODY)
        for prefix in ("", "/live"):
            app.router.add_post(f"{prefix}/offer", self._offer)
            app.router.add_post(f"{prefix}/prompt", self._prompt)
            app.router.add_get(f"{prefix}/health", self._health)
            app.router.add_get(f"{prefix}/streams/stats", self._stats)
        self._runner, self.port, self.url = await bind(app, self.host, self.port)

    async def stop(self) -> None:
        if self._runner is None:
            return
        runner, self._runner = self._runner, None
        await asyncio.gather(*(peer.close() for peer in list(self.peers)))
        await runner.cleanup()

    async def __aenter__(self) -> ProcessorServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def stats(self) -> dict[str, Any]:
        return {track_id: stats for peer in self.peers for track_id, stats in peer.stats().items()}

    async def _offer(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await _json_body(request)
            sdp, kind = _read_offer(body)
            resolution = _resolution(body.get("resolution"))
            offered = _parsed_sdp(sdp)
            prompts = body.get("prompts")
        except web.HTTPRequestEntityTooLarge:
            return _too_large()
        except BadRequest as error:
            log.warning("offer refused: %s", error)
            return web.Response(status=400, text=str(error))
        peer: Peer | None = None
        try:
            if prompts:
                async with self._prompts_lock:
                    await self.pipeline.set_prompts(prompts, resolution)
            elif resolution is not None:
                self.pipeline.resolution = resolution
            peer = Peer(self.pipeline, with_prompts=bool(prompts), on_closed=self._forget)
            self.peers.append(peer)
            answer = await peer.answer(sdp, kind, offered)
        except ValueError as error:
            # PromptError, OfferError: the request's fault, said as it is.
            log.warning("offer refused: %s", error)
            if peer is not None:
                await peer.close()
            return web.Response(status=500, text=str(error))
        except Exception as error:
            log.exception("offer failed")
            if peer is not None:
                await peer.close()
            return web.Response(status=500, text=f"offer failed: {error}")
        return web.json_response({"sdp": answer.sdp, "type": answer.type})

    async def _prompt(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await _json_body(request)
        except web.HTTPRequestEntityTooLarge:
            return _too_large()
        except BadRequest as error:
            return web.Response(status=400, text=str(error))
        try:
            async with self._prompts_lock:
                await self.pipeline.set_prompts(body)
        except ValueError as error:
            return web.Response(status=500, text=str(error))
        return web.Response(text="OK")

    async def _health(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text="OK")

    async def _stats(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.stats())

    def _forget(self, peer: Peer) -> None:
        if peer in self.peers:
            self.peers.remove(peer)


async def serve_forever(host: str, port: int, knobs: Knobs) -> None:
    """Run a ProcessorServer until SIGINT or SIGTERM, then close its peer connections and stop."""
    async with ProcessorServer(host, port, knobs=knobs) as server:
        log.info("processor listening on %s (%s)", server.url, knobs)
        await until_signalled()
        log.info("processor stopping")
