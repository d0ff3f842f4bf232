"""feed(): subscriber chunks into a ChunkQueue, waiting while it is full, closing or aborting it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from relay_server._fast import ChunkQueue
from relay_server.media.feeder import FeedStats, InputNotFound, feed
from relay_server.trickle import Publisher, Subscriber
from relay_server.trickle.server import TrickleServer
from tests.media.clips import memory_subscriber, take

TIMEOUT = 10.0
CHUNK = 1000


class CountingSubscriber:
    """One segment of `count` chunks; says when feed() asks for each, and can fail at one."""

    def __init__(self, count: int, fail_at: int | None = None) -> None:
        self.count = count
        self.fail_at = fail_at
        self.asked = 0  # chunks asked for so far
        self._asked_changed = asyncio.Event()

    async def __aiter__(self) -> AsyncIterator[AsyncIterator[bytes]]:
        yield self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        for index in range(self.count):
            self.asked += 1
            self._asked_changed.set()
            if index == self.fail_at:
                raise ConnectionResetError("subscriber broke")
            yield bytes([index]) * CHUNK

    async def wait_asked(self, count: int) -> None:
        while self.asked < count:
            self._asked_changed.clear()
            await self._asked_changed.wait()


def read_all(queue: ChunkQueue) -> bytes:
    pieces = []
    while piece := queue.read():
        pieces.append(piece)
    return b"".join(pieces)


async def test_waits_while_full_and_resumes_when_drained() -> None:
    queue = ChunkQueue(3 * CHUNK, low_water=CHUNK)
    subscriber = CountingSubscriber(6)
    stats = FeedStats()
    feeding = asyncio.create_task(feed(subscriber, queue, stats))
    await subscriber.wait_asked(3)
    # feed() put the third chunk without yielding to the loop, found the queue full and waits:
    # the subscriber is not asked for more until the reader makes room.
    assert queue.size == 3 * CHUNK and stats.waits == 1
    assert subscriber.asked == 3 and not feeding.done()
    first = await asyncio.to_thread(lambda: queue.read() + queue.read())  # down to low_water
    data = first + await asyncio.wait_for(asyncio.to_thread(read_all, queue), TIMEOUT)
    await feeding
    assert data == b"".join(bytes([index]) * CHUNK for index in range(6))
    assert queue.closed and not queue.aborted
    assert stats.segments == 1 and stats.waits >= 2  # the second wait races the reader


async def test_cancel_while_waiting_aborts_the_queue() -> None:
    queue = ChunkQueue(2 * CHUNK)
    subscriber = CountingSubscriber(5)
    feeding = asyncio.create_task(feed(subscriber, queue))
    await subscriber.wait_asked(2)
    feeding.cancel()
    with pytest.raises(asyncio.CancelledError):
        await feeding
    assert queue.aborted


async def test_subscriber_failure_aborts_the_queue_and_is_raised() -> None:
    queue = ChunkQueue(100 * CHUNK)
    with pytest.raises(ConnectionResetError):
        await feed(CountingSubscriber(5, fail_at=2), queue)
    assert queue.aborted and queue.bytes_in == 2 * CHUNK


async def test_reader_abort_ends_feeding_quietly() -> None:
    """The decoder aborts the queue when it gives up; it reports why, the feeder just stops."""
    queue = ChunkQueue(2 * CHUNK)
    subscriber = CountingSubscriber(5)
    feeding = asyncio.create_task(feed(subscriber, queue))
    await subscriber.wait_asked(2)
    await asyncio.to_thread(queue.abort)  # from the decode thread, as a Decoder does
    await asyncio.wait_for(feeding, TIMEOUT)
    assert subscriber.asked == 3  # woken by the abort, it tried once more and stopped


async def test_memory_segments_arrive_whole_and_in_order() -> None:
    segments = [bytes([n]) * (n * 50_000 + 1) for n in range(1, 4)]
    queue = ChunkQueue(64 * 1024)
    stats = FeedStats()
    feeding = asyncio.create_task(feed(memory_subscriber(segments), queue, stats))
    data = await asyncio.wait_for(asyncio.to_thread(read_all, queue), TIMEOUT)
    await feeding
    assert data == b"".join(segments)
    assert stats.segments == 3 and stats.waits > 0


async def test_feeds_from_a_trickle_subscriber(trickle_server: TrickleServer) -> None:
    segments = [bytes([n]) * 200_000 for n in range(3)]
    url = trickle_server.channel_url("feed")
    queue = ChunkQueue(128 * 1024)
    async with Publisher(url) as publisher:
        writer = await publisher.segment()
        await trickle_server.wait_until(lambda: trickle_server.snapshot("feed") is not None)
        async with Subscriber(url, start_seq=0) as subscriber:
            feeding = asyncio.create_task(feed(take(subscriber, len(segments)), queue))
            reading = asyncio.create_task(asyncio.to_thread(read_all, queue))
            for index, data in enumerate(segments):
                if index:
                    writer = await publisher.segment()
                await writer.write(data)
                await writer.close()
            await asyncio.wait_for(feeding, TIMEOUT)
            assert await asyncio.wait_for(reading, TIMEOUT) == b"".join(segments)
    assert queue.closed


async def test_an_input_channel_that_never_appears_is_a_clear_error(trickle_server: TrickleServer) -> None:
    url = trickle_server.channel_url("never")
    queue = ChunkQueue(1 << 20)
    async with Subscriber(url, startup_grace=0.5) as subscriber:
        with pytest.raises(InputNotFound, match=rf"input channel {url} not found after 0\.5 s"):
            await asyncio.wait_for(feed(subscriber, queue), TIMEOUT)
    assert queue.aborted


@pytest.mark.parametrize("live_first", [True, False], ids=["joined", "from_start"])
async def test_the_start_says_whether_the_input_is_read_from_its_start(
    trickle_server: TrickleServer, live_first: bool
) -> None:
    """A channel that appears only after reading began is read from its start; one that was
    live before is joined."""
    url = trickle_server.channel_url("start")
    publisher = Publisher(url)
    starts: list[bool] = []
    started = asyncio.Event()

    def on_start(from_start: bool) -> None:
        starts.append(from_start)
        started.set()

    if live_first:
        await publisher.create_channel()
        async with await publisher.segment() as segment:
            await segment.write(b"x")
    asked = trickle_server.stats.get_requests
    async with Subscriber(url, startup_grace=10) as subscriber:
        feeding = asyncio.create_task(feed(subscriber, ChunkQueue(1 << 20), on_start=on_start))
        if not live_first:  # the subscriber asks, and is told there is no such channel yet
            await trickle_server.wait_until(lambda: trickle_server.stats.get_requests > asked, TIMEOUT)
            async with await publisher.segment() as segment:
                await segment.write(b"x")
        await asyncio.wait_for(started.wait(), TIMEOUT)
        await publisher.close()
        await asyncio.wait_for(feeding, TIMEOUT)
    assert starts == [not live_first]
