"""What every server of the package shares: binding an aiohttp app, and running until signalled."""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # aiohttp is imported where a server starts: the CLI starts without it
    from aiohttp import web


async def bind(
    app: web.Application,
    host: str,
    port: int,
    *,
    site: Callable[[web.AppRunner, str, int], web.BaseSite] | None = None,
    **runner_options: Any,
) -> tuple[web.AppRunner, int, str]:
    """Serve `app` on host:port (0 picks a free port) through `site` (aiohttp's TCPSite unless
    given); returns the runner, the bound port and the base URL. The address is reusable at
    once, so a stopped server's port can be bound again."""
    from aiohttp import web

    runner = web.AppRunner(app, access_log=None, **runner_options)
    await runner.setup()
    try:
        if site is None:
            await web.TCPSite(runner, host, port, reuse_address=True).start()
        else:
            await site(runner, host, port).start()
    except BaseException as error:
        await runner.cleanup()
        if isinstance(error, OSError):
            raise listen_error(host, port, error) from error
        raise
    bound = runner.addresses[0][1]
    return runner, bound, f"http://{url_host(host)}:{bound}"


class ListenError(OSError):
    """A server cannot listen on its address; the message says why in one line."""


def listen_error(host: str, port: int, error: OSError | RuntimeError) -> ListenError:
    """The ListenError for a failed bind to host:port. gRPC reports one as a RuntimeError that
    names no cause: the address is then tried once more here, to tell a port in use from the rest."""
    code = error.errno if isinstance(error, OSError) else _bind_errno(host, port)
    address = f"{url_host(host)}:{port}"
    if code == errno.EADDRINUSE:
        return ListenError(f"port {port} is in use: another process listens on {address}")
    reason = os.strerror(code) if code else str(error)
    return ListenError(f"cannot listen on {address}: {reason}")


def _bind_errno(host: str, port: int) -> int | None:
    """The errno binding host:port fails with now (None: it binds)."""
    try:
        family = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((host, port))
    except OSError as error:
        return error.errno
    return None


def url_host(host: str) -> str:
    """The host as it goes into a URL: wildcard addresses become loopback, IPv6 gets brackets."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


async def until_signalled() -> None:
    """Return on SIGINT or SIGTERM (the handlers are removed again on the way out)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
