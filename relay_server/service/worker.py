"""One worker process of `serve --workers N` (workers.py starts it; not a command of its own).

    python -m relay_server.service.worker OPTIONS_JSON GRPC_SOCKET METRICS_SOCKET

A RelayApp with the node's options (ServeOptions as JSON, the front's own parts left out: no
listening port, TLS or token of its own) serving gRPC and metrics on unix sockets in the front's
private directory. It prints "ready" on stdout once both serve, and drains on SIGTERM like
`serve`, or when its stdin ends: the front is gone (even killed), and so no worker outlives it.
Its logs go to the stderr it shares with the front.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys

from aiohttp import web

from relay_server import eventloop
from relay_server.service.app import RelayApp, ServeOptions
from relay_server.service.logs import configure_logging
from relay_server.service.metrics import metrics_app
from relay_server.service.workers import READY

log = logging.getLogger(__name__)


def worker_options(text: str) -> ServeOptions:
    values = json.loads(text)
    values["allow_hosts"] = frozenset(values["allow_hosts"])
    return ServeOptions(metrics_listen=None, **values)


async def serve_worker(options: ServeOptions, grpc_socket: str, metrics_socket: str) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # stdin is a pipe from the front that it never writes to: it ends when the front does.
    front = asyncio.StreamReader()
    stdin, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(front), sys.stdin)
    watching = asyncio.create_task(_set_at_end(front, stop), name="front watch")
    app = RelayApp(options, address=f"unix:{grpc_socket}")
    await app.start()
    runner = web.AppRunner(metrics_app(app.registry), access_log=None)
    await runner.setup()
    try:
        await web.UnixSite(runner, metrics_socket).start()
        print(READY, flush=True)
        await stop.wait()
        await app.drain()
    finally:
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)
        stdin.close()
        await runner.cleanup()
    return 0


async def _set_at_end(reader: asyncio.StreamReader, event: asyncio.Event) -> None:
    await reader.read()
    event.set()


def main(argv: list[str]) -> int:
    options_text, grpc_socket, metrics_socket = argv
    options = worker_options(options_text)
    configure_logging(options.log_format, options.log_level)
    return eventloop.run(serve_worker(options, grpc_socket, metrics_socket))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
