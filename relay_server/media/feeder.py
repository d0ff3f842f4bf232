"""feed(): a trickle subscriber's bytes into the ChunkQueue that the decode thread reads.

Back-pressure without polling: when the queue is full, feeding (and so reading from the network)
waits for an event that the queue's writable callback sets once the decoder has caught up.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, Callable
from dataclasses import dataclass

from relay_server._fast import ChunkQueue
from relay_server.trickle.subscriber import Subscriber

log = logging.getLogger(__name__)


class InputNotFound(LookupError):
    """The input channel did not appear within the subscriber's start-up grace."""


@dataclass
class FeedStats:
    segments: int = 0  # segments started
    waits: int = 0  # times the queue was full and feeding waited for the decoder


async def feed(
    subscriber: AsyncIterable[AsyncIterable[bytes]],
    queue: ChunkQueue,
    stats: FeedStats | None = None,
    on_chunk: Callable[[bytes], object] | None = None,
    on_start: Callable[[bool], object] | None = None,
) -> None:
    """Put every chunk of every segment into `queue`, then close it (end of stream).
    `on_chunk` sees each chunk first, as it arrives (the session timeline stamps arrivals);
    `on_start` is told once, before the first chunk, whether the input is read from its start (a
    Subscriber whose channel appeared only after it began to read) rather than joined live.

    Cancellation or a subscriber failure aborts the queue, so the decoder stops too, and is
    re-raised; so is InputNotFound for a Subscriber whose channel never appeared. When the
    decoder aborted the queue (it stopped, and reports why itself), feeding just ends.
    """
    stats = FeedStats() if stats is None else stats
    loop = asyncio.get_running_loop()
    writable = asyncio.Event()
    # Fires on the decode thread (or in abort()): hand the wake-up to the loop.
    queue.set_writable_callback(lambda: loop.call_soon_threadsafe(writable.set))
    try:
        async for segment in subscriber:
            if not stats.segments and on_start is not None:
                on_start(isinstance(subscriber, Subscriber) and subscriber.waited_for_channel)
            stats.segments += 1
            async for chunk in segment:
                if on_chunk is not None:
                    on_chunk(chunk)
                writable.clear()
                try:
                    full = queue.put(chunk)
                except ValueError:
                    if queue.aborted:
                        log.debug("feed: the decoder stopped reading; %d bytes fed", queue.bytes_in)
                        return
                    raise
                if full:
                    stats.waits += 1
                    await writable.wait()
        if not stats.segments and isinstance(subscriber, Subscriber) and subscriber.end_reason == "not_found":
            grace = subscriber.startup_grace
            raise InputNotFound(f"input channel {subscriber.url} not found after {grace:g} s")
        queue.close()
    except BaseException:
        queue.abort()
        raise
    finally:
        queue.set_writable_callback(None)
