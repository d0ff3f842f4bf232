"""What every server of the package shares: binding an aiohttp app, and running until signalled."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

from aiohttp import web


async def bind(
    app: web.Application, host: str, port: int, **runner_options: Any
) -> tuple[web.AppRunner, int, str]:
    """Serve `app` on host:port (0 picks a free port); returns the runner, the bound port and the
    base URL. The address is reusable at once, so a stopped server's port can be bound again."""
    runner = web.AppRunner(app, access_log=None, **runner_options)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, reuse_address=True).start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = runner.addresses[0][1]
    return runner, bound, f"http://{url_host(host)}:{bound}"


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
