"""A processor server per test and clients that are closed at teardown."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from relay_server.processor import ProcessorServer
from tests.processor.client import Client


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
