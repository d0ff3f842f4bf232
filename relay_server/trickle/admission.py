"""Connection admission for an aiohttp server: at most `limit` open connections; more are answered
`429 Too Many Requests` and closed.

aiohttp has no connection limit of its own, so this is an aiohttp site (the part that listens) whose
protocol factory counts connections around aiohttp's own request handler.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

from aiohttp import web

TOO_MANY = (
    b"HTTP/1.1 429 Too Many Requests\r\n"
    b"Retry-After: 1\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: 20\r\n"
    b"Connection: close\r\n"
    b"\r\n"
    b"Too many connections"
)


class Admission:
    """Counts the connections: open now (`admitted`), the most open at once (`peak`) and admitted
    since the start (`accepted`). `on_change` hears of every change of the count and `on_refused`
    of every connection turned away."""

    def __init__(
        self,
        limit: int,
        refusal_linger: float,
        *,
        on_change: Callable[[], None],
        on_refused: Callable[[], None],
    ) -> None:
        self.limit = limit
        self.admitted = 0
        self.peak = 0
        self.accepted = 0
        self._linger = refusal_linger
        self._refusing: set[_Refusal] = set()
        self._on_change = on_change
        self._on_refused = on_refused

    def protocol(self, make_handler: Callable[[], asyncio.Protocol]) -> asyncio.Protocol:
        return _Admitted(self, make_handler)

    def close(self) -> None:
        """Drop the connections still being refused (the admitted ones belong to aiohttp)."""
        for refusal in list(self._refusing):
            refusal.abort()

    def _admit(self) -> bool:
        if self.admitted >= self.limit:
            self._on_refused()
            return False
        self.admitted += 1
        self.accepted += 1
        self.peak = max(self.peak, self.admitted)
        self._on_change()
        return True

    def _leave(self) -> None:
        self.admitted -= 1
        self._on_change()


class _Admitted(asyncio.Protocol):
    """Decides at connect time: aiohttp's handler serves the connection, or a refusal answers it."""

    __slots__ = ("_admission", "_admitted", "_inner", "_make_handler")

    def __init__(self, admission: Admission, make_handler: Callable[[], asyncio.Protocol]) -> None:
        self._admission = admission
        self._make_handler = make_handler
        self._inner: asyncio.Protocol | None = None
        self._admitted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._admitted = self._admission._admit()
        if self._admitted:
            self._inner = self._make_handler()
        else:
            self._inner = _Refusal(self._admission, cast(asyncio.Transport, transport))
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._inner is not None:
            self._inner.connection_lost(exc)
        if self._admitted:
            self._admitted = False
            self._admission._leave()

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()


class _Refusal(asyncio.Protocol):
    """Answers 429 at once, then reads and drops whatever the client sends until it closes (or the
    linger ends): closing with its request unread would reset the connection, and the client could
    lose the answer. At most `limit` refusals linger; beyond that a connection is dropped unanswered,
    so refusing never holds more than the limit again."""

    def __init__(self, admission: Admission, transport: asyncio.Transport) -> None:
        self._admission = admission
        self._transport = transport
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        admission = self._admission
        if len(admission._refusing) >= admission.limit:
            self._transport.abort()
            return
        admission._refusing.add(self)
        self._transport.write(TOO_MANY)
        if self._transport.can_write_eof():
            self._transport.write_eof()
        self._timer = asyncio.get_running_loop().call_later(admission._linger, self._transport.abort)

    def data_received(self, data: bytes) -> None:
        pass  # the request is not served

    def eof_received(self) -> bool:
        return False  # the client is done: close

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._admission._refusing.discard(self)

    def abort(self) -> None:
        self._transport.abort()


class AdmissionSite(web.BaseSite):
    """A TCP site (like aiohttp's TCPSite) whose connections pass through `admission`."""

    __slots__ = ("_admission", "_host", "_port")

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *, admission: Admission) -> None:
        super().__init__(runner)
        self._host = host
        self._port = port
        self._admission = admission

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        handlers = self._runner.server
        assert handlers is not None  # the runner is set up before its sites start
        self._server = await asyncio.get_running_loop().create_server(
            lambda: self._admission.protocol(handlers),
            self._host,
            self._port,
            reuse_address=True,
            backlog=self._backlog,
        )

    async def stop(self) -> None:
        await super().stop()
        self._admission.close()
