"""A real relay for the clients to talk to: RelayServer on loopback, a trickle server, the
embedded processor and a live test pattern on the input channel."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from relay_server.media.testsource import publish_pattern
from relay_server.processor import ProcessorServer
from relay_server.trickle import Publisher
from relay_server.trickle.server import TrickleServer
from tests.clients.harness import NODE_CLIENT, SOURCE_FRAMES, Relay, relay_server


@pytest.fixture
async def live_relay(trickle_server: TrickleServer) -> AsyncIterator[Relay]:
    """A relay with a processor and a live 1280x720 pattern on the input channel."""
    async with ProcessorServer() as processor, relay_server(trickle_server, processor.url) as relay:
        source = Publisher(relay.input_url())
        await source.create_channel()
        publishing = asyncio.create_task(publish_pattern(source, 1280, 720, frames=SOURCE_FRAMES))
        try:
            yield relay
        finally:
            await relay.server.drain(grace=1.0)  # sessions first, while the source still runs
            publishing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await publishing
            await source.close()


@pytest.fixture
async def bare_relay(trickle_server: TrickleServer) -> AsyncIterator[Relay]:
    """A relay with no media behind it: enough for errors and empty listings."""
    async with relay_server(trickle_server) as relay:
        yield relay


@pytest.fixture(scope="session")
def node_client() -> Iterator[Path]:
    """clients/node with its dependencies installed (`npm ci` once, when node_modules is missing
    or older than package-lock.json: `make test` has normally done it already)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are needed for the Node.js client test")
    modules, lock = NODE_CLIENT / "node_modules", NODE_CLIENT / "package-lock.json"
    if not modules.is_dir() or modules.stat().st_mtime < lock.stat().st_mtime:
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=NODE_CLIENT,
            capture_output=True,
            text=True,
            timeout=180,
        )
        if done.returncode != 0:
            pytest.skip(f"npm ci failed in {NODE_CLIENT} (registry unreachable?): {done.stderr[-500:]}")
        modules.touch()  # as the Makefile's rule does: newer than the lock file
    yield NODE_CLIENT
