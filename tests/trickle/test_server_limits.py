"""The embedded trickle server's limits (trickle/limits.py): each bound is refused with its status and
frees what the request held; floods of uploads, channels and half-open connections leave the server
within its budget and serving others.

Memory is measured by the server's own account of buffered segment bytes (`buffered_bytes`), which
every segment byte goes through. Timeouts are set small through the limits; tests wait on server
events (`wait_until`) or on the socket, never on sleeps. `asyncio.timeout` only guards against a
hang, which is how the code without limits fails these tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from relay_server import settings
from relay_server.cli import _trickle_limits as limits_from_args
from relay_server.cli import build_parser
from relay_server.trickle.limits import TrickleLimits
from relay_server.trickle.server import TrickleServer
from tests.trickle.test_server import Raw

MakeServer = Callable[..., Awaitable[TrickleServer]]
KiB = 1024
HANG = 30  # seconds after which a test counts as hung (a guard, not a measurement)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        yield session


async def limited(make_trickle_server: MakeServer, **limits: Any) -> TrickleServer:
    return await make_trickle_server(limits=TrickleLimits(**limits))


async def publish(http: aiohttp.ClientSession, url: str, body: bytes) -> aiohttp.ClientResponse:
    async with http.post(url, data=body) as response:
        await response.read()
        return response


async def serves_normally(
    server: TrickleServer, http: aiohttp.ClientSession, channel: str = "normal"
) -> None:
    """Another client's publish and subscribe of one segment work end to end."""
    url = server.channel_url(channel)
    async with http.post(url) as created:
        assert created.status == 200
    reader = asyncio.create_task(http.get(f"{url}/0"))
    await server.wait_until(lambda: (s := server.snapshot(channel)) is not None and 0 in s.segments)
    assert (await publish(http, f"{url}/0", b"frame" * 100)).status == 200
    async with await reader as response:
        assert (response.status, await response.read()) == (200, b"frame" * 100)


async def chunked_post(raw: Raw, path: str) -> None:
    await raw.request("POST", path, "Transfer-Encoding: chunked")


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def answered(raw: Raw) -> bool:
    return not raw.nothing_received()


# -- each bound -------------------------------------------------------------------------------------


async def test_a_segment_over_its_bound_is_413_and_its_bytes_are_freed(
    make_trickle_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    server = await limited(make_trickle_server, max_segment_bytes=64 * KiB)
    url = server.channel_url("ch")
    publisher = await Raw.open(server.port)
    await chunked_post(publisher, "/ch/0")
    piece = b"x" * (16 * KiB)
    await publisher.send(chunk(piece))
    await server.wait_until(lambda: server.buffered_bytes == len(piece))
    async with http.get(f"{url}/0") as reader, asyncio.timeout(HANG):
        sent = len(piece)
        while not answered(publisher) and sent <= 8 * 64 * KiB:
            await publisher.send(chunk(piece))
            sent += len(piece)
            assert server.buffered_bytes <= 64 * KiB
        status, headers = await publisher.read_head()
        assert (status, headers["connection"]) == (413, "close")
        publisher.close()
        await server.wait_until(lambda: server.buffered_bytes == 0)
        # The reader gets the bytes written before the refusal and then a clean end, not a hang.
        body = await reader.read()
        assert reader.status == 200 and set(body) == {ord("x")} and len(body) <= 64 * KiB
    snapshot = server.snapshot("ch")
    assert snapshot is not None
    assert (snapshot.segments[0].size, snapshot.segments[0].closed) == (0, True)
    assert server.stats.refusals["segment_too_large"] == 1
    assert (await publish(http, f"{url}/1", b"y" * 64 * KiB)).status == 200  # exactly the bound fits
    assert server.buffered_bytes == 64 * KiB


async def test_buffers_over_the_budget_are_503_with_retry_after_and_freed(
    make_trickle_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    server = await limited(make_trickle_server, max_buffered_bytes=100 * KiB)
    first = server.channel_url("first")
    assert (await publish(http, f"{first}/0", b"a" * 80 * KiB)).status == 200
    # A segment that would take the server past its budget mid-body: refused, its bytes given back.
    async with http.post(f"{server.channel_url('second')}/0", data=b"b" * 40 * KiB) as refused:
        assert (refused.status, refused.headers["Retry-After"]) == (503, "1")
    assert server.buffered_bytes == 80 * KiB
    assert (await publish(http, f"{first}/1", b"a" * 20 * KiB)).status == 200  # exactly the budget
    # With nothing left, a POST is refused before it takes anything, even a slot.
    async with http.post(f"{first}/2", data=b"c") as refused:
        assert (refused.status, refused.headers["Retry-After"]) == (503, "1")
    snapshot = server.snapshot("first")
    assert snapshot is not None and sorted(snapshot.segments) == [0, 1]
    assert server.stats.refusals["buffers"] == 2
    async with http.delete(first) as deleted:
        assert deleted.status == 200
    assert server.buffered_bytes == 0
    await serves_normally(server, http)


async def test_channels_over_the_bound_are_503_with_retry_after(
    make_trickle_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    server = await limited(make_trickle_server, max_channels=3)
    for name in ("c0", "c1", "c2"):
        async with http.post(server.channel_url(name)) as created:
            assert created.status == 200
    async with http.post(server.channel_url("c3")) as refused:
        assert (refused.status, refused.headers["Retry-After"]) == (503, "1")
    async with http.post(f"{server.channel_url('c4')}/0", data=b"auto-created") as refused:
        assert (refused.status, refused.headers["Retry-After"]) == (503, "1")
    async with http.post(server.channel_url("c0")) as existing:  # not a new channel: fine
        assert existing.status == 200
    assert (server.channels, server.stats.refusals["channels"], server.buffered_bytes) == (3, 2, 0)
    async with http.delete(server.channel_url("c0")) as deleted:
        assert deleted.status == 200
    await serves_normally(server, http)


async def test_connections_over_the_bound_are_429_and_closed(make_trickle_server: MakeServer) -> None:
    server = await limited(make_trickle_server, max_connections=2)
    holders = [await Raw.open(server.port) for _ in range(2)]
    await server.wait_until(lambda: server.connections == 2)
    extra = await Raw.open(server.port)
    await extra.request("GET", "/ch/next")
    async with asyncio.timeout(HANG):
        status, headers = await extra.read_head()
        assert (status, headers["retry-after"], headers["connection"]) == (429, "1", "close")
        assert await extra.read_to_eof() == b"Too many connections"
    extra.close()
    assert (server.connections, server.stats.refusals["connections"]) == (2, 1)
    holders.pop().close()
    await server.wait_until(lambda: server.connections == 1)
    admitted = await Raw.open(server.port)
    await admitted.request("GET", "/ch/next")
    async with asyncio.timeout(HANG):
        assert (await admitted.read_head())[0] == 404
    for raw in (*holders, admitted):
        raw.close()


async def test_a_connection_without_a_complete_head_is_closed(make_trickle_server: MakeServer) -> None:
    server = await limited(make_trickle_server, header_timeout=0.2)
    silent = await Raw.open(server.port)
    slow = await Raw.open(server.port)
    await slow.send(b"GET /ch/next HTTP/1.1\r\nHost: te")  # never finishes its head
    idle = await Raw.open(server.port)  # answered once, then kept alive with nothing more
    await idle.request("GET", "/ch/next")
    async with asyncio.timeout(HANG):
        assert (await idle.read_head())[0] == 404
        for raw in (silent, slow, idle):
            assert await raw.read_to_eof() in (b"", b"Stream not found")  # closed, no answer to a head
    await server.wait_until(lambda: server.connections == 0)
    for raw in (silent, slow, idle):
        raw.close()


async def test_a_post_without_a_first_byte_is_408_and_closed(make_trickle_server: MakeServer) -> None:
    server = await limited(make_trickle_server, first_byte_timeout=0.2)
    publisher = await Raw.open(server.port)
    await chunked_post(publisher, "/ch/0")  # the head, then nothing
    async with asyncio.timeout(HANG):
        status, headers = await publisher.read_head()
        assert (status, headers["connection"]) == (408, "close")
        await publisher.read_to_eof()
    publisher.close()
    await server.wait_until(lambda: server.stats.waiting_posts == 0 and server.connections == 0)
    assert server.stats.refusals["first_byte_timeout"] == 1


async def test_a_vanished_publisher_holds_its_segment_until_the_ring_lets_go(
    trickle_server: TrickleServer, http: aiohttp.ClientSession
) -> None:
    server = trickle_server
    publisher = await Raw.open(server.port)
    await chunked_post(publisher, "/ch/0")
    await publisher.send(chunk(b"x" * 1000))
    await server.wait_until(lambda: server.buffered_bytes == 1000)
    publisher.close()  # gone mid-segment: the segment stays open in the ring, as in the reference
    await server.wait_until(lambda: server.connections == 0)
    assert server.buffered_bytes == 1000
    url = server.channel_url("ch")
    for seq in range(1, 5):
        assert (await publish(http, f"{url}/{seq}", b"s" * 10)).status == 200
    assert server.buffered_bytes == 1040
    assert (await publish(http, f"{url}/5", b"s" * 10)).status == 200  # reuses segment 0's slot
    assert server.buffered_bytes == 50


async def test_an_evicted_segment_is_freed_when_its_last_reader_leaves(
    trickle_server: TrickleServer, http: aiohttp.ClientSession
) -> None:
    server = trickle_server
    url = server.channel_url("ch")
    # More than loopback socket buffers take: the reader's request stays in the server until read.
    body = b"r" * (32 * 1024 * KiB)
    assert (await publish(http, f"{url}/0", body)).status == 200
    async with http.get(f"{url}/0") as slow:
        assert await slow.content.readexactly(1) == b"r"
        for seq in range(1, 6):  # segment 0 leaves the ring while it is read
            assert (await publish(http, f"{url}/{seq}", b"s")).status == 200
        assert server.buffered_bytes == len(body) + 5
        assert await slow.read() == body[1:]
    await server.wait_until(lambda: server.buffered_bytes == 5)


async def test_a_replaced_segment_gives_its_bytes_back(
    trickle_server: TrickleServer, http: aiohttp.ClientSession
) -> None:
    url = trickle_server.channel_url("ch")
    assert (await publish(http, f"{url}/0", b"a" * 1000)).status == 200
    assert (await publish(http, f"{url}/0", b"b" * 10)).status == 200
    assert trickle_server.buffered_bytes == 10
    async with http.delete(url) as deleted:
        assert deleted.status == 200
    assert trickle_server.buffered_bytes == 0


def test_the_defaults_take_the_relays_own_traffic() -> None:
    # 16 sessions of 1080p at 8 Mbit/s with 4 s segments: an input and an output channel with a full
    # ring each, control and events channels, and about a dozen connections per session.
    limits = TrickleLimits()
    sessions, segment = 16, 8_000_000 // 8 * 4
    assert limits.max_segment_bytes >= 4 * segment
    assert limits.max_buffered_bytes >= sessions * 2 * 5 * segment
    assert limits.max_channels >= sessions * 4
    assert limits.max_connections >= sessions * 12


# -- floods -----------------------------------------------------------------------------------------


async def test_a_never_ending_upload_stays_within_the_budget(
    make_trickle_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    server = await limited(make_trickle_server, max_segment_bytes=1024 * KiB, max_buffered_bytes=4096 * KiB)
    flood = await Raw.open(server.port)
    await chunked_post(flood, "/flood/0")
    piece = chunk(b"z" * (64 * KiB))
    async with asyncio.timeout(HANG):
        for _ in range(16 * 16):  # 16 MiB, 16 times the segment bound, and it would go on
            await flood.send(piece)
            assert server.buffered_bytes <= 1024 * KiB
        status, _ = await flood.read_head()
    assert status == 413
    await server.wait_until(lambda: server.buffered_bytes == 0)
    await serves_normally(server, http)
    flood.close()
    await serves_normally(server, http, "after")
    assert server.buffered_bytes == len(b"frame" * 100) * 2


async def test_forty_thousand_channel_creations_stay_within_the_bound(
    make_trickle_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    server = await limited(make_trickle_server, max_channels=100)
    creations = 40_000
    per_connection = creations // 8
    statuses: list[int] = []

    async def create_many(first: int) -> None:
        # Pipelined on one connection: the server reads and answers them in order.
        raw = await Raw.open(server.port)
        requests = (
            f"POST /flood{n} HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n".encode()
            for n in range(first, first + per_connection)
        )
        writer = asyncio.create_task(raw.send(b"".join(requests)))
        for _ in range(per_connection):
            status, headers = await raw.read_head()
            await raw.read_exactly(int(headers["content-length"]))
            statuses.append(status)
        await writer
        raw.close()

    async with asyncio.timeout(HANG * 4):
        await asyncio.gather(*(create_many(i * per_connection) for i in range(8)))
    assert (statuses.count(200), statuses.count(503), len(statuses)) == (100, creations - 100, creations)
    assert server.channels == 100 and server.stats.channels_created == 100
    # Refused for channels, not for want of serving: an existing channel still publishes.
    assert (await publish(http, f"{server.channel_url('flood7')}/0", b"ok")).status == 200
    async with http.delete(server.channel_url("flood7")) as deleted:
        assert deleted.status == 200
    await serves_normally(server, http)


def _raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < needed:
        pytest.skip(f"needs {needed} file descriptors, the hard limit is {hard}")


async def test_three_thousand_half_open_connections_are_bounded_and_timed_out(
    make_trickle_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    # 3000 client sockets, and on the server side at most 1000 admitted plus 1000 lingering
    # refusals: 5000 descriptors with room to spare.
    attempts, limit = 3000, 1000
    _raise_fd_limit(8192)
    # The header timeout is long enough for the flood (about 0.5 s here) to fill every slot first.
    server = await limited(make_trickle_server, max_connections=limit, header_timeout=2.0)
    loop = asyncio.get_running_loop()
    clients: list[socket.socket] = []

    async def connect() -> None:
        sock = socket.socket()
        sock.setblocking(False)
        clients.append(sock)
        await loop.sock_connect(sock, ("127.0.0.1", server.port))
        with contextlib.suppress(ConnectionError):  # a refusal beyond the lingering ones resets
            await loop.sock_sendall(sock, b"GET /ch/next HTTP/1.1\r\nHost: t")  # and never more

    admission = server.admission
    refused = server.stats.refusals
    try:
        async with asyncio.timeout(HANG):
            for _ in range(0, attempts, 100):  # no more at once than the listen backlog takes
                await asyncio.gather(*(connect() for _ in range(100)))
                assert server.connections <= limit
            await server.wait_until(lambda: admission.accepted + refused["connections"] == attempts)
            # Slots freed by the header timeout during the flood may have been taken again.
            assert admission.peak == limit and refused["connections"] >= attempts - 2 * limit
            await server.wait_until(lambda: server.connections == 0)  # the header timeout ends them
        await serves_normally(server, http)
    finally:
        for sock in clients:
            sock.close()


# -- configuration ----------------------------------------------------------------------------------


def test_every_limit_has_a_flag_and_a_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    variables = {
        "TRICKLE_MAX_SEGMENT_BYTES": "1000",
        "TRICKLE_MAX_BUFFERED_BYTES": "2000",
        "TRICKLE_MAX_CHANNELS": "3",
        "TRICKLE_MAX_CONNECTIONS": "4",
        "TRICKLE_HEADER_TIMEOUT": "5.5",
        "TRICKLE_FIRST_BYTE_TIMEOUT": "6.5",
    }
    for name in variables:
        monkeypatch.delenv(name, raising=False)
    assert limits_from_args(build_parser().parse_args(["trickle-server"])) == TrickleLimits()
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    from_env = TrickleLimits(1000, 2000, 3, 4, 5.5, 6.5)
    assert limits_from_args(build_parser().parse_args(["trickle-server"])) == from_env
    flags = ["--max-segment-bytes", "10", "--max-buffered-bytes", "20", "--max-channels", "30"]
    flags += ["--max-connections", "40", "--header-timeout", "50", "--first-byte-timeout", "60"]
    parsed = limits_from_args(build_parser().parse_args(["trickle-server", *flags]))
    assert parsed == TrickleLimits(10, 20, 30, 40, 50.0, 60.0)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("TRICKLE_MAX_SEGMENT_BYTES", "lots", "expected an integer"),
        ("TRICKLE_MAX_CHANNELS", "0", "at least 1"),
        ("TRICKLE_HEADER_TIMEOUT", "0", "more than 0"),
        ("TRICKLE_FIRST_BYTE_TIMEOUT", "inf", "finite"),
    ],
)
def test_a_bad_limit_names_its_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    monkeypatch.setenv(name, value)
    field = name.removeprefix("TRICKLE_").lower()
    with pytest.raises(ValueError, match=f"{name}: .*{message}"):
        settings.trickle_limit(field, getattr(TrickleLimits(), field))


def test_a_bad_limit_flag_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["trickle-server", "--max-connections", "0"])
    assert exit_.value.code == 2
    assert "--max-connections: must be at least 1" in capsys.readouterr().err
