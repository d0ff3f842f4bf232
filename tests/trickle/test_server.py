"""Conformance of the embedded trickle server (docs/trickle-protocol.md, cases 1-19 and 29).

Tests synchronise on server events (`server.wait_until`) or on responses, never on sleeps. Where
the bytes on the wire matter (no headers yet, `100 Continue`, `Connection: close`) they use a bare
socket; everything else goes through aiohttp's client.
"""

from __future__ import annotations

import asyncio
import os
import socket
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from relay_server.trickle.protocol import CLOSED, CLOSED_VALUE, LATEST, RESET, SEQ
from relay_server.trickle.server import SegmentSnapshot, TrickleServer

MakeServer = Callable[..., Awaitable[TrickleServer]]
CH = "ch"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    # No connection limit: some tests hold dozens of long-polls at once.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        yield session


class Feed:
    """A request body the test writes piece by piece; `end()` finishes it."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue()

    def send(self, data: bytes) -> None:
        self._queue.put_nowait(data)

    def end(self) -> None:
        self._queue.put_nowait(None)

    async def body(self) -> AsyncIterator[bytes]:
        while (data := await self._queue.get()) is not None:
            yield data


class Raw:
    """A bare HTTP/1.1 connection, to see exactly what the server sends and when."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self._buffer = b""

    @classmethod
    async def open(cls, port: int) -> Raw:
        sock = socket.socket()
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        return cls(sock)

    async def send(self, data: bytes) -> None:
        await self._loop.sock_sendall(self._sock, data)

    async def request(self, method: str, path: str, *headers: str) -> None:
        lines = [f"{method} {path} HTTP/1.1", "Host: test", *headers, "", ""]
        await self.send("\r\n".join(lines).encode())

    async def read_exactly(self, size: int) -> bytes:
        while len(self._buffer) < size:
            data = await self._loop.sock_recv(self._sock, 65536)
            assert data, f"connection closed after {self._buffer!r}"
            self._buffer += data
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data

    async def read_head(self) -> tuple[int, dict[str, str]]:
        while b"\r\n\r\n" not in self._buffer:
            data = await self._loop.sock_recv(self._sock, 65536)
            assert data, f"connection closed after {self._buffer!r}"
            self._buffer += data
        head, self._buffer = self._buffer.split(b"\r\n\r\n", 1)
        status_line, *lines = head.decode().split("\r\n")
        fields = (line.split(":", 1) for line in lines)
        return int(status_line.split()[1]), {k.strip().lower(): v.strip() for k, v in fields}

    async def read_to_eof(self) -> bytes:
        while data := await self._loop.sock_recv(self._sock, 65536):
            self._buffer += data
        data, self._buffer = self._buffer, b""
        return data

    def nothing_received(self) -> bool:
        """True when not a byte has arrived (the server writes synchronously, so this is exact)."""
        if self._buffer:
            return False
        try:
            self._sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True
        return False  # data, or the connection was closed

    def close(self) -> None:
        self._sock.close()


def segment(server: TrickleServer, seq: int, channel: str = CH) -> SegmentSnapshot | None:
    snapshot = server.snapshot(channel)
    return None if snapshot is None else snapshot.segments.get(seq)


def readers_waiting(server: TrickleServer, seq: int) -> int:
    found = segment(server, seq)
    return 0 if found is None else found.readers_waiting


async def create(http: aiohttp.ClientSession, server: TrickleServer, mime: str = "video/MP2T") -> None:
    async with http.post(server.channel_url(CH), headers={"Expect-Content": mime}) as response:
        assert response.status == 200


async def publish(
    http: aiohttp.ClientSession, server: TrickleServer, seq: int | str, body: bytes, **headers: str
) -> aiohttp.ClientResponse:
    url = f"{server.channel_url(CH)}/{seq}"
    async with http.post(url, data=body, headers=headers) as response:
        await response.read()
        return response


async def get(
    http: aiohttp.ClientSession, server: TrickleServer, seq: int | str, channel: str = CH
) -> tuple[aiohttp.ClientResponse, bytes]:
    async with http.get(f"{server.channel_url(channel)}/{seq}") as response:
        return response, await response.read()


def stalled_post(
    http: aiohttp.ClientSession, server: TrickleServer, seq: int, feed: Feed, **kwargs: Any
) -> asyncio.Task[aiohttp.ClientResponse]:
    """A POST whose body the test feeds. aiohttp sends the headers with the first body chunk,
    unless `expect100=True` (a preconnect: headers first, answered by `100 Continue`)."""

    async def run() -> aiohttp.ClientResponse:
        url = f"{server.channel_url(CH)}/{seq}"
        async with http.post(url, data=feed.body(), **kwargs) as response:
            await response.read()
            return response

    return asyncio.create_task(run())


async def upload_started(
    http: aiohttp.ClientSession, server: TrickleServer, seq: int, first: bytes
) -> tuple[Feed, asyncio.Task[aiohttp.ClientResponse]]:
    """A POST that has sent `first` (and the server has it) and stalls until fed more."""
    feed = Feed()
    feed.send(first)
    task = stalled_post(http, server, seq, feed)
    await server.wait_until(lambda: (s := segment(server, seq)) is not None and s.size == len(first))
    return feed, task


def waiting_get(
    http: aiohttp.ClientSession, server: TrickleServer, seq: int
) -> asyncio.Task[tuple[aiohttp.ClientResponse, bytes]]:
    return asyncio.create_task(get(http, server, seq))


# -- conformance cases ------------------------------------------------------------------------------


async def test_case01_unknown_channel_is_404(
    trickle_server: TrickleServer, http: aiohttp.ClientSession
) -> None:
    for method, path in (("GET", "/nope/0"), ("GET", "/nope/next"), ("DELETE", "/nope/0")):
        async with http.request(method, trickle_server.url + path) as response:
            assert response.status == 404, (method, path)
            assert await response.text() == "Stream not found"


async def test_case02_autocreate_off_post_is_404_with_connection_close(
    make_trickle_server: MakeServer,
) -> None:
    server = await make_trickle_server(autocreate=False)
    raw = await Raw.open(server.port)
    try:
        await raw.request("POST", f"/{CH}/0", "Content-Length: 1")
        await raw.send(b"a")
        status, headers = await raw.read_head()
        assert status == 404
        assert headers["connection"] == "close"
        assert (await raw.read_to_eof()).startswith(b"Stream not found")  # then the server hangs up
    finally:
        raw.close()
    assert server.snapshot(CH) is None


async def test_case03_post_then_next(trickle_server: TrickleServer, http: aiohttp.ClientSession) -> None:
    response = await publish(http, trickle_server, 0, b"a")
    assert response.status == 200
    assert response.headers[SEQ] == "0"
    response, body = await get(http, trickle_server, "next")
    assert response.status == 200
    assert body == b"1"
    assert response.headers[LATEST] == "1"


async def test_case04_get_finished_segment(
    trickle_server: TrickleServer, http: aiohttp.ClientSession
) -> None:
    await create(http, trickle_server, "video/MP2T")
    await publish(http, trickle_server, 0, b"a")
    response, body = await get(http, trickle_server, 0)
    assert response.status == 200
    assert body == b"a"
    assert response.headers["Content-Type"] == "video/MP2T"
    assert response.headers[SEQ] == "0"
    assert response.headers[LATEST] == "1"
    assert CLOSED not in response.headers


async def test_case04_content_type_echoes_an_empty_mime_type(
    trickle_server: TrickleServer, http: aiohttp.ClientSession
) -> None:
    await create(http, trickle_server, "")
    await publish(http, trickle_server, 0, b"a")
    raw = await Raw.open(trickle_server.port)
    try:
        await raw.request("GET", f"/{CH}/0")
        status, headers = await raw.read_head()
    finally:
        raw.close()
    assert status == 200
    assert headers["content-type"] == ""


async def test_case05_get_next_waits_without_headers(
    trickle_server: TrickleServer, http: aiohttp.ClientSession
) -> None:
    await publish(http, trickle_server, 0, b"a")
    task = asyncio.create_task(get(http, trickle_server, -1))
    await trickle_server.wait_until(lambda: trickle_server.stats.waiting_gets == 1)
    assert not task.done()  # aiohttp returns a response only once its headers arrived
    assert segment(trickle_server, 1) == SegmentSnapshot(1, 0, False, 1, 1, False)  # pre-created
    assert (await publish(http, trickle_server, 1, b"b")).status == 200
    response, body = await task
    assert (response.status, response.headers[SEQ], body) == (200, "1", b"b")
    assert LATEST not in response.headers


async def test_case06_get_in_progress_streams_from_start(
    trickle_server: TrickleServer, http: aiohttp.ClientSession
) -> None:
    await publish(http, trickle_server, 0, b"a")
    feed, post = await upload_started(http, trickle_server, 1, b"x")
    async with http.get(f"{trickle_server.channel_url(CH)}/-2") as response:
        assert response.status == 200
        assert response.headers[SEQ] == "1"
        assert response.headers[LATEST] == "2"
        assert await response.content.readexactly(1) == b"x"
        feed.send(b"yz")
        assert await response.content.readexactly(2) == b"yz"
        rest = asyncio.create_task(response.content.read())
        await trickle_server.wait_until(lambda: readers_waiting(trickle_server, 1) == 1)
        assert not rest.done()  # the body ends only when the POST does
        feed.end()
        assert await rest == b""
    assert (await post).status == 200


async def test_case07_get_beyond_live_edge_is_470(
    trickle_server: TrickleServer, http: aiohttp.ClientSession
) -> None:
    await publish(http, trickle_server, 0, b"a")
    response, body = await get(http, trickle_server, 3)
    assert response.status == 470
    assert response.headers[SEQ] == "3"
    assert response.headers[LATEST] == "1"
    assert body == b"Entry not found"


async def test_case08_new_channel_get_1_waits_get_2_is_470(
    trickle_server: TrickleServer, http: aiohttp.ClientSession
) -> None:
    await create(http, trickle_server)
    waiting = waiting_get(http, trickle_server, 1)
    await trickle_server.wait_until(lambda: trickle_server.stats.waiting_gets == 1)
    response, _ = await get(http, trickle_server, 2)
    assert response.status == 470
    assert response.headers[LATEST] == "0"
    assert response.headers[SEQ] == "2"
    assert not waiting.done()
    await publish(http, trickle_server, 1, b"b")
    response, body = await waiting
    assert (response.status, response.headers[SEQ], body) == (200, "1", b"b")


async def _publish_0_to_9(http: aiohttp.ClientSession, server: TrickleServer) -> None:
    for seq in range(10):
        await publish(http, server, seq, b"seg%d" % seq)


async def test_case09_ring_holds_the_last_five(
    trickle_server: TrickleServer, http: aiohttp.ClientSession
) -> None:
    await _publish_0_to_9(http, trickle_server)
    for seq in range(5):
        response, _ = await get(http, trickle_server, seq)
        assert (response.status, response.headers[LATEST]) == (470, "10"), seq
    for seq in range(5, 10):
        response, body = await get(http, trickle_server, seq)
        assert (response.status, body) == (200, b"seg%d" % seq)


async def test_case10_waiting_get_evicts_the_oldest(
    trickle_server: TrickleServer, http: aiohttp.ClientSession
) -> None:
    await _publish_0_to_9(http, trickle_server)
    waiting = waiting_get(http, trickle_server, 10)
    await trickle_server.wait_until(lambda: trickle_server.stats.waiting_gets == 1)
    response, _ = await get(http, trickle_server, 5)
    assert (response.status, response.headers[LATEST]) == (470, "10")
    await publish(http, trickle_server, 10, b"ten")
    response, body = await waiting
    assert (response.status, body) == (200, b"ten")


async def test_case11_delete_channel_releases_waiters(
    make_trickle_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    server = await make_trickle_server(autocreate=False)
    await create(http, server)
    reader = waiting_get(http, server, 0)
    feed = Feed()  # never sends a byte
    preconnect = stalled_post(http, server, 1, feed, expect100=True)
    await server.wait_until(lambda: server.stats.waiting_gets == 1 and server.stats.waiting_posts == 1)
    async with http.delete(server.channel_url(CH)) as response:
        assert response.status == 200
    response, body = await reader
    assert (response.status, response.headers[CLOSED], body) == (200, CLOSED_VALUE, b"")
    posted = await preconnect
    assert (posted.status, posted.headers[CLOSED]) == (200, CLOSED_VALUE)
    feed.end()
    response, _ = await get(http, server, 0)
    assert response.status == 404
    assert (await publish(http, server, 1, b"late")).status == 404


async def test_case12_delete_channel_ends_a_reader_mid_body_cleanly(
    trickle_server: TrickleServer, http: aiohttp.ClientSession
) -> None:
    feed, post = await upload_started(http, trickle_server, 0, b"abc")
    async with http.get(f"{trickle_server.channel_url(CH)}/0") as response:
        assert await response.content.readexactly(3) == b"abc"
        await trickle_server.wait_until(lambda: readers_waiting(trickle_server, 0) == 1)
        async with http.delete(trickle_server.channel_url(CH)) as deleted:
            assert deleted.status == 200
        assert await response.content.read() == b""  # the chunked body ends, no error
        assert CLOSED not in response.headers
    feed.end()
    posted = await post
    assert (posted.status, posted.headers[CLOSED]) == (200, CLOSED_VALUE)


async def test_case13_delete_seq_releases_a_waiting_get(
    trickle_server: TrickleServer, http: aiohttp.ClientSession
) -> None:
    await create(http, trickle_server)
    waiting = waiting_get(http, trickle_server, 0)
    await trickle_server.wait_until(lambda: trickle_server.stats.waiting_gets == 1)
    async with http.delete(f"{trickle_server.channel_url(CH)}/0") as deleted:
        assert deleted.status == 200
    response, body = await waiting
    assert (response.status, body, response.headers["Content-Length"]) == (200, b"", "0")
    assert CLOSED not in response.headers
    # Ended empty at the live edge, it counts as written: a reader skipping it waits on 1.
    response, body = await get(http, trickle_server, "next")
    assert body == b"1"


async def test_case14_bad_deletes_are_400(trickle_server: TrickleServer, http: aiohttp.ClientSession) -> None:
    await publish(http, trickle_server, 0, b"a")
    base = trickle_server.channel_url(CH)
    for url in (f"{base}/x", f"{base}/7", f"{base}/-1", f"{trickle_server.url}/missing"):
        async with http.delete(url) as response:
            assert response.status == 400, url


async def test_case15_reset_ends_stalled_readers(
    trickle_server: TrickleServer, http: aiohttp.ClientSession
) -> None:
    feed, old_publisher = await upload_started(http, trickle_server, 0, b"old")
    async with http.get(f"{trickle_server.channel_url(CH)}/0") as old_reader:
        assert await old_reader.content.readexactly(3) == b"old"
        await trickle_server.wait_until(lambda: readers_waiting(trickle_server, 0) == 1)
        restarted = await publish(http, trickle_server, -1, b"new", **{RESET: "1"})
        assert (restarted.status, restarted.headers[SEQ]) == (200, "1")
        assert await old_reader.content.read() == b""
    for seq in (1, -2):
        response, body = await get(http, trickle_server, seq)
        assert (response.status, response.headers[SEQ], body) == (200, "1", b"new")
    feed.end()
    assert (await old_publisher).status == 200


async def test_case16_aborted_upload_keeps_readers_until_delete(
    trickle_server: TrickleServer, http: aiohttp.ClientSession
) -> None:
    publisher = await Raw.open(trickle_server.port)
    await publisher.request("POST", f"/{CH}/0", "Transfer-Encoding: chunked")
    await publisher.send(b"5\r\nhello\r\n")
    await trickle_server.wait_until(lambda: (s := segment(trickle_server, 0)) is not None and s.size == 5)
    async with http.get(f"{trickle_server.channel_url(CH)}/0") as reader:
        assert await reader.content.readexactly(5) == b"hello"
        publisher.close()  # dies mid-body
        rest = asyncio.create_task(reader.content.read())
        await trickle_server.wait_until(
            lambda: (s := segment(trickle_server, 0)) is not None and not s.writing and s.readers_waiting == 1
        )
        assert not rest.done()
        assert segment(trickle_server, 0) == SegmentSnapshot(0, 5, False, 1, 1, False)  # still open
        async with http.delete(f"{trickle_server.channel_url(CH)}/0") as deleted:
            assert deleted.status == 200
        assert await rest == b""


async def test_case16_broken_upload_is_500_and_leaves_the_segment_open(
    trickle_server: TrickleServer, http: aiohttp.ClientSession
) -> None:
    publisher = await Raw.open(trickle_server.port)
    try:
        await publisher.request("POST", f"/{CH}/0", "Transfer-Encoding: chunked", "Content-Encoding: deflate")
        good = zlib.compress(b"hello")
        await publisher.send(b"%x\r\n%s\r\n" % (len(good), good))
        await trickle_server.wait_until(lambda: (s := segment(trickle_server, 0)) is not None and s.size == 5)
        await publisher.send(b"5\r\nbroke\r\n")  # not deflate: the body cannot be decoded
        status, headers = await publisher.read_head()
        assert (status, headers["connection"]) == (500, "close")
    finally:
        publisher.close()
    assert segment(trickle_server, 0) == SegmentSnapshot(0, 5, False, 0, 0, False)
    async with http.get(f"{trickle_server.channel_url(CH)}/0") as reader:
        assert await reader.content.readexactly(5) == b"hello"
        rest = asyncio.create_task(reader.content.read())
        await trickle_server.wait_until(lambda: readers_waiting(trickle_server, 0) == 1)
        assert not rest.done()
        async with http.delete(f"{trickle_server.channel_url(CH)}/0") as deleted:
            assert deleted.status == 200
        assert await rest == b""


async def test_case17_slow_reader_gets_a_whole_evicted_segment(
    trickle_server: TrickleServer, http: aiohttp.ClientSession
) -> None:
    big = os.urandom(4 * 1024 * 1024)
    feed = Feed()
    for start in range(0, len(big), 256 * 1024):  # streamed, as a publisher does
        feed.send(big[start : start + 256 * 1024])
    feed.end()
    assert (await stalled_post(http, trickle_server, 0, feed)).status == 200
    async with http.get(f"{trickle_server.channel_url(CH)}/0") as reader:
        head = await reader.content.readexactly(65536)
        for seq in range(1, 8):
            await publish(http, trickle_server, seq, b"newer")
        assert segment(trickle_server, 0) is None  # slot 0 now holds segment 5
        assert head + await reader.content.read() == big


async def test_case18_empty_segment(trickle_server: TrickleServer, http: aiohttp.ClientSession) -> None:
    posted = await publish(http, trickle_server, 0, b"")
    assert (posted.status, posted.headers[SEQ]) == (200, "0")
    response, body = await get(http, trickle_server, 0)
    assert (response.status, response.headers["Content-Length"], body) == (200, "0", b"")
    assert CLOSED not in response.headers


async def test_case19_idle_channel_is_swept(
    make_trickle_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    server = await make_trickle_server(idle_timeout=0.2)
    await create(http, server)
    reader = waiting_get(http, server, 0)
    feed = Feed()
    preconnect = stalled_post(http, server, 1, feed, expect100=True)  # not activity
    await server.wait_until(lambda: server.stats.waiting_gets == 1 and server.stats.waiting_posts == 1)
    await server.wait_until(lambda: server.snapshot(CH) is None, timeout=3)
    response, body = await reader
    assert (response.status, response.headers[CLOSED], body) == (200, CLOSED_VALUE, b"")
    posted = await preconnect
    assert (posted.status, posted.headers[CLOSED]) == (200, CLOSED_VALUE)
    feed.end()
    response, _ = await get(http, server, 0)
    assert response.status == 404
    assert server.stats.channels_closed == 1


async def test_case19_first_bytes_keep_a_channel_alive(
    make_trickle_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    server = await make_trickle_server(idle_timeout=0.2)
    loop = asyncio.get_running_loop()
    created = loop.time()
    seq = 0
    while loop.time() < created + 0.5:  # publish for more than twice the idle timeout
        assert (await publish(http, server, seq, b"a")).status == 200
        seq += 1
    assert server.snapshot(CH) is not None
    assert server.stats.channels_created == 1  # never swept (and re-created) meanwhile
    await server.wait_until(lambda: server.snapshot(CH) is None, timeout=3)


async def test_case29_long_poll_without_headers_outlives_post_keepalives(
    make_trickle_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    server = await make_trickle_server(keepalive_interval=0.05)
    await create(http, server)
    reader = await Raw.open(server.port)
    publisher = await Raw.open(server.port)
    try:
        await reader.request("GET", f"/{CH}/0")
        await server.wait_until(lambda: server.stats.waiting_gets == 1)
        await publisher.request("POST", f"/{CH}/1", "Transfer-Encoding: chunked")
        # No Expect header: each of these is a keepalive, 50 ms apart.
        assert await publisher.read_exactly(3 * len(CONTINUE)) == 3 * CONTINUE
        assert server.stats.waiting_gets == 1
        assert reader.nothing_received()  # 150 ms and more without a header: still a valid poll
        await publish(http, server, 0, b"a")
        status, headers = await reader.read_head()
        assert (status, headers[SEQ.lower()], headers["transfer-encoding"]) == (200, "0", "chunked")
        assert await reader.read_exactly(11) == b"1\r\na\r\n0\r\n\r\n"
        await publisher.send(b"1\r\nb\r\n0\r\n\r\n")
        status, headers = await publisher.read_head()
        assert (status, headers[SEQ.lower()]) == (200, "1")
    finally:
        reader.close()
        publisher.close()


# -- beyond the numbered cases ----------------------------------------------------------------------


async def test_fan_out_many_readers_get_identical_bytes(
    trickle_server: TrickleServer, http: aiohttp.ClientSession
) -> None:
    await create(http, trickle_server)
    readers = [waiting_get(http, trickle_server, 0) for _ in range(50)]
    await trickle_server.wait_until(lambda: trickle_server.stats.waiting_gets == 50)
    pieces = [os.urandom(10_000 + i) for i in range(20)]
    feed = Feed()
    post = stalled_post(http, trickle_server, 0, feed)
    for piece in pieces:
        feed.send(piece)
    feed.end()
    assert (await post).status == 200
    for response, body in await asyncio.gather(*readers):
        assert response.status == 200
        assert body == b"".join(pieces)
    # A reader arriving late gets the pieces in one batch, coalesced into fewer writes.
    response, body = await get(http, trickle_server, 0)
    assert body == b"".join(pieces)


async def test_in_progress_on_a_fresh_channel_waits_for_segment_0(
    trickle_server: TrickleServer, http: aiohttp.ClientSession
) -> None:
    await create(http, trickle_server)
    waiting = waiting_get(http, trickle_server, -2)
    await trickle_server.wait_until(lambda: trickle_server.stats.waiting_gets == 1)
    await publish(http, trickle_server, 0, b"first")
    response, body = await waiting
    assert (response.status, response.headers[SEQ], body) == (200, "0", b"first")
    assert LATEST not in response.headers


async def test_invalid_idx_is_400(trickle_server: TrickleServer, http: aiohttp.ClientSession) -> None:
    await create(http, trickle_server)
    for bad in ("abc", "-3", "1.5"):
        response, body = await get(http, trickle_server, bad)
        assert (response.status, body) == (400, b"Invalid idx"), bad
    for bad_post in ("-2", "x"):  # -2 means "in progress": there is nothing to publish there
        assert (await publish(http, trickle_server, bad_post, b"a")).status == 400


async def test_repost_replaces_segment_content(
    trickle_server: TrickleServer, http: aiohttp.ClientSession
) -> None:
    await publish(http, trickle_server, 0, b"first try")
    await publish(http, trickle_server, 0, b"again")
    response, body = await get(http, trickle_server, 0)
    assert (response.status, body) == (200, b"again")


async def test_requests_whose_client_left_leave_nothing_behind(
    trickle_server: TrickleServer, http: aiohttp.ClientSession
) -> None:
    await create(http, trickle_server)
    reader = waiting_get(http, trickle_server, 0)
    preconnect = stalled_post(http, trickle_server, 1, Feed(), expect100=True)
    stats = trickle_server.stats
    await trickle_server.wait_until(lambda: stats.waiting_gets == 1 and stats.waiting_posts == 1)
    reader.cancel()
    preconnect.cancel()
    await trickle_server.wait_until(lambda: stats.waiting_gets == 0 and stats.waiting_posts == 0)
    await trickle_server.wait_until(
        lambda: (
            segment(trickle_server, 0) == SegmentSnapshot(0, 0, False, 0, 0, False)
            and segment(trickle_server, 1) == SegmentSnapshot(1, 0, False, 0, 0, False)
        )
    )


async def test_second_post_to_a_seq_takes_it_over(
    trickle_server: TrickleServer, http: aiohttp.ClientSession
) -> None:
    await create(http, trickle_server)
    feed = Feed()  # a preconnect that never sends a byte
    first = stalled_post(http, trickle_server, 0, feed, expect100=True)
    await trickle_server.wait_until(lambda: trickle_server.stats.waiting_posts == 1)
    assert (await publish(http, trickle_server, 0, b"second")).status == 200
    released = await first
    assert (released.status, released.headers[SEQ]) == (200, "0")
    assert CLOSED not in released.headers
    feed.end()
    response, body = await get(http, trickle_server, 0)
    assert (response.status, body) == (200, b"second")


async def test_stop_releases_waiters_and_ends_bodies(
    make_trickle_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    server = await make_trickle_server()
    _, upload = await upload_started(http, server, 0, b"live")
    async with http.get(f"{server.channel_url(CH)}/0") as streaming:
        assert await streaming.content.readexactly(4) == b"live"
        waiting = waiting_get(http, server, 1)
        preconnect = stalled_post(http, server, 2, Feed(), expect100=True)
        await server.wait_until(lambda: server.stats.waiting_gets == 1 and server.stats.waiting_posts == 1)
        await server.stop()
        assert await streaming.content.read() == b""
    response, body = await waiting
    assert (response.status, response.headers[CLOSED], body) == (200, CLOSED_VALUE, b"")
    posted = await preconnect
    assert (posted.status, posted.headers[CLOSED]) == (200, CLOSED_VALUE)
    with pytest.raises(aiohttp.ClientError):  # a server that stops drops uploads mid-body
        await upload
    with pytest.raises(aiohttp.ClientConnectionError):
        await get(http, server, 0)


async def test_restart_on_the_same_port(make_trickle_server: MakeServer, http: aiohttp.ClientSession) -> None:
    first = await make_trickle_server()
    await create(http, first)
    waiting = waiting_get(http, first, 0)
    await first.wait_until(lambda: first.stats.waiting_gets == 1)
    await first.stop()
    assert (await waiting)[0].headers[CLOSED] == CLOSED_VALUE
    second = await make_trickle_server(port=first.port)
    assert second.url == first.url
    await publish(http, second, 0, b"again")
    response, body = await get(http, second, 0)
    assert (response.status, body) == (200, b"again")
