"""Client conformance (cases 20–29 of the protocol doc) and resilience, against our real server."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest

from relay_server.backoff import Backoff
from relay_server.trickle.errors import ChannelClosedError, TrickleError
from relay_server.trickle.publisher import Outcome, Publisher
from relay_server.trickle.server import TrickleServer
from relay_server.trickle.subscriber import Segment, Subscriber
from tests.trickle.faultproxy import FaultProxy

QUICK = Backoff(initial=0.01, factor=2.0, maximum=0.05, attempts=4)


async def publish(url: str, seq: int, body: bytes) -> None:
    """One whole segment with a plain POST (no client logic involved)."""
    async with aiohttp.ClientSession() as http, http.post(f"{url}/{seq}", data=body) as response:
        assert response.status == 200


async def read_all(segment: Segment) -> bytes:
    return b"".join([chunk async for chunk in segment])


@pytest.fixture
async def proxy(trickle_server: TrickleServer) -> AsyncIterator[FaultProxy]:
    faulty = await FaultProxy(trickle_server.port).start()
    yield faulty
    await faulty.stop()


@pytest.fixture
async def one_connection_per_request() -> AsyncIterator[Callable[[], aiohttp.ClientSession]]:
    """Sessions for clients behind the fault proxy, which sees one request per connection."""
    sessions: list[aiohttp.ClientSession] = []

    def make() -> aiohttp.ClientSession:
        sessions.append(aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)))
        return sessions[-1]

    yield make
    for session in sessions:
        await session.close()


# -- subscriber ------------------------------------------------------------------------------


async def test_case20_470_jumps_to_latest(trickle_server: TrickleServer) -> None:
    url = trickle_server.channel_url("c20")
    for seq in range(9):
        await publish(url, seq, b"old %d" % seq)
    async with Subscriber(url, start_seq=0) as subscriber:
        pending = asyncio.create_task(anext(subscriber))
        # The 470 for seq 0 said Latest 9: the next GET is 9, waiting there (pre-created).
        await trickle_server.wait_until(lambda: _readers(trickle_server, "c20", 9) > 0)
        assert not pending.done()
        await publish(url, 9, b"nine")
        segment = await pending
        assert (segment.seq, await read_all(segment)) == (9, b"nine")
        assert subscriber.stats.skipped == 9


async def test_case21_closed_answer_ends_the_stream(trickle_server: TrickleServer) -> None:
    url = trickle_server.channel_url("c21")
    await publish(url, 0, b"zero")
    async with Subscriber(url, start_seq=1) as subscriber:
        pending = asyncio.create_task(anext(subscriber, None))
        await trickle_server.wait_until(lambda: _readers(trickle_server, "c21", 1) > 0)
        gets = trickle_server.stats.get_requests
        async with aiohttp.ClientSession() as http, http.delete(url) as response:
            assert response.status == 200
        assert await pending is None
        assert subscriber.end_reason == "closed"
        assert subscriber._next is None  # nothing left waiting: no further request can follow
        assert trickle_server.stats.get_requests == gets


async def test_case22_not_found_ends_after_grace_without_storm(trickle_server: TrickleServer) -> None:
    url = trickle_server.channel_url("never-created")
    async with Subscriber(url, startup_grace=0) as subscriber:
        assert [s async for s in subscriber] == []
        assert subscriber.end_reason == "not_found"
    assert trickle_server.stats.get_requests == 1

    async with Subscriber(url, startup_grace=0.6) as subscriber:
        assert [s async for s in subscriber] == []
        assert subscriber.end_reason == "not_found"
    # A try every 0.1 s: a handful of requests within the grace, not a storm.
    assert 2 <= trickle_server.stats.get_requests - 1 <= 8


async def test_not_found_during_grace_then_created(trickle_server: TrickleServer) -> None:
    url = trickle_server.channel_url("late")
    async with Subscriber(url, start_seq=0, startup_grace=30) as subscriber:
        pending = asyncio.create_task(anext(subscriber))
        await trickle_server.wait_until(lambda: trickle_server.stats.get_requests >= 2)
        await publish(url, 0, b"finally")
        segment = await pending
        assert await read_all(segment) == b"finally"


async def test_case23_empty_segment_is_skipped(trickle_server: TrickleServer) -> None:
    url = trickle_server.channel_url("c23")
    await publish(url, 0, b"")
    await publish(url, 1, b"one")
    async with Subscriber(url, start_seq=0) as subscriber:
        segment = await anext(subscriber)
        assert (segment.seq, await read_all(segment)) == (1, b"one")
        assert subscriber.stats.skipped == 1


async def test_case24_start_in_progress_reads_from_start_and_preconnects(
    trickle_server: TrickleServer,
) -> None:
    url = trickle_server.channel_url("c24")
    for seq in range(4):
        await publish(url, seq, b"done %d" % seq)
    async with Publisher(url, start_seq=4) as publisher, Subscriber(url) as subscriber:
        writer = await publisher.segment()
        await writer.write(b"key")
        await trickle_server.wait_until(lambda: _size(trickle_server, "c24", 4) == 3)
        segment = await anext(subscriber)
        assert segment.seq == 4
        assert await segment.read() == b"key"
        await trickle_server.wait_until(lambda: _readers(trickle_server, "c24", 5) > 0)
        await writer.write(b"frame")
        assert await segment.read() == b"frame"
        assert await writer.close() is Outcome.PUBLISHED
        assert await segment.read() == b""
        async with await publisher.segment() as five:
            await five.write(b"five")
        following = await anext(subscriber)
        assert (following.seq, await read_all(following)) == (5, b"five")
        assert subscriber.stats.segments == 2


@pytest.mark.parametrize("fault", ["status", "reset"])
async def test_case25_transient_failure_is_retried(
    trickle_server: TrickleServer,
    proxy: FaultProxy,
    one_connection_per_request: Callable[[], aiohttp.ClientSession],
    fault: str,
) -> None:
    await publish(trickle_server.channel_url("c25"), 0, b"payload")
    proxy.add("GET", "/c25/0", fault)
    url = f"{proxy.url}/c25"
    async with Subscriber(
        url, start_seq=0, backoff=QUICK, session=one_connection_per_request()
    ) as subscriber:
        segment = await anext(subscriber)
        assert await read_all(segment) == b"payload"
        # aiohttp itself retries an idempotent GET once when the connection drops before an
        # answer; a 500 comes to us.
        assert subscriber.stats.retries == (1 if fault == "status" else 0)
    assert proxy.requests[:2] == [("GET", "/c25/0"), ("GET", "/c25/0")]


async def test_case25_persistent_failure_is_a_clear_error(
    trickle_server: TrickleServer,
    proxy: FaultProxy,
    one_connection_per_request: Callable[[], aiohttp.ClientSession],
) -> None:
    proxy.add("GET", "/c25p/0", "status", count=-1)
    url = f"{proxy.url}/c25p"
    async with Subscriber(
        url, start_seq=0, backoff=QUICK, session=one_connection_per_request()
    ) as subscriber:
        with pytest.raises(TrickleError, match="giving up after 4 retries: GET 0: HTTP 500"):
            await anext(subscriber)
    assert len(proxy.requests) == 5


async def test_case29_long_wait_is_reissued_not_an_error(trickle_server: TrickleServer) -> None:
    url = trickle_server.channel_url("c29")
    await publish(url, 0, b"zero")
    async with Subscriber(url, start_seq=1, timeout=0.2) as subscriber:
        pending = asyncio.create_task(anext(subscriber))
        await trickle_server.wait_until(lambda: subscriber.stats.reissues >= 2, timeout=10)
        assert not pending.done()
        await publish(url, 1, b"one")
        segment = await pending
        assert (segment.seq, await read_all(segment)) == (1, b"one")
        assert subscriber.stats.retries == 0


async def test_segment_is_streamed_before_it_ends(trickle_server: TrickleServer) -> None:
    url = trickle_server.channel_url("stream")
    big = random.Random(1).randbytes(300_000)
    async with Publisher(url) as publisher, Subscriber(url, start_seq=0, chunk_size=65536) as subscriber:
        writer = await publisher.segment()
        await writer.write(b"head")
        segment = await anext(subscriber)
        assert await segment.read() == b"head"  # handed out while the segment is still open
        await writer.write(big)
        await writer.close()
        rest = [chunk async for chunk in segment]
        assert b"".join(rest) == big
        assert max(map(len, rest)) <= 65536
        assert len(rest) >= 300_000 // 65536


async def test_download_cut_midway_resumes_byte_exact(
    trickle_server: TrickleServer,
    proxy: FaultProxy,
    one_connection_per_request: Callable[[], aiohttp.ClientSession],
) -> None:
    body = random.Random(2).randbytes(200_000)
    await publish(trickle_server.channel_url("cut"), 0, body)
    proxy.add("GET", "/cut/0", "cut_response", after=70_000)
    url = f"{proxy.url}/cut"
    async with Subscriber(
        url, start_seq=0, backoff=QUICK, session=one_connection_per_request()
    ) as subscriber:
        segment = await anext(subscriber)
        assert await read_all(segment) == body
        assert not segment.truncated
        assert subscriber.stats.retries == 1


async def test_publisher_dead_midsegment_is_cut_when_next_starts(trickle_server: TrickleServer) -> None:
    url = trickle_server.channel_url("dead")
    async with Subscriber(url, start_seq=0) as subscriber:
        # A publisher that dies mid-body without the DELETE it owes: the segment stays open.
        abandoned = asyncio.Queue[bytes | None]()

        async def body() -> AsyncIterator[bytes]:
            while (chunk := await abandoned.get()) is not None:
                yield chunk

        async with aiohttp.ClientSession() as http:
            dying = asyncio.create_task(http.post(f"{url}/0", data=body()))
            await abandoned.put(b"partial")
            segment = await anext(subscriber)
            assert await segment.read() == b"partial"
            dying.cancel()
            await asyncio.gather(dying, return_exceptions=True)
        # The stream goes on with the next segment: the stalled one is cut, not waited on forever.
        await publish(url, 1, b"next")
        assert await segment.read() == b""
        assert segment.truncated
        following = await anext(subscriber)
        assert (following.seq, await read_all(following)) == (1, b"next")
        assert subscriber.stats.abandoned == 1


# -- publisher -------------------------------------------------------------------------------


async def test_case26_next_post_is_on_the_wire_before_segment_ends(trickle_server: TrickleServer) -> None:
    url = trickle_server.channel_url("c26")
    async with Publisher(url) as publisher:
        zero = await publisher.segment()
        await zero.write(b"first")
        # Segment 1 exists at the server (its POST headers arrived) while 0 is still open.
        await trickle_server.wait_until(lambda: 1 in _segments(trickle_server, "c26"))
        assert not _segments(trickle_server, "c26")[0].closed
        assert await zero.close() is Outcome.PUBLISHED
        async with await publisher.segment() as one:
            assert one.seq == 1
            await one.write(b"second")
        assert publisher.stats.segments == 2


async def test_case27_failure_before_first_byte_retries_same_seq(
    trickle_server: TrickleServer,
    proxy: FaultProxy,
    one_connection_per_request: Callable[[], aiohttp.ClientSession],
) -> None:
    proxy.add("POST", "/c27/0", "reset")
    async with Publisher(
        f"{proxy.url}/c27", backoff=QUICK, session=one_connection_per_request()
    ) as publisher:
        async with await publisher.segment() as zero:
            await zero.write(b"hello")
        assert publisher.stats.retries == 1
        await trickle_server.wait_until(lambda: _size(trickle_server, "c27", 0) == 5)
    assert proxy.requests.count(("POST", "/c27/0")) == 2


async def test_case27_failure_after_bytes_deletes_segment_and_moves_on(
    trickle_server: TrickleServer,
    proxy: FaultProxy,
    one_connection_per_request: Callable[[], aiohttp.ClientSession],
) -> None:
    url = trickle_server.channel_url("c27b")
    proxy.add("POST", "/c27b/0", "cut_request", after=400)
    async with (
        Subscriber(url, start_seq=0) as subscriber,
        Publisher(f"{proxy.url}/c27b", backoff=QUICK, session=one_connection_per_request()) as publisher,
    ):
        zero = await publisher.segment()
        await zero.write(b"x" * 1000)
        segment = await anext(subscriber)
        # The broken upload is closed with DELETE, so its reader ends instead of hanging.
        received = await read_all(segment)
        assert 0 < len(received) < 1000
        assert await zero.close() is Outcome.FAILED
        assert publisher.stats.failed == 1
        assert ("DELETE", "/c27b/0") in proxy.requests
        async with await publisher.segment() as one:
            await one.write(b"one")
        following = await anext(subscriber)
        assert (following.seq, await read_all(following)) == (1, b"one")


async def test_case28_publisher_stops_on_404(
    make_trickle_server: Callable[..., Awaitable[TrickleServer]],
) -> None:
    server = await make_trickle_server(autocreate=False)
    async with Publisher(server.channel_url("missing")) as publisher:
        segment = await publisher.segment()
        await segment.write(b"lost")
        with pytest.raises(ChannelClosedError):
            await segment.close()
        assert publisher.channel_closed
        with pytest.raises(ChannelClosedError):
            await publisher.segment()


async def test_case28_publisher_stops_on_closed_and_close_deletes(trickle_server: TrickleServer) -> None:
    url = trickle_server.channel_url("c28")
    publisher = Publisher(url)
    async with await publisher.segment() as zero:
        await zero.write(b"zero")
    await publisher.close()
    await trickle_server.wait_until(lambda: trickle_server.snapshot("c28") is None)

    other = trickle_server.channel_url("c28b")
    async with Publisher(other) as publisher:
        async with await publisher.segment() as zero:
            await zero.write(b"zero")
        # Segment 1 is preconnected; the channel is closed under it.
        await trickle_server.wait_until(lambda: 1 in _segments(trickle_server, "c28b"))
        async with aiohttp.ClientSession() as http, http.delete(other) as response:
            assert response.status == 200
        with pytest.raises(ChannelClosedError):
            await (await publisher.segment()).close()
        assert publisher.channel_closed


async def test_publisher_continues_existing_channel_with_reset(trickle_server: TrickleServer) -> None:
    url = trickle_server.channel_url("cont")
    for seq in range(3):
        await publish(url, seq, b"old")
    async with Publisher(url, start_seq=None) as publisher:
        async with await publisher.segment() as segment:
            assert segment.seq == 3  # continues after nextWrite, never moves the channel backwards
            await segment.write(b"new")
        assert trickle_server.snapshot("cont").next_write == 4  # type: ignore[union-attr]


# -- end to end ------------------------------------------------------------------------------


def _payload(seq: int) -> bytes:
    rng = random.Random(seq)
    return rng.randbytes(rng.randint(1, 40_000))


async def test_thousand_segments_byte_exact(trickle_server: TrickleServer) -> None:
    await _stream_byte_exact(trickle_server, 1000)


@pytest.mark.slow
async def test_soak_fifty_thousand_segments_byte_exact(trickle_server: TrickleServer) -> None:
    await _stream_byte_exact(trickle_server, 50_000)
    # Nothing is left behind at the server once the stream is over.
    assert trickle_server.stats.waiting_gets == trickle_server.stats.waiting_posts == 0
    assert trickle_server.snapshot("stream") is None


async def _stream_byte_exact(trickle_server: TrickleServer, count: int) -> None:
    url = trickle_server.channel_url("stream")
    received: list[tuple[int, bytes]] = []
    progress = asyncio.Condition()

    async def produce() -> None:
        async with Publisher(url) as publisher:
            for seq in range(count):
                # Stay within the server's ring of the reader: at most 3 segments ahead.
                async with progress:
                    await progress.wait_for(lambda seq=seq: seq - len(received) <= 3)
                body = _payload(seq)
                async with await publisher.segment() as writer:
                    for start in range(0, len(body), 16_384):
                        await writer.write(body[start : start + 16_384])
            assert publisher.stats.segments == count

    async with Subscriber(url, start_seq=0) as subscriber:
        producer = asyncio.create_task(produce())
        async for segment in subscriber:
            received.append((segment.seq, await read_all(segment)))
            async with progress:
                progress.notify_all()
        await producer
        # The publisher's DELETE reached a waiting GET (Closed) or preceded the next one (404).
        assert subscriber.end_reason in ("closed", "not_found")
    assert [seq for seq, _ in received] == list(range(count))
    assert all(body == _payload(seq) for seq, body in received)
    assert subscriber.stats.skipped == 0


def _segments(server: TrickleServer, channel: str) -> dict:
    snapshot = server.snapshot(channel)
    return {} if snapshot is None else snapshot.segments


def _readers(server: TrickleServer, channel: str, seq: int) -> int:
    segment = _segments(server, channel).get(seq)
    return 0 if segment is None else segment.readers


def _size(server: TrickleServer, channel: str, seq: int) -> int:
    segment = _segments(server, channel).get(seq)
    return -1 if segment is None else segment.size


async def test_create_channel_lets_readers_wait_before_the_first_segment(
    trickle_server: TrickleServer,
) -> None:
    url = trickle_server.channel_url("created")
    async with Publisher(url, mime_type="video/MP2T") as publisher:
        await publisher.create_channel()
        assert trickle_server.snapshot("created").mime_type == "video/MP2T"  # type: ignore[union-attr]
        async with Subscriber(url, startup_grace=0) as subscriber:
            pending = asyncio.create_task(anext(subscriber))
            await trickle_server.wait_until(lambda: _readers(trickle_server, "created", 0) > 0)
            async with await publisher.segment() as zero:
                await zero.write(b"first")
            segment = await pending
            assert (segment.seq, await read_all(segment)) == (0, b"first")


async def test_create_channel_refused_is_an_error(
    make_trickle_server: Callable[..., Awaitable[TrickleServer]],
) -> None:
    server = await make_trickle_server()
    await server.stop()
    async with Publisher(server.channel_url("gone")) as publisher:
        with pytest.raises(TrickleError, match="creating"):
            await publisher.create_channel()
