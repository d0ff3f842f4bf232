"""Prometheus metrics: gRPC server metrics and the relay's sessions, on their own port.

    registry = CollectorRegistry()
    interceptor = GrpcMetricsInterceptor(registry)      # first in RelayServer's interceptors
    registry.register(SessionCollector(manager))
    runner, port, url = await serve_metrics(registry, "127.0.0.1", 9102)   # GET {url}/metrics

gRPC metrics have go-grpc-prometheus's names and labels (grpc_type, grpc_service, grpc_method,
grpc_code with Go's code names, e.g. "OK", "Unauthenticated"), so its dashboards work:
grpc_server_started_total, grpc_server_handled_total and the grpc_server_handling_seconds
histogram. An RPC refused by an interceptor further in (auth) is counted with its code.

Session metrics are read from the SessionManager when Prometheus scrapes, from the counters the
media path keeps anyway: nothing is updated per frame for them. Per-session series are labelled
with session_id and exist while the manager remembers the session (running ones, and the last
few ended ones), so their cardinality is bounded by max_sessions + KEEP_ENDED.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import grpc
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from relay_server.serving import bind
from relay_server.session.manager import SessionManager
from relay_server.session.session import SessionState

# grpc.StatusCode → Go's codes.Code.String(), as go-grpc-prometheus labels grpc_code.
GO_CODE_NAMES = {
    grpc.StatusCode.OK: "OK",
    grpc.StatusCode.CANCELLED: "Canceled",
    grpc.StatusCode.UNKNOWN: "Unknown",
    grpc.StatusCode.INVALID_ARGUMENT: "InvalidArgument",
    grpc.StatusCode.DEADLINE_EXCEEDED: "DeadlineExceeded",
    grpc.StatusCode.NOT_FOUND: "NotFound",
    grpc.StatusCode.ALREADY_EXISTS: "AlreadyExists",
    grpc.StatusCode.PERMISSION_DENIED: "PermissionDenied",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "ResourceExhausted",
    grpc.StatusCode.FAILED_PRECONDITION: "FailedPrecondition",
    grpc.StatusCode.ABORTED: "Aborted",
    grpc.StatusCode.OUT_OF_RANGE: "OutOfRange",
    grpc.StatusCode.UNIMPLEMENTED: "Unimplemented",
    grpc.StatusCode.INTERNAL: "Internal",
    grpc.StatusCode.UNAVAILABLE: "Unavailable",
    grpc.StatusCode.DATA_LOSS: "DataLoss",
    grpc.StatusCode.UNAUTHENTICATED: "Unauthenticated",
}
GRPC_LABELS = ("grpc_type", "grpc_service", "grpc_method")
# go-grpc-prometheus's default buckets (prometheus.DefBuckets), in seconds.
HANDLING_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class GrpcMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts every RPC the server handles into `registry`. Put it first among the interceptors,
    so that calls refused by later ones are counted too."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.started = Counter(
            "grpc_server_started_total",
            "Total number of RPCs started on the server.",
            GRPC_LABELS,
            registry=registry,
        )
        self.handled = Counter(
            "grpc_server_handled_total",
            "Total number of RPCs completed on the server, regardless of success or failure.",
            (*GRPC_LABELS, "grpc_code"),
            registry=registry,
        )
        self.handling = Histogram(
            "grpc_server_handling_seconds",
            "Histogram of response latency (seconds) of gRPC that had been application-level "
            "handled by the server.",
            GRPC_LABELS,
            buckets=HANDLING_BUCKETS,
            registry=registry,
        )

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        service, _, method = handler_call_details.method.lstrip("/").rpartition("/")
        return self._wrap(handler, _grpc_type(handler), service, method)

    def _wrap(
        self, handler: grpc.RpcMethodHandler, grpc_type: str, service: str, method: str
    ) -> grpc.RpcMethodHandler:
        labels = (grpc_type, service, method)
        metrics = self

        def begin() -> float:
            metrics.started.labels(*labels).inc()
            return time.perf_counter()

        def end(started: float, code: str) -> None:
            metrics.handled.labels(*labels, code).inc()
            metrics.handling.labels(*labels).observe(time.perf_counter() - started)

        def call(behaviour: Callable[..., Any]) -> Callable[..., Any]:
            async def unary_response(request: Any, context: grpc.aio.ServicerContext) -> Any:
                started = begin()
                try:
                    response = await behaviour(request, context)
                except BaseException as error:
                    end(started, _code_of(error, context))
                    raise
                end(started, _code_of(None, context))
                return response

            return unary_response

        def stream(behaviour: Callable[..., Any]) -> Callable[..., Any]:
            async def stream_response(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                started = begin()
                try:
                    if inspect.isasyncgenfunction(behaviour):
                        async for response in behaviour(request, context):
                            yield response
                    else:  # a coroutine writing with context.write() (as the health service's Watch)
                        await behaviour(request, context)
                except BaseException as error:
                    end(started, _code_of(error, context))
                    raise
                end(started, _code_of(None, context))

            return stream_response

        if handler.request_streaming and handler.response_streaming:
            behaviour, factory, wrap = handler.stream_stream, grpc.stream_stream_rpc_method_handler, stream
        elif handler.request_streaming:
            behaviour, factory, wrap = handler.stream_unary, grpc.stream_unary_rpc_method_handler, call
        elif handler.response_streaming:
            behaviour, factory, wrap = handler.unary_stream, grpc.unary_stream_rpc_method_handler, stream
        else:
            behaviour, factory, wrap = handler.unary_unary, grpc.unary_unary_rpc_method_handler, call
        if not (inspect.iscoroutinefunction(behaviour) or inspect.isasyncgenfunction(behaviour)):
            return handler  # a synchronous handler: not run by this server's servicers
        return factory(
            wrap(behaviour),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _grpc_type(handler: grpc.RpcMethodHandler) -> str:
    if handler.request_streaming:
        return "bidi_stream" if handler.response_streaming else "client_stream"
    return "server_stream" if handler.response_streaming else "unary"


def _code_of(error: BaseException | None, context: grpc.aio.ServicerContext) -> str:
    """The status an RPC ends with: the one it set or aborted with; CANCELLED when its task was
    cancelled (the client went away, or the server stopped); UNKNOWN for any other exception."""
    code: grpc.StatusCode | None = None
    if error is None or isinstance(error, grpc.aio.AbortError):
        code = context.code()
        if not isinstance(code, grpc.StatusCode):
            code = grpc.StatusCode.OK if error is None else grpc.StatusCode.UNKNOWN
    elif isinstance(error, asyncio.CancelledError):
        code = grpc.StatusCode.CANCELLED
    else:
        code = grpc.StatusCode.UNKNOWN
    return GO_CODE_NAMES.get(code, code.name)


class SessionCollector(Collector):
    """The manager's sessions, read at scrape time."""

    def __init__(self, manager: SessionManager) -> None:
        self.manager = manager

    def describe(self) -> list[Metric]:
        return []  # names are not known without collecting: no duplicate check at registration

    def collect(self) -> Iterator[Metric]:
        snapshots = self.manager.snapshots()
        by_state = GaugeMetricFamily(
            "relay_sessions", "Sessions the relay knows of, by state.", labels=["state"]
        )
        counts = {state: 0 for state in SessionState}
        for snapshot in snapshots:
            counts[snapshot.state] += 1
        for each, count in counts.items():
            by_state.add_metric([each.value], count)
        yield by_state
        yield GaugeMetricFamily(
            "relay_sessions_max", "Sessions the relay runs at most.", value=self.manager.max_sessions
        )

        sid = ["session_id"]
        states = GaugeMetricFamily(
            "relay_session_state", "1 for the state the session is in.", labels=[*sid, "state"]
        )
        frames = {
            stage: CounterMetricFamily(f"relay_session_frames_{stage}", f"Frames {what}.", labels=sid)
            for stage, what in (
                ("decoded", "decoded from the input channel"),
                ("sent", "sent to the processor, fresh and repeated"),
                ("returned", "returned by the processor"),
                ("encoded", "encoded here for the output channel, returned and filled"),
                ("published", "written to the output channel: encoded, remuxed and filled"),
            )
        }
        segments = {
            way: CounterMetricFamily(f"relay_session_segments_{way}", f"Segments {what}.", labels=sid)
            for way, what in (
                ("in", "started on the input channel"),
                ("out", "accepted by the output channel"),
            )
        }
        latency = GaugeMetricFamily(
            "relay_session_latency_seconds",
            "Round trip relay → processor → relay over the last ~10 s, by quantile (absent until "
            "a returned frame has been matched to a sent one).",
            labels=[*sid, "quantile"],
        )
        queue_depth = GaugeMetricFamily(
            "relay_session_queue_depth",
            "Items in each bounded hand-off, in data-flow order; the queue name says the unit.",
            labels=[*sid, "queue"],
        )
        queue_capacity = GaugeMetricFamily(
            "relay_session_queue_capacity",
            "Items each hand-off holds at most (0: not bounded, or not applicable).",
            labels=[*sid, "queue"],
        )
        drops = CounterMetricFamily(
            "relay_session_drops", "Frames and packets let go, by reason.", labels=[*sid, "reason"]
        )
        connections = CounterMetricFamily(
            "relay_session_processor_connections", "Connections the processor answered.", labels=sid
        )
        reconnects = CounterMetricFamily(
            "relay_session_reconnects",
            "Processor connections made after the first one (after a loss).",
            labels=sid,
        )
        losses = CounterMetricFamily(
            "relay_session_processor_losses", "Processor connections lost and torn down.", labels=sid
        )
        paths = GaugeMetricFamily(
            "relay_session_path",
            "1 for the path each leg's video takes: send forward (as it is) or encode, output remux "
            "or encode.",
            labels=[*sid, "leg", "path"],
        )
        switches = CounterMetricFamily(
            "relay_session_path_switches", "Send leg switches between forward and encode.", labels=sid
        )
        for snapshot in snapshots:
            key = [snapshot.config.session_id]
            stats = snapshot.stats
            for each in SessionState:
                states.add_metric([*key, each.value], 1.0 if each is snapshot.state else 0.0)
            frames["decoded"].add_metric(key, stats.frames_decoded)
            frames["sent"].add_metric(key, stats.link.send.frames)
            frames["returned"].add_metric(key, stats.frames_returned)
            frames["encoded"].add_metric(key, stats.frames_encoded)
            frames["published"].add_metric(key, stats.frames_published)
            segments["in"].add_metric(key, stats.feed.segments)
            segments["out"].add_metric(key, stats.sink.segments)
            for quantile, seconds in (("0.5", stats.link.latency_p50), ("0.99", stats.link.latency_p99)):
                if not math.isnan(seconds):
                    latency.add_metric([*key, quantile], seconds)
            for queue in stats.queues:
                queue_depth.add_metric([*key, queue.name], queue.depth)
                queue_capacity.add_metric([*key, queue.name], queue.capacity)
            for reason, count in stats.drops.items():
                drops.add_metric([*key, reason], count)
            connections.add_metric(key, stats.link.connections)
            reconnects.add_metric(key, stats.reconnects)
            losses.add_metric(key, stats.link.losses)
            for leg, path, ways in (
                ("send", stats.paths.send, ("forward", "encode")),
                ("output", stats.paths.output, ("remux", "encode")),
            ):
                for way in ways:
                    paths.add_metric([*key, leg, way], 1.0 if way == path else 0.0)
            switches.add_metric(key, stats.paths.switches)
        yield states
        yield from frames.values()
        yield from segments.values()
        yield from (latency, queue_depth, queue_capacity, drops, connections, reconnects, losses)
        yield from (paths, switches)


def metrics_app(
    registry: CollectorRegistry, refresh: Callable[[], Awaitable[None]] | None = None
) -> web.Application:
    """GET /metrics: `registry` in the text format Prometheus asked for (OpenMetrics or 0.0.4),
    after `refresh()` (which gathers what its collectors then yield)."""

    async def metrics(request: web.Request) -> web.Response:
        if refresh is not None:
            await refresh()
        encode, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encode(registry), headers={"Content-Type": content_type})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    return app


async def serve_metrics(
    registry: CollectorRegistry, host: str, port: int, refresh: Callable[[], Awaitable[None]] | None = None
) -> tuple[web.AppRunner, int, str]:
    """Serve metrics_app(registry, refresh) on host:port (0: any free port); the runner (cleanup()
    stops it), the bound port and the endpoint's URL."""
    runner, bound, base = await bind(metrics_app(registry, refresh), host, port)
    return runner, bound, f"{base}/metrics"
