"""Fuzzing the embedded trickle server's request handling with hypothesis, over real sockets.

Each example starts a server with small limits (so refusals happen), opens a few connections at once
and sends each one's requests in turn: arbitrary methods and paths, trickle and framing headers,
bodies whole, chunked, malformed or cut short, and ends each connection normally, abruptly (a reset)
or in the middle of a request. What must hold:
- no 5xx but the deliberate ones: 503 with Retry-After (a limit), and 500 for an upload whose body
  cannot be decoded (the reference's answer to a broken upload);
- no hang: every complete, well-framed request is answered or visibly waiting (a GET long-poll),
  and once the clients are gone the server holds no connection and no waiting request;
- nothing logged as an error;
- the buffered-bytes account never passes its budget and is back to zero once the server lets go.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay_server.trickle.limits import TrickleLimits
from relay_server.trickle.server import TrickleServer

LIMITS = TrickleLimits(
    max_segment_bytes=2048,
    max_buffered_bytes=6144,
    max_channels=3,
    max_connections=2,
    header_timeout=5.0,
    first_byte_timeout=5.0,
)
HANG = 10  # seconds after which an example counts as hung (a guard, not a measurement)
BROKEN_ENCODINGS = ("gzip", "deflate")


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: tuple[tuple[str, str], ...]
    body: tuple[str, bytes | tuple[bytes, ...]] | None  # (framing, content)
    cut_at: int | None  # send only this many bytes, then reset the connection

    def encode(self) -> bytes:
        head = [f"{self.method} {self.path} HTTP/1.1", "Host: fuzz"]
        head += [f"{name}: {value}" for name, value in self.headers]
        payload = b""
        if self.body is not None:
            framing, content = self.body
            if framing == "length":
                assert isinstance(content, bytes)
                head.append(f"Content-Length: {len(content)}")
                payload = content
            elif framing == "short":  # declares more than it sends
                assert isinstance(content, bytes)
                head.append(f"Content-Length: {len(content) + 10}")
                payload = content
            elif framing == "chunked":
                assert isinstance(content, tuple)
                head.append("Transfer-Encoding: chunked")
                payload = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in content if c) + b"0\r\n\r\n"
            else:  # "garbage": framing the server cannot parse
                assert isinstance(content, bytes)
                head.append("Transfer-Encoding: chunked")
                payload = content
        return "\r\n".join([*head, "", ""]).encode("latin-1") + payload

    @property
    def may_stall(self) -> bool:
        """The server may wait for bytes that never come, without a waiting request to show for it."""
        return self.cut_at is not None or (self.body is not None and self.body[0] in ("short", "garbage"))

    @property
    def may_fail_upload(self) -> bool:
        """A body aiohttp cannot decode: the upload breaks, which the reference answers 500."""
        encodings = {value.strip().lower() for name, value in self.headers if name == "Content-Encoding"}
        return self.body is not None and bool(encodings & set(BROKEN_ENCODINGS))


@dataclass(frozen=True)
class Script:
    requests: tuple[Request, ...]
    ending: str  # "close" or "reset"


header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=12)
# Mostly requests a trickle client could send to a few channels (so segments, rings and limits get
# exercised), some anything but.
channels = st.sampled_from(
    ["ch"] * 8 + ["ch2"] * 4 + ["ch3", "ch4", "a%20b", "%ZZ", "..", "x" * 200, "%C3%A9", "-1"]
)
seqs = st.one_of(
    st.integers(-3, 7).map(str),
    st.integers(-3, 7).map(str),
    st.sampled_from(["next", "-1", "-2", "-4", "abc", "", "99999999999999999999", "01", "+1", "%20"]),
)
paths = st.one_of(
    st.builds(lambda ch, seq: f"/{ch}/{seq}", channels, seqs),
    st.builds(lambda ch, seq: f"/{ch}/{seq}", channels, seqs),
    st.builds(lambda ch: f"/{ch}", channels),
    st.sampled_from(["/", "*", "/ch/0/extra", "/ch/0?x=1", "http://fuzz/ch/0", "//ch//0"]),
)
headers = st.lists(
    st.one_of(
        st.tuples(st.just("Lp-Trickle-Seq"), st.one_of(seqs, header_text)),
        st.tuples(st.just("Lp-Trickle-Reset"), st.sampled_from(["1", "0", "", "yes"])),
        st.tuples(st.just("Expect-Content"), st.sampled_from(["video/MP2T", "application/json", ""])),
        st.tuples(st.just("Content-Type"), header_text),
        st.tuples(st.just("Expect"), st.sampled_from(["100-continue", "nonsense"])),
        st.tuples(st.just("Content-Encoding"), st.sampled_from([*BROKEN_ENCODINGS, "identity", "x"])),
        st.tuples(st.just("Connection"), st.sampled_from(["close", "keep-alive", "upgrade"])),
        st.tuples(header_text.filter(lambda t: t.isalnum()), header_text),
    ),
    max_size=4,
)
# Small arbitrary bytes, or pieces big enough that a few pass the segment and buffer bounds.
pieces = st.one_of(st.binary(max_size=64), st.integers(300, 1500).map(lambda n: b"v" * n))
bodies = st.one_of(
    st.none(),
    st.tuples(st.just("length"), st.lists(pieces, max_size=2).map(b"".join)),
    st.tuples(st.just("chunked"), st.lists(pieces, max_size=4).map(tuple)),
    st.tuples(st.just("chunked"), st.lists(pieces, max_size=4).map(tuple)),
    st.tuples(st.just("short"), st.binary(max_size=100)),
    st.tuples(st.just("garbage"), st.binary(max_size=40)),
)
requests = st.builds(
    Request,
    method=st.sampled_from(["GET"] * 3 + ["POST"] * 5 + ["DELETE", "PUT", "HEAD", "OPTIONS", "BREW"]),
    path=paths,
    headers=headers.map(tuple),
    body=bodies,
    cut_at=st.one_of(*[st.none()] * 5, st.integers(0, 200)),
)
scripts = st.builds(
    Script,
    requests=st.lists(requests, min_size=1, max_size=6).map(tuple),
    ending=st.sampled_from(["close", "reset"]),
)
examples = st.lists(scripts, min_size=1, max_size=3)


class _Errors(logging.Handler):
    """Every record logged as an error, or with an exception, by anyone."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR or record.exc_info:
            self.records.append(record)


@contextlib.contextmanager
def errors_logged() -> Iterator[_Errors]:
    handler = _Errors()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)


def reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def read_final_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    """The next answer's status and headers, skipping interim `100 Continue`s."""
    while True:
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split()[1])
        if status >= 200:
            fields = (line.split(":", 1) for line in lines if ":" in line)
            return status, {name.strip().lower(): value.strip() for name, value in fields}


def check_status(request: Request, status: int, headers: dict[str, str]) -> None:
    if status == 503:
        assert "retry-after" in headers, f"503 without Retry-After for {request}"
    elif status >= 500:
        assert status == 500 and request.may_fail_upload, f"{status} for {request}"


async def run_script(server: TrickleServer, script: Script) -> None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    except ConnectionError:
        return  # refused beyond the lingering refusals
    stats = server.stats
    try:
        for request in script.requests:
            data = request.encode()
            if request.cut_at is not None:
                writer.write(data[: request.cut_at])
                await writer.drain()
                reset(writer)
                return
            # A request with all its bytes sent is answered, or it is a GET long-polling. (A POST
            # counts as waiting only until its body, which is all there, is read.)
            long_polls = stats.waiting_gets
            writer.write(data)
            await writer.drain()
            if request.may_stall:
                break
            answer = asyncio.ensure_future(read_final_head(reader))
            waiting = asyncio.ensure_future(
                server.wait_until(lambda polls=long_polls: stats.waiting_gets > polls, HANG)
            )
            done, _ = await asyncio.wait((answer, waiting), return_when=asyncio.FIRST_COMPLETED)
            for task in (answer, waiting):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await waiting
            if answer not in done or answer.cancelled():
                assert waiting in done and not waiting.cancelled(), f"no answer and not waiting: {request}"
                break  # a long-poll: nothing more can go on this connection
            status, response_headers = answer.result()
            check_status(request, status, response_headers)
            length = response_headers.get("content-length")
            if length is None or request.method == "HEAD":
                break  # streamed (a segment) or with no body to skip: this connection is done
            await reader.readexactly(int(length))
            if response_headers.get("connection", "").lower() == "close":
                break
    except (ConnectionError, asyncio.IncompleteReadError):
        pass  # the server ended the connection (a refusal, a malformed request): allowed
    finally:
        if not writer.transport.is_closing():
            if script.ending == "reset":
                reset(writer)
            else:
                writer.close()


async def run_example(examples: list[Script]) -> None:
    async with TrickleServer(limits=LIMITS) as server:
        budget = LIMITS.max_buffered_bytes
        async with asyncio.timeout(HANG):
            await asyncio.gather(*(run_script(server, script) for script in examples))
            assert server.buffered_bytes <= budget
            stats = server.stats
            await server.wait_until(
                lambda: server.connections == 0 and stats.waiting_gets == 0 and stats.waiting_posts == 0, HANG
            )
        assert 0 <= server.buffered_bytes <= budget
    assert server.buffered_bytes == 0  # stopped: every segment let go


def fuzz(examples: list[Script]) -> None:
    with errors_logged() as errors:
        asyncio.run(run_example(examples))
    assert not errors.records, [record.getMessage() for record in errors.records]


@settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(examples)
def test_fuzz_requests(examples: list[Script]) -> None:
    fuzz(examples)


@pytest.mark.slow
@pytest.mark.timeout(900)
@settings(max_examples=5000, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(examples)
def test_fuzz_requests_long(examples: list[Script]) -> None:
    fuzz(examples)
