"""A TCP proxy in front of a real trickle server that breaks chosen requests.

Our own server is correct, so the failures a client must survive (a 500, a reset connection,
an upload or a download cut midway) are injected here, on the wire, between real peers.
Clients must use one connection per request (`aiohttp.TCPConnector(force_close=True)`):
the proxy reads only the first request head of each connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field


@dataclass
class Rule:
    method: str
    path: str
    action: str  # "reset" | "status" | "cut_request" | "cut_response"
    count: int = 1
    status: int = 500
    after: int = 0  # bytes passed before a cut


@dataclass
class FaultProxy:
    upstream_port: int
    requests: list[tuple[str, str]] = field(default_factory=list)
    _rules: list[Rule] = field(default_factory=list)
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    def add(
        self, method: str, path: str, action: str, *, count: int = 1, status: int = 500, after: int = 0
    ) -> None:
        self._rules.append(Rule(method, path, action, count, status, after))

    def _match(self, method: str, path: str) -> Rule | None:
        for rule in self._rules:
            if rule.method == method and rule.path == path and rule.count != 0:
                rule.count -= 1
                return rule
        return None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        method, path, _ = head.split(b" ", 2)
        request = (method.decode(), path.decode())
        self.requests.append(request)
        rule = self._match(*request)
        if rule is not None and rule.action == "reset":
            _abort(writer)
            return
        if rule is not None and rule.action == "status":
            writer.write(
                f"HTTP/1.1 {rule.status} Injected\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode()
            )
            await writer.drain()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        try:
            up_writer.write(head)
            cut_request = rule.after if rule is not None and rule.action == "cut_request" else None
            cut_response = rule.after if rule is not None and rule.action == "cut_response" else None
            upload = asyncio.create_task(_pipe(reader, up_writer, cut_request))
            download = asyncio.create_task(_pipe(up_reader, writer, cut_response))
            done, _ = await asyncio.wait({upload, download}, return_when=asyncio.FIRST_COMPLETED)
            cut = any(t.result() for t in done if not t.cancelled() and t.exception() is None)
            if cut:
                upload.cancel()
                download.cancel()
                _abort(writer)
                _abort(up_writer)
            else:
                await asyncio.gather(upload, download, return_exceptions=True)
        finally:
            with contextlib.suppress(Exception):
                up_writer.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, cut_after: int | None) -> bool:
    """Copy until EOF; return True when the copy was cut after `cut_after` bytes."""
    passed = 0
    while data := await reader.read(65536):
        if cut_after is not None and passed + len(data) >= cut_after:
            writer.write(data[: cut_after - passed])
            await writer.drain()
            return True
        passed += len(data)
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof():
        writer.write_eof()
    return False


def _abort(writer: asyncio.StreamWriter) -> None:
    transport = writer.transport
    if not transport.is_closing():
        transport.abort()
