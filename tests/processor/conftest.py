"""A processor server per test and clients that are closed at teardown."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from relay_server.processor import Knobs, ProcessorServer
from tests.processor.client import Client


@pytest.fixture
async def make_processor() -> AsyncIterator[Callable[..., Awaitable[ProcessorServer]]]:
    """`await make_processor(max_fps=10, input_timeout=0.5)`: a started server with those knobs."""
    servers: list[ProcessorServer] = []

    async def make(**knobs: Any) -> ProcessorServer:
        server = ProcessorServer(knobs=Knobs(**knobs))
        await server.start()
        servers.append(server)
        return server

    yield make
    for server in reversed(servers):
        await server.stop()


@pytest.fixture
async def processor(make_processor: Callable[..., Awaitable[ProcessorServer]]) -> ProcessorServer:
    return await make_processor()


@pytest.fixture
async def make_client() -> AsyncIterator[Callable[..., Client]]:
    clients: list[Client] = []

    def make(**kwargs: Any) -> Client:
        client = Client(**kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()
