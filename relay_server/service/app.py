"""The relay service as one process runs it: `trickle-relay serve`.

    options = ServeOptions(listen=("127.0.0.1", 0), metrics_listen=("127.0.0.1", 0))
    async with RelayApp(options) as app:        # start(); drain() on the way out
        app.target                              # "127.0.0.1:PORT" for a gRPC channel
        app.metrics_url                         # "http://127.0.0.1:PORT/metrics" (None: off)

    run(ServeOptions.from_env())                # the command: logs set up, SIGTERM/SIGINT drain

A RelayApp puts together a SessionManager, the RelayServer (gRPC: RelayService, health,
reflection) with its interceptors (metrics first, so that refused calls are counted, then the
optional bearer-token check), optional TLS, and the Prometheus endpoint on its own port with a
registry of its own (several apps can live in one process).

Shutdown (drain) goes: health NOT_SERVING, every session stopped, the gRPC server stopped
(in-flight RPCs get `drain_grace` seconds, then are cancelled), the metrics endpoint last.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import grpc
from aiohttp import web
from prometheus_client import CollectorRegistry

from relay_server import eventloop, settings
from relay_server.service.auth import BearerTokenInterceptor
from relay_server.service.logs import configure_logging
from relay_server.service.metrics import GrpcMetricsInterceptor, SessionCollector, serve_metrics
from relay_server.service.server import DRAIN_GRACE, RelayServer, Sessions
from relay_server.service.workers import ForwardingServicer, WorkerMetrics, WorkerPool, worker_count
from relay_server.serving import until_signalled, url_host
from relay_server.session.manager import MAX_SESSIONS, SessionManager
from relay_server.webrtc.link import LinkSettings

log = logging.getLogger(__name__)

__all__ = ["RelayApp", "ServeOptions", "run", "serve", "tls_credentials"]


@dataclass(frozen=True)
class ServeOptions:
    """What `trickle-relay serve` runs with; each field has a RELAY_* variable (settings.py)."""

    listen: tuple[str, int] = ("127.0.0.1", 50051)
    max_sessions: int = MAX_SESSIONS
    allow_hosts: frozenset[str] = frozenset()  # empty: any host
    metrics_listen: tuple[str, int] | None = ("127.0.0.1", 9102)  # None: no metrics endpoint
    auth_token: str | None = None  # None: no authentication
    tls_cert: Path | None = None
    tls_key: Path | None = None
    log_format: str = "text"
    log_level: str = "INFO"
    drain_grace: float = DRAIN_GRACE
    replica: str | None = None  # None: session ids the relay makes are plain UUIDs
    # Processes running sessions behind the one endpoint; 0: one per two cores (the command's
    # default); 1: this process runs them.
    workers: int = 1

    @classmethod
    def from_env(cls) -> ServeOptions:
        """Every option from its RELAY_* variable (ValueError naming the variable if invalid)."""
        return cls(
            listen=settings.listen(),
            max_sessions=settings.max_sessions(),
            allow_hosts=settings.allow_hosts(),
            metrics_listen=settings.metrics_listen(),
            auth_token=settings.auth_token(),
            tls_cert=settings.tls_cert(),
            tls_key=settings.tls_key(),
            log_format=settings.log_format(),
            log_level=settings.log_level(),
            drain_grace=settings.drain_grace(),
            replica=settings.replica(),
            workers=settings.worker_processes(),
        )

    def check(self) -> None:
        """Raise ValueError on options that cannot work together (TLS files are read here)."""
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both a certificate and a key (--tls-cert and --tls-key)")
        if self.auth_token is not None and not self.auth_token.strip():
            raise ValueError("the auth token must not be blank")
        if self.max_sessions < 1:
            raise ValueError(f"max sessions must be at least 1, got {self.max_sessions}")
        if self.workers < 0:
            raise ValueError(f"workers must be at least 0 (0: one per two cores), got {self.workers}")
        if not self.drain_grace >= 0:
            raise ValueError(f"the drain grace must be at least 0 s, got {self.drain_grace}")
        if self.tls_cert is not None and self.tls_key is not None:
            tls_credentials(self.tls_cert, self.tls_key)


def tls_credentials(cert: Path, key: Path) -> grpc.ServerCredentials:
    """Server credentials from a PEM certificate chain and its PEM private key; ValueError when
    a file cannot be read or is not PEM."""
    pems = []
    for what, path in (("certificate", cert), ("private key", key)):
        try:
            data = Path(path).read_bytes()
        except OSError as error:
            raise ValueError(f"cannot read the TLS {what} {str(path)!r}: {error.strerror}") from None
        if b"-----BEGIN " not in data:
            raise ValueError(f"the TLS {what} {str(path)!r} is not PEM")
        pems.append(data)
    certificate, private_key = pems
    return grpc.ssl_server_credentials([(private_key, certificate)])


class RelayApp:
    """`address` (a unix socket, "unix:PATH") is bound instead of options.listen."""

    def __init__(
        self,
        options: ServeOptions | None = None,
        *,
        link: LinkSettings | None = None,
        address: str | None = None,
    ) -> None:
        self.options = options = options or ServeOptions()
        options.check()
        self.registry = CollectorRegistry()
        self.manager: SessionManager | None = None
        self.pool: WorkerPool | None = None
        sessions: Sessions
        servicer = None
        if worker_count(options.workers) > 1:
            self.pool = sessions = WorkerPool(options, worker_count(options.workers))
            self.registry.register(WorkerMetrics(self.pool))
            servicer = ForwardingServicer(self.pool)
        else:
            self.manager = sessions = SessionManager(
                max_sessions=options.max_sessions, allowed_hosts=options.allow_hosts, link=link
            )
            self.registry.register(SessionCollector(self.manager))
        interceptors: list[grpc.aio.ServerInterceptor] = [GrpcMetricsInterceptor(self.registry)]
        if options.auth_token is not None:
            interceptors.append(BearerTokenInterceptor(options.auth_token))
        credentials = None
        if options.tls_cert is not None and options.tls_key is not None:
            credentials = tls_credentials(options.tls_cert, options.tls_key)
        host, port = options.listen
        self.server = RelayServer(
            sessions,
            servicer=servicer,
            host=f"[{host}]" if ":" in host else host,
            port=port,
            address=address,
            credentials=credentials,
            interceptors=interceptors,
            replica=options.replica,
        )
        if self.pool is not None:
            self.pool.on_up = self.server.serving
        self._address = address
        self.metrics_url: str | None = None
        self._metrics: web.AppRunner | None = None
        self._started = False

    @property
    def port(self) -> int:
        """The gRPC port (the bound one once started, when the options said 0)."""
        return self.server.port

    @property
    def target(self) -> str:
        """host:port a client on this machine dials (a wildcard address becomes loopback), or the
        unix socket's address."""
        if self._address is not None:
            return self._address
        return f"{url_host(self.options.listen[0])}:{self.server.port}"

    async def start(self) -> None:
        """Serve gRPC, then metrics; if either cannot start, nothing is left running."""
        if self._started:
            raise RuntimeError("a RelayApp starts once")
        self._started = True
        if self.pool is not None:
            await self.pool.start()
        await self.server.start()
        try:
            if self.options.metrics_listen is not None:
                host, port = self.options.metrics_listen
                refresh = self.pool.scrape if self.pool is not None else None
                self._metrics, _, self.metrics_url = await serve_metrics(self.registry, host, port, refresh)
        except BaseException:
            await self.server.drain(0)
            raise
        log.info(
            "%s: grpc %s (%s%s), metrics %s, sessions at most %d%s, hosts %s",
            "worker ready" if self._address is not None else "ready",  # the command's line: ready
            self.target,
            "TLS" if self.options.tls_cert is not None else "plaintext",
            ", bearer token required" if self.options.auth_token is not None else "",
            self.metrics_url or "off",
            self.options.max_sessions,
            f" in {len(self.pool.workers)} workers" if self.pool is not None else "",
            ", ".join(sorted(self.options.allow_hosts)) or "any",
        )

    async def drain(self) -> None:
        """Health NOT_SERVING, sessions stopped, the gRPC server stopped, then metrics. Idempotent."""
        try:
            await self.server.drain(self.options.drain_grace)
        finally:
            if self._metrics is not None:
                runner, self._metrics = self._metrics, None
                await runner.cleanup()

    async def __aenter__(self) -> RelayApp:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.drain()


async def serve(options: ServeOptions, *, link: LinkSettings | None = None) -> int:
    """Run a RelayApp until SIGTERM or SIGINT, then drain it; the exit code (1: it could not
    start, for example because a port is taken). The signal handlers are in place before anything
    starts: a signal during start-up drains as soon as the start is complete."""
    signalled = asyncio.create_task(until_signalled(), name="until signalled")
    await asyncio.sleep(0)  # the task's first step installs the handlers
    app = RelayApp(options, link=link)
    try:
        await app.start()
    except (OSError, RuntimeError) as error:  # grpc says RuntimeError when it cannot bind
        log.error("cannot start the relay service: %s", error)
        signalled.cancel()
        await asyncio.gather(signalled, return_exceptions=True)
        return 1
    await signalled
    log.info("signalled: draining (health NOT_SERVING, stopping sessions, then the server)")
    await app.drain()
    log.info("drained; exiting")
    return 0


def run(options: ServeOptions) -> int:
    """`trickle-relay serve`: logging as the options say, then serve() on a new event loop."""
    configure_logging(options.log_format, options.log_level)
    return eventloop.run(serve(options))
