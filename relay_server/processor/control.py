"""ComfyStream's `control` data channel protocol: one JSON request, at most one reply.

Requests are handled one at a time in arrival order (an update may have to wait for the pipeline),
by a task that the owning peer starts and stops. Unknown types and invalid JSON get no reply at all,
as with ComfyStream.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from aiortc import RTCDataChannel

from relay_server.processor.effects import PromptError
from relay_server.processor.pipeline import Pipeline

log = logging.getLogger(__name__)

_SIMPLE = {
    "pause_prompts": "prompts_paused",
    "resume_prompts": "prompts_resumed",
    "stop_prompts": "prompts_stopped",
}


async def handle(pipeline: Pipeline, message: Any) -> dict[str, Any] | None:
    """The reply to one control message (str or bytes), or None when there is none."""
    try:
        request = json.loads(message)
    except (TypeError, ValueError):
        return None
    if not isinstance(request, dict):
        return None
    kind = request.get("type")
    if kind == "update_prompts":
        try:
            await pipeline.update_prompts(request.get("prompts"))
        except PromptError as error:
            return {"type": "prompts_updated", "success": False, "error": str(error)}
        return {"type": "prompts_updated", "success": True}
    if kind == "update_resolution":
        width, height = request.get("width"), request.get("height")
        if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
            return {"type": "resolution_updated", "success": False, "error": "width and height required"}
        pipeline.resolution = (width, height)  # recorded only: like ComfyStream, nothing is resized
        return {"type": "resolution_updated", "success": True}
    if kind == "get_nodes":
        return {"type": "nodes_info", "nodes": pipeline.nodes_info()}
    if kind == "pause_prompts":
        pipeline.paused = True
    elif kind == "resume_prompts":
        pipeline.paused = False
    elif kind == "stop_prompts":
        pipeline.stop_prompts()
    if isinstance(kind, str) and kind in _SIMPLE:
        return {"type": _SIMPLE[kind], "success": True}
    return None


# Control messages waiting for a (possibly slow: prompt warm-up) handler. A peer flooding the
# channel beyond this loses its oldest requests, counted in `dropped`.
INBOX_MESSAGES = 64


class ControlChannel:
    """Serves one `control` channel until close(); messages queue in arrival order."""

    def __init__(self, channel: RTCDataChannel, pipeline: Pipeline) -> None:
        self.channel = channel
        self.pipeline = pipeline
        self.dropped = 0
        self._inbox: asyncio.Queue[Any] = asyncio.Queue(INBOX_MESSAGES)
        channel.on("message", self._receive)
        self._task = asyncio.create_task(self._serve(), name=f"processor-control-{channel.id}")

    def _receive(self, message: Any) -> None:
        if self._inbox.full():
            self._inbox.get_nowait()
            self.dropped += 1
        self._inbox.put_nowait(message)

    async def _serve(self) -> None:
        while True:
            message = await self._inbox.get()
            try:
                reply = await handle(self.pipeline, message)
            except Exception:
                # One bad request must not end the channel's service; say what it was.
                log.exception("control message %.200r failed", message)
                continue
            if reply is not None and self.channel.readyState == "open":
                self.channel.send(json.dumps(reply))

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
