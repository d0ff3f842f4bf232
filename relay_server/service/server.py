"""RelayServer: the gRPC server around a SessionManager (or, with workers, the front's pool).

    server = RelayServer(SessionManager(), host="127.0.0.1", port=0)
    await server.start()          # serving; health says SERVING
    ...
    await server.drain()          # health NOT_SERVING, sessions stopped, then the server

Registered: relay.v1.RelayService, grpc.health.v1.Health (the overall "" service and
relay.v1.RelayService: NOT_SERVING until start() completes and again from the first moment of a
drain, so load balancers stop sending work before sessions are stopped; open Watch streams end
with UNAVAILABLE once the sessions are stopped, so that none holds the server's stop for its
whole grace) and server reflection (so grpcurl and other tools work without the proto files).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from relay_server.api.relay.v1 import relay_service_pb2 as pb
from relay_server.api.relay.v1 import relay_service_pb2_grpc as pb_grpc
from relay_server.service.servicer import RelayServicer
from relay_server.serving import listen_error
from relay_server.session.manager import SessionManager
from relay_server.waits import until_set

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RelayService"].full_name
DRAIN_GRACE = 5.0  # seconds in-flight RPCs get to finish once sessions are stopped


class DrainingHealth(health.aio.HealthServicer):
    """grpc's health servicer, whose Watch streams end when the server drains. A watcher has been
    told NOT_SERVING by then; an open stream would keep server.stop() waiting for its grace."""

    def __init__(self) -> None:
        super().__init__()
        self._draining = asyncio.Event()

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> None:
        watching = await until_set(super().Watch(request, context), self._draining)
        if not self._draining.is_set():
            return watching.result()  # the watch's own end (its error)
        await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")

    def end_watches(self) -> None:
        self._draining.set()


class Sessions(Protocol):
    """Where the sessions are: drain() stops them all and takes no new ones."""

    async def drain(self) -> None: ...


class RelayServer:
    """Serves RelayService: a RelayServicer of `sessions`, a SessionManager, or `servicer` (the
    workers' front: `sessions` is then its pool). drain() drains `sessions`. `address` (a unix
    socket, "unix:PATH") is bound instead of host:port."""

    def __init__(
        self,
        sessions: Sessions,
        *,
        servicer: pb_grpc.RelayServiceServicer | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        address: str | None = None,
        credentials: grpc.ServerCredentials | None = None,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        replica: str | None = None,
    ) -> None:
        self.sessions = sessions
        self.manager = sessions if isinstance(sessions, SessionManager) else None
        if servicer is None:
            assert self.manager is not None, "a RelayServicer serves a SessionManager"
            servicer = RelayServicer(self.manager, replica)
        self.servicer = servicer
        self.host = host
        self.port = port
        self._address = address
        self.health = DrainingHealth()
        self._credentials = credentials
        self._interceptors = tuple(interceptors)
        self._server: grpc.aio.Server | None = None
        self._draining = False

    @property
    def address(self) -> str:
        return self._address or f"{self.host}:{self.port}"

    async def start(self) -> None:
        server = grpc.aio.server(interceptors=self._interceptors)
        pb_grpc.add_RelayServiceServicer_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
        reflection.enable_server_reflection((SERVICE_NAME, health_name, reflection.SERVICE_NAME), server)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        address = self.address
        try:
            if self._credentials is None:
                bound = server.add_insecure_port(address)
            else:
                bound = server.add_secure_port(address, self._credentials)
            if self._address is None:
                self.port = bound
        except RuntimeError as error:  # gRPC's, which names no cause
            raise listen_error(self.host, self.port, error) from error
        await server.start()
        self._server = server
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("relay service on %s (%s)", self.address, "TLS" if self._credentials else "plaintext")

    async def serving(self, up: bool) -> None:
        """Health SERVING or NOT_SERVING as the sessions' side says it can take sessions (the
        workers' front: any worker up), unless draining."""
        if self._server is not None and not self._draining:
            status = (
                health_pb2.HealthCheckResponse.SERVING if up else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            await self._set_health(status)

    async def drain(self, grace: float = DRAIN_GRACE) -> None:
        """Health NOT_SERVING first, then every session stopped, then the server."""
        self._draining = True
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.sessions.drain()
        self.health.end_watches()
        if self._server is not None:
            server, self._server = self._server, None
            await server.stop(grace)

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)
