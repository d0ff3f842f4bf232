"""Bearer-token authentication for RelayService.

    RelayServer(manager, interceptors=[BearerTokenInterceptor(token)])

Every relay.v1.RelayService call must carry `authorization: Bearer <token>` metadata; a missing,
malformed or wrong one ends the call with UNAUTHENTICATED, a message saying which and ErrorInfo
(reason UNAUTHENTICATED), as every error of the relay. Health
and reflection stay open, so that load balancers and grpcurl's discovery work without the token.
Tokens are compared with hmac.compare_digest (no timing hint of how much of a guess was right).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc

from relay_server.errors import Unauthenticated
from relay_server.service.server import SERVICE_NAME
from relay_server.service.servicer import abort

log = logging.getLogger(__name__)

HEADER = "authorization"
SCHEME = "bearer"


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str, *, services: Sequence[str] = (SERVICE_NAME,)) -> None:
        if not token:
            raise ValueError("the bearer token must not be empty")
        self._token = token.encode()
        self._prefixes = tuple(f"/{service}/" for service in services)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(self._prefixes):
            return handler
        problem = self.check(handler_call_details.invocation_metadata or ())
        if problem is None:
            return handler
        log.warning("refused %s: %s", method, problem)
        return _denied(handler, problem)

    def check(self, metadata: Sequence[tuple[str, str | bytes]]) -> str | None:
        """None when `metadata` carries the right token, else what is wrong with it."""
        values = [value for key, value in metadata if key.lower() == HEADER]
        if not values:
            return "missing credentials: send metadata 'authorization: Bearer <token>'"
        if len(values) > 1:
            return "more than one 'authorization' metadata entry"
        value = values[0]
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        scheme, _, token = text.strip().partition(" ")
        if scheme.lower() != SCHEME or not token.strip():
            return "malformed credentials: 'authorization' metadata must be 'Bearer <token>'"
        if not hmac.compare_digest(token.strip().encode("utf-8", "surrogateescape"), self._token):
            return "invalid bearer token"
        return None


def _denied(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that ends the call with UNAUTHENTICATED."""

    async def deny(context: grpc.aio.ServicerContext) -> None:
        await abort(context, Unauthenticated(message))

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await deny(context)

    async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await deny(context)
        yield  # never reached: makes this an async generator, as a streaming handler is

    serialize = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(stream, **serialize)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary, **serialize)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(stream, **serialize)
    return grpc.unary_unary_rpc_method_handler(unary, **serialize)
