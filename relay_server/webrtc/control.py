"""The client side of ComfyStream's `control` data channel: a request, then its reply.

Replies carry no request id, only a type that follows from the request's (`update_prompts` →
`prompts_updated`, ...), so requests go one at a time: the next is sent once the previous one's
reply came or its wait timed out. A reply that comes after its timeout is counted and ignored.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiortc import RTCDataChannel

REPLY_TYPES = {
    "update_prompts": "prompts_updated",
    "update_resolution": "resolution_updated",
    "get_nodes": "nodes_info",
    "pause_prompts": "prompts_paused",
    "resume_prompts": "prompts_resumed",
    "stop_prompts": "prompts_stopped",
}


class ControlError(RuntimeError):
    """A control request got no reply (the processor is not connected, or it did not answer)."""


class ControlRejected(ControlError):
    """The processor replied with success false; `reply` is what it said."""

    def __init__(self, reply: dict[str, Any]) -> None:
        reason = reply.get("error", "no reason given")
        super().__init__(f"the processor refused {reply.get('type')}: {reason}")
        self.reply = reply


class ControlClient:
    """Requests on one open-or-opening `control` channel."""

    def __init__(self, channel: RTCDataChannel) -> None:
        self.channel = channel
        self.stray = 0  # replies nobody was waiting for (late, or unsolicited)
        self._opened = asyncio.Event()
        self._lock = asyncio.Lock()
        self._waiting: tuple[str, asyncio.Future[dict[str, Any]]] | None = None
        if channel.readyState == "open":
            self._opened.set()
        channel.on("open", self._opened.set)
        channel.on("message", self._receive)
        channel.on("close", self._closed)

    async def request(self, message: dict[str, Any], within: float) -> dict[str, Any]:
        """Send `message` and return the processor's reply; ControlRejected if it says it failed,
        ControlError if there is no reply within `within` seconds (of waiting for the channel,
        for earlier requests and for this one's reply)."""
        kind = message.get("type")
        expected = REPLY_TYPES.get(kind) if isinstance(kind, str) else None
        if expected is None:
            raise ValueError(f"unknown control request type {kind!r}; known: {sorted(REPLY_TYPES)}")
        try:
            async with asyncio.timeout(within):
                async with self._lock:
                    await self._opened.wait()
                    if self.channel.readyState != "open":
                        raise ControlError("the control channel is closed")
                    reply: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
                    self._waiting = (expected, reply)
                    try:
                        self.channel.send(json.dumps(message))
                        answer = await reply
                    finally:
                        self._waiting = None
        except TimeoutError as error:
            raise ControlError(f"no {expected} reply from the processor within {within:g} s") from error
        if answer.get("success") is False:
            raise ControlRejected(answer)
        return answer

    def _receive(self, message: Any) -> None:
        try:
            reply = json.loads(message)
        except (TypeError, ValueError):
            self.stray += 1
            return
        waiting = self._waiting
        if waiting is None or not isinstance(reply, dict) or reply.get("type") != waiting[0]:
            self.stray += 1
            return
        if not waiting[1].done():
            waiting[1].set_result(reply)

    def _closed(self) -> None:
        self._opened.set()  # a request waiting for the channel to open sees it closed
        if self._waiting is not None and not self._waiting[1].done():
            self._waiting[1].set_exception(ControlError("the control channel closed before the reply"))
