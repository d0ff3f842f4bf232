"""Fixtures shared by every test package: embedded trickle servers and processors on ephemeral ports."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from relay_server.processor import Knobs, ProcessorServer
from relay_server.trickle.server import TrickleServer


@pytest.fixture
async def trickle_server() -> AsyncIterator[TrickleServer]:
    """A started server with auto-create on, stopped after the test."""
    async with TrickleServer(autocreate=True) as server:
        yield server


@pytest.fixture
async def make_trickle_server() -> AsyncIterator[Callable[..., Awaitable[TrickleServer]]]:
    """A factory: `await make_trickle_server(autocreate=False, idle_timeout=0.2, port=...)` returns a
    started server (any TrickleServer argument); every server it made is stopped at teardown."""
    servers: list[TrickleServer] = []

    async def make(**kwargs: Any) -> TrickleServer:
        server = TrickleServer(**kwargs)
        await server.start()
        servers.append(server)
        return server

    yield make
    for server in reversed(servers):
        await server.stop()


@pytest.fixture
async def make_processor() -> AsyncIterator[Callable[..., Awaitable[ProcessorServer]]]:
    """`await make_processor(max_fps=10, port=...)`: a started embedded processor with those knobs;
    every one it made is stopped at teardown."""
    servers: list[ProcessorServer] = []

    async def make(port: int = 0, **knobs: Any) -> ProcessorServer:
        server = ProcessorServer(port=port, knobs=Knobs(**knobs))
        await server.start()
        servers.append(server)
        return server

    yield make
    for server in reversed(servers):
        await server.stop()
