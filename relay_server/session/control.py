"""The session's control channel: JSON messages on its `control_url` go to the processor.

A gateway publishes each message as a trickle segment. A message with a `type` ComfyStream knows
(update_prompts, update_resolution, pause_prompts, ...) goes to the processor's `control` data
channel as it is; Livepeer-style parameter updates without a type are translated: `prompts` →
update_prompts, `width`/`height` → update_resolution. Every request's outcome (the processor's
reply or why there was none) goes to `on_reply`; the session publishes it with its events.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from relay_server.trickle.subscriber import Subscriber
from relay_server.webrtc.control import REPLY_TYPES, ControlError

log = logging.getLogger(__name__)

MAX_MESSAGE = 1024 * 1024  # bytes: a control segment larger than this is not a control message


def requests_in(message: Any) -> list[dict[str, Any]]:
    """The processor requests one control message stands for (none if it is not one)."""
    if not isinstance(message, dict):
        return []
    if message.get("type") in REPLY_TYPES:
        return [message]
    requests: list[dict[str, Any]] = []
    if "prompts" in message:
        prompts = message["prompts"]
        listed = prompts if isinstance(prompts, list) else [prompts]
        requests.append({"type": "update_prompts", "prompts": listed})
    if "width" in message and "height" in message:
        requests.append({"type": "update_resolution", "width": message["width"], "height": message["height"]})
    return requests


async def relay_control(
    url: str,
    control: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]],
    on_reply: Callable[[dict[str, Any], dict[str, Any]], None],
) -> None:
    """Forward the messages published on `url` from now on until the channel ends."""
    async with Subscriber(url, start_seq=-1) as subscriber:
        async for segment in subscriber:
            data = bytearray()
            async for chunk in segment:
                data += chunk
                if len(data) > MAX_MESSAGE:
                    break
            if len(data) > MAX_MESSAGE:
                log.warning("control message of over %d bytes on %s skipped", MAX_MESSAGE, url)
                on_reply({}, {"type": "error", "error": f"control message over {MAX_MESSAGE} bytes"})
                continue
            try:
                message = json.loads(data)
            except ValueError as error:
                on_reply({}, {"type": "error", "error": f"control message is not JSON: {error}"})
                continue
            requests = requests_in(message)
            if not requests:
                on_reply({}, {"type": "error", "error": f"not a control message: {str(message)[:200]}"})
            for request in requests:
                try:
                    reply = await control(request)
                except ControlError as error:
                    reply = {"type": "error", "error": str(error)}
                on_reply(request, reply)
