"""A server that answers every request with a redirect, and the server it points at.

Both are real aiohttp servers on loopback. The redirect target listens on 127.0.0.2 (all of
127.0.0.0/8 is loopback on Linux), so that an allow-list naming 127.0.0.1 does not name it: it
is a host the relay must never reach, and it records every request it gets.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web

FORBIDDEN_HOST = "127.0.0.2"
# What the forbidden host answers: it must never show up in what the relay reports.
FORBIDDEN_BODY = "answer of the forbidden host"


@dataclass
class Recorder:
    """Answers 200 with FORBIDDEN_BODY to anything; `requests` lists (method, path) as received."""

    url: str = ""
    requests: list[tuple[str, str]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.method, request.path))
        return web.Response(text=FORBIDDEN_BODY)


@dataclass
class Redirector:
    """Answers 307 to anything, pointing at the same path on `target`; `requests` as received."""

    target: str
    url: str = ""
    requests: list[tuple[str, str]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.method, request.path))
        return web.Response(
            status=307, headers={"Location": self.target + request.path_qs}, text="redirect body"
        )


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def _serve(handler: Handler, host: str) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, host, 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://{host}:{port}"


@contextlib.asynccontextmanager
async def redirect_pair() -> AsyncIterator[tuple[Redirector, Recorder]]:
    """A Redirector on 127.0.0.1 pointing at a Recorder on FORBIDDEN_HOST."""
    recorder = Recorder()
    target, recorder.url = await _serve(recorder.handle, FORBIDDEN_HOST)
    redirector = Redirector(recorder.url)
    try:
        source, redirector.url = await _serve(redirector.handle, "127.0.0.1")
        try:
            yield redirector, recorder
        finally:
            await source.cleanup()
    finally:
        await target.cleanup()
