"""A trickle server killed (SIGKILL) and restarted mid-stream: both clients carry on."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import socket
import sys
from collections.abc import AsyncIterator

import pytest

from relay_server.trickle.publisher import Publisher
from relay_server.trickle.subscriber import Subscriber


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class ServerProcess:
    """`trickle-relay trickle-server` in its own process, so it can really be killed."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "relay_server",
            "trickle-server",
            "--listen",
            f"127.0.0.1:{self.port}",
            stderr=asyncio.subprocess.PIPE,
        )
        assert self.process.stderr is not None
        # Ready once it logs its address.
        async with asyncio.timeout(20):
            while f"127.0.0.1:{self.port}".encode() not in await self.process.stderr.readline():
                pass
        self._drain = asyncio.create_task(self._discard(self.process.stderr))

    @staticmethod
    async def _discard(stream: asyncio.StreamReader) -> None:
        while await stream.read(65536):
            pass

    async def kill(self) -> None:
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGKILL)
        await self.process.wait()
        await self._drain


@pytest.fixture
async def server_process() -> AsyncIterator[ServerProcess]:
    server = ServerProcess(_free_port())
    await server.start()
    yield server
    await server.kill()


async def test_server_killed_and_restarted_midstream(server_process: ServerProcess) -> None:
    url = f"http://127.0.0.1:{server_process.port}/restart"
    received: list[tuple[int, bytes, bool]] = []
    restarted = asyncio.Event()

    def body(seq: int) -> bytes:
        return (b"segment %06d " % seq) * 500

    async def produce(publisher: Publisher) -> None:
        # A live source: paced by time (20 segments a second), whatever the server does.
        loop = asyncio.get_running_loop()
        start = loop.time()
        for index in itertools.count():
            await asyncio.sleep(max(0.0, start + index * 0.05 - loop.time()))
            writer = await publisher.segment()
            data = body(writer.seq)
            await writer.write(data[:3000])
            await writer.write(data[3000:])
            await writer.close()

    async with (
        Publisher(url) as publisher,
        Subscriber(url, start_seq=0, startup_grace=15) as subscriber,
    ):
        producer = asyncio.create_task(produce(publisher))

        async def consume() -> None:
            async for segment in subscriber:
                data = b"".join([chunk async for chunk in segment])
                received.append((segment.seq, data, segment.truncated))
                if len(received) == 5:
                    await server_process.kill()
                    await server_process.start()
                    restarted.set()
                if len(received) == 10:
                    return

        try:
            async with asyncio.timeout(60):
                await consume()
        finally:
            producer.cancel()
            await asyncio.gather(producer, return_exceptions=True)

    seqs = [seq for seq, _, _ in received]
    assert seqs == sorted(set(seqs)), "segments repeated or went backwards"
    # The publisher kept counting: the channel never moved backwards, and the subscriber
    # recovered at the live edge with byte-exact segments after the restart.
    after = [(seq, data) for seq, data, truncated in received[5:] if not truncated]
    assert len(after) >= 4
    assert all(data == body(seq) for seq, data in after)
    assert all(data == body(seq) for seq, data, _ in received[:5])
    assert subscriber.stats.retries >= 1
