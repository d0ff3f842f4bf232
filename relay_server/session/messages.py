"""MessageChannel: JSON messages out to a trickle channel, one segment each, never blocking.

A session's status heartbeats go to its `events_url`, and the processor's text outputs to its
`data_url`. Senders must never wait on the network (the media path and the state machine call
send()), so messages queue in a bounded deque that one task drains; when the channel is slower
than the messages, the oldest unsent one goes and `dropped` counts it. A channel the server
closed ends publishing; other failures are logged and counted, and the next message tries again.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from typing import Any

from relay_server.trickle.errors import ChannelClosedError, TrickleError
from relay_server.trickle.publisher import Publisher

log = logging.getLogger(__name__)

CAPACITY = 64  # messages waiting at most


class MessageChannel:
    def __init__(self, url: str, *, capacity: int = CAPACITY) -> None:
        self.url = url
        self.sent = 0
        self.dropped = 0
        self.failed = 0
        self._capacity = capacity
        self._queue: deque[bytes] = deque()
        self._ready = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._publish(), name=f"messages {self.url}")

    def send(self, message: dict[str, Any]) -> None:
        """Queue a message (any thread-free caller on the loop; returns at once)."""
        if self._closing:
            return
        if len(self._queue) == self._capacity:
            self._queue.popleft()
            self.dropped += 1
        self._queue.append(json.dumps(message, separators=(",", ":")).encode())
        self._ready.set()

    async def close(self, within: float = 2.0) -> None:
        """Publish what is queued (for at most `within` seconds), then end the task."""
        self._closing = True
        self._ready.set()
        if self._task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._task), within)
        except TimeoutError:
            self._task.cancel()
            await asyncio.wait([self._task])

    async def _publish(self) -> None:
        publisher = Publisher(self.url, mime_type="application/json")
        try:
            while True:
                while not self._queue:
                    if self._closing:
                        return
                    self._ready.clear()
                    await self._ready.wait()
                data = self._queue.popleft()
                try:
                    async with await publisher.segment() as segment:
                        await segment.write(data)
                    self.sent += 1
                except ChannelClosedError:
                    log.info("%s was closed: no more messages go there", self.url)
                    self._closing = True
                    self.dropped += len(self._queue)
                    self._queue.clear()
                except TrickleError as error:
                    self.failed += 1
                    log.warning("message to %s lost: %s", self.url, error)
        finally:
            # The channel belongs to whoever reads it (a gateway): closed, not deleted.
            await publisher.close(delete_channel=False)
