"""ProcessorServer: the aiohttp app that speaks ComfyStream's signaling contract.

Routes (each also under /live): POST /offer, POST /prompt, GET /health, GET /streams/stats.
Failures answer a plain-text 500 with the reason, as ComfyStream does.

One pipeline per server: an offer with prompts replaces the running prompts for every peer that
brought prompts; an offer without prompts gets a noop (passthrough) peer and leaves them alone.
"""

from __future__ import annotations

import asyncio
import logging
from types import TracebackType
from typing import Any

from aiohttp import web

from relay_server.processor.peer import Peer
from relay_server.processor.pipeline import Knobs, Pipeline
from relay_server.serving import bind, until_signalled

log = logging.getLogger(__name__)


def _resolution(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"resolution must be an object with width and height, got {value!r}")
    width, height = value.get("width"), value.get("height")
    if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
        raise ValueError(f"resolution needs positive integer width and height, got {value!r}")
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
        app = web.Application()
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
        peer: Peer | None = None
        try:
            body = await request.json()
            if not isinstance(body, dict) or not isinstance(body.get("offer"), dict):
                raise ValueError('the body must be {"offer": {"sdp", "type"}, ...}')
            offer = body["offer"]
            sdp, kind = offer.get("sdp"), offer.get("type")
            if not isinstance(sdp, str) or kind != "offer":
                raise ValueError('"offer" needs an "sdp" string and "type": "offer"')
            prompts = body.get("prompts")
            resolution = _resolution(body.get("resolution"))
            if prompts:
                async with self._prompts_lock:
                    await self.pipeline.set_prompts(prompts, resolution)
            elif resolution is not None:
                self.pipeline.resolution = resolution
            peer = Peer(self.pipeline, with_prompts=bool(prompts), on_closed=self._forget)
            self.peers.append(peer)
            answer = await peer.answer(sdp, kind)
        except ValueError as error:
            # PromptError, OfferError, JSON errors: the request's fault, said as it is.
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
            body = await request.json()
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
