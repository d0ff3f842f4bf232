"""Fixtures for the gRPC API tests: a RelayServer on loopback with a client, a live source, the
output channel collected, and watchers that record what a WatchSession stream delivers and when.

Every part is real: the gRPC server and client, the trickle server, the WebRTC processor. Each
relay is drained at teardown and must leave none of its sessions' threads behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import av
import grpc
import numpy as np
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.struct_pb2 import Struct
from grpc_health.v1 import health_pb2, health_pb2_grpc

from relay_server.api.relay.v1 import relay_service_pb2 as pb
from relay_server.api.relay.v1 import relay_service_pb2_grpc as pb_grpc
from relay_server.media.testsource import publish_pattern
from relay_server.processor import ProcessorServer
from relay_server.service.server import SERVICE_NAME, RelayServer
from relay_server.session.manager import SessionManager
from relay_server.trickle import Publisher, Subscriber
from relay_server.trickle.server import TrickleServer

INVERT = {"1": {"class_type": "Invert", "inputs": {}}}
GRAYSCALE = {"1": {"class_type": "Grayscale", "inputs": {}}}
SIZE = 512  # the session size when a request leaves it 0
BAR_ROWS = 100  # 1280×720 letterboxed into 512×512 leaves 112 rows of bar at the top


def struct(value: dict[str, Any]) -> Struct:
    message = Struct()
    message.update(value)
    return message


def seconds(value: float) -> Duration:
    duration = Duration()
    duration.FromNanoseconds(round(value * 1e9))
    return duration


def session_threads(session_id: str) -> list[str]:
    """Threads a session named after itself (its decoder and its send leg's encoder)."""
    prefixes = (f"decoder {session_id}", f"send-encode {session_id}")
    return [t.name for t in threading.enumerate() if t.name.startswith(prefixes)]


def media_threads() -> list[str]:
    """Every media thread of any session or source (output-encode carries no session name)."""
    prefixes = ("decoder", "output-encode", "send-encode")
    return [t.name for t in threading.enumerate() if t.name.startswith(prefixes)]


# -- the relay -------------------------------------------------------------------------------------


@dataclass
class Relay:
    server: RelayServer
    channel: grpc.aio.Channel
    stub: pb_grpc.RelayServiceStub

    @property
    def manager(self) -> SessionManager:
        return self.server.manager


MakeRelay = Callable[..., Awaitable[Relay]]


@pytest.fixture
async def make_relay(trickle_server: TrickleServer) -> AsyncIterator[MakeRelay]:
    """`await make_relay(max_sessions=1, allowed_hosts=...)`: a started RelayServer around a
    SessionManager with those arguments, and a client channel to it. Drained at teardown, while
    the trickle server its sessions use is still up."""
    relays: list[Relay] = []

    async def make(**manager_options: Any) -> Relay:
        server = RelayServer(SessionManager(**manager_options))
        await server.start()
        channel = grpc.aio.insecure_channel(server.address)
        relay = Relay(server, channel, pb_grpc.RelayServiceStub(channel))
        relays.append(relay)
        return relay

    yield make
    for relay in reversed(relays):
        await relay.channel.close()
        await relay.server.drain()
        for session in relay.manager.snapshots():
            assert session.state.ended, session
            assert not session_threads(session.config.session_id)


@pytest.fixture
async def relay(make_relay: MakeRelay) -> Relay:
    return await make_relay()


@contextlib.asynccontextmanager
async def drain_under_way(
    relay: Relay, lingering: pb.StartSessionRequest
) -> AsyncIterator[asyncio.Task[None]]:
    """A drain of `relay` under way, kept so by `lingering`, a session whose events go to a
    gateway that has hung (stopping it takes its events' grace): entered once health says
    NOT_SERVING, the drain's first step (the manager refuses new sessions from its next); the
    drain is awaited on exit."""
    await relay.stub.StartSession(lingering)
    health = health_pb2_grpc.HealthStub(relay.channel)
    watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
    assert (await asyncio.wait_for(watch.read(), 5)).status == health_pb2.HealthCheckResponse.SERVING
    draining = asyncio.create_task(relay.server.drain())
    try:
        assert (await asyncio.wait_for(watch.read(), 5)).status == health_pb2.HealthCheckResponse.NOT_SERVING
        yield draining
    finally:
        watch.cancel()
        await asyncio.wait_for(draining, 10)


# -- what sessions connect to ----------------------------------------------------------------------


@pytest.fixture
async def processor() -> AsyncIterator[ProcessorServer]:
    async with ProcessorServer() as server:
        yield server


@pytest.fixture
async def idle_channel(trickle_server: TrickleServer) -> str:
    """A channel that exists and that nobody publishes to: a session reading it waits, with no
    media, for as long as the test needs."""
    publisher = Publisher(trickle_server.channel_url("idle"))
    await publisher.create_channel()
    await publisher.close(delete_channel=False)
    return trickle_server.channel_url("idle")


@pytest.fixture
def closed_port_url() -> str:
    """An http URL on a loopback port nothing listens on: a processor that never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
async def unresponsive_url() -> AsyncIterator[str]:
    """An http URL whose server takes connections and requests and never answers: a gateway
    that has hung. A session sending it events takes its full grace (2 s) to finish them."""
    connections: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        while await reader.read(64 * 1024):
            pass

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}/events"
    server.close()
    for writer in connections:
        writer.close()
    await server.wait_closed()


class LiveSource:
    """The live test pattern (1280×720, 30 fps, one-second segments) published to a channel."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._publisher = Publisher(url)
        self._task: asyncio.Task[int] | None = None

    async def start(self) -> None:
        await self._publisher.create_channel()
        self._task = asyncio.create_task(publish_pattern(self._publisher, 1280, 720), name="live source")

    async def stop(self) -> None:
        """End publishing and delete the channel (its encoder thread is joined)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self._publisher.close()


@pytest.fixture
async def live_source(trickle_server: TrickleServer) -> AsyncIterator[LiveSource]:
    source = LiveSource(trickle_server.channel_url("in"))
    await source.start()
    yield source
    await source.stop()


# -- the output channel ----------------------------------------------------------------------------


class Output:
    """The segments published on a channel from its first one, each with its decoded frames,
    collected until the channel ends (end_reason then says how: "closed" or "not_found")."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.segments: list[list[av.VideoFrame]] = []
        self.end_reason: str | None = None
        self._arrived = asyncio.Condition()
        self._task = asyncio.create_task(self._collect(), name=f"collect {url}")

    async def _collect(self) -> None:
        async with Subscriber(self.url, start_seq=0, startup_grace=30) as subscriber:
            async for segment in subscriber:
                data = b"".join([chunk async for chunk in segment])
                frames = decode(data)
                async with self._arrived:
                    self.segments.append(frames)
                    self._arrived.notify_all()
            self.end_reason = subscriber.end_reason

    async def wait_for(self, count: int, within: float = 20) -> list[av.VideoFrame]:
        """The `count`th segment's frames (1-based), once it has arrived."""
        async with asyncio.timeout(within), self._arrived:
            await self._arrived.wait_for(lambda: len(self.segments) >= count)
        return self.segments[count - 1]

    async def next_matching(
        self, predicate: Callable[[list[av.VideoFrame]], bool], within: float = 20
    ) -> list[av.VideoFrame]:
        """The first segment arriving from now on whose frames satisfy `predicate`."""
        index = len(self.segments)
        async with asyncio.timeout(within):
            while True:
                frames = await self.wait_for(index + 1, within)
                if frames and predicate(frames):
                    return frames
                index += 1

    async def ended(self, within: float = 10) -> str | None:
        """Wait for the end of the stream; how it ended."""
        await asyncio.wait_for(asyncio.shield(self._task), within)
        return self.end_reason

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


def decode(data: bytes) -> list[av.VideoFrame]:
    with av.open(io.BytesIO(data), format="mpegts") as container:
        return list(container.decode(video=0))  # type: ignore[union-attr]


@pytest.fixture
async def make_output() -> AsyncIterator[Callable[[str], Output]]:
    outputs: list[Output] = []

    def make(url: str) -> Output:
        output = Output(url)
        outputs.append(output)
        return output

    yield make
    for output in outputs:
        await output.close()


def top_bar_luma(frame: av.VideoFrame) -> float:
    """Mean luma of the letterbox bar: ≈16 (black) through passthrough, >200 when inverted."""
    return float(frame.to_ndarray(format="gray")[:BAR_ROWS].mean())


def chroma_spread(frame: av.VideoFrame) -> float:
    """Mean distance of the chroma planes from grey (128): ≈0 for a grayscale frame."""
    yuv = frame.to_ndarray(format="yuv420p")
    chroma = yuv[frame.height :].astype(np.int16)
    return float(np.abs(chroma - 128).mean())


# -- watchers --------------------------------------------------------------------------------------


@dataclass
class Watcher:
    """A WatchSession stream read as fast as it comes, each message kept with its arrival time
    (the event loop's clock). `status` is the stream's final code once it has ended."""

    call: Any  # grpc.aio.UnaryStreamCall
    messages: list[tuple[float, pb.Session]] = field(default_factory=list)
    status: grpc.StatusCode | None = None
    _arrived: asyncio.Condition = field(default_factory=asyncio.Condition)
    _task: asyncio.Task[None] | None = None

    @classmethod
    def open(cls, stub: pb_grpc.RelayServiceStub, session_id: str, interval: float | None) -> Watcher:
        request = pb.WatchSessionRequest(session_id=session_id)
        if interval is not None:
            request.interval.CopyFrom(seconds(interval))
        watcher = cls(stub.WatchSession(request))
        watcher._task = asyncio.create_task(watcher._read(), name=f"watcher {session_id}")
        return watcher

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            async for response in self.call:
                async with self._arrived:
                    self.messages.append((loop.time(), response.session))
                    self._arrived.notify_all()
        except grpc.aio.AioRpcError as error:
            self.status = error.code()
        else:
            self.status = await self.call.code()
        async with self._arrived:
            self._arrived.notify_all()

    @property
    def sessions(self) -> list[pb.Session]:
        return [session for _, session in self.messages]

    async def until(self, predicate: Callable[[pb.Session], bool], within: float = 20) -> int:
        """The index of the first message, from the start, satisfying `predicate`."""
        async with asyncio.timeout(within), self._arrived:
            while True:
                for index, (_, session) in enumerate(self.messages):
                    if predicate(session):
                        return index
                if self.status is not None:
                    raise AssertionError(f"the stream ended ({self.status}) before: {self.sessions}")
                await self._arrived.wait()

    async def until_count(self, count: int, within: float = 20) -> None:
        async with asyncio.timeout(within), self._arrived:
            await self._arrived.wait_for(lambda: len(self.messages) >= count or self.status is not None)
        assert len(self.messages) >= count, f"the stream ended ({self.status}) after {len(self.messages)}"

    async def ended(self, within: float = 10) -> grpc.StatusCode | None:
        assert self._task is not None
        await asyncio.wait_for(asyncio.shield(self._task), within)
        return self.status

    async def close(self) -> None:
        self.call.cancel()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)


@pytest.fixture
async def make_watcher() -> AsyncIterator[Callable[..., Watcher]]:
    """`make_watcher(stub, session_id, interval)`: a Watcher, cancelled at teardown."""
    watchers: list[Watcher] = []

    def make(stub: pb_grpc.RelayServiceStub, session_id: str, interval: float | None = None) -> Watcher:
        watcher = Watcher.open(stub, session_id, interval)
        watchers.append(watcher)
        return watcher

    yield make
    for watcher in watchers:
        with contextlib.suppress(Exception):
            await watcher.close()


@pytest.fixture
def dead_processor() -> Iterator[str]:
    """A loopback URL whose port is bound but not listening (held for the test, so nothing else
    can take it): every connection is refused, and a session's link keeps retrying."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
async def quiet_channel(trickle_server: TrickleServer) -> str:
    """An input channel that exists and gets no media: a session reading it just waits."""
    url = trickle_server.channel_url("ops-in")
    publisher = Publisher(url)
    await publisher.create_channel()
    await publisher.close(delete_channel=False)
    return url


@pytest.fixture
def start_request(
    trickle_server: TrickleServer, quiet_channel: str, dead_processor: str
) -> Callable[[str], pb.StartSessionRequest]:
    def make(session_id: str) -> pb.StartSessionRequest:
        return pb.StartSessionRequest(
            session_id=session_id,
            subscribe_url=quiet_channel,
            publish_url=trickle_server.channel_url(f"{session_id}-out"),
            processor_url=dead_processor,
        )

    return make
