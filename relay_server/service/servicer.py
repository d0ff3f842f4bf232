"""RelayServicer: RelayService's RPCs, thin: proto in, SessionManager, proto out.

Errors follow the gRPC error model, with google.rpc details where they help a caller fix the
request: INVALID_ARGUMENT (BadRequest field violations), PERMISSION_DENIED (a host outside the
allow-list, also with field violations), NOT_FOUND, ALREADY_EXISTS, RESOURCE_EXHAUSTED,
FAILED_PRECONDITION (a processor in use, a session that has ended), UNAVAILABLE (draining, or
the processor is not connected right now: worth a retry).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any, NoReturn

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from relay_server.api.relay.v1 import relay_service_pb2 as pb
from relay_server.api.relay.v1 import relay_service_pb2_grpc as pb_grpc
from relay_server.service.convert import to_config, to_dicts, to_session, to_structs
from relay_server.session.config import ConfigError, FieldViolation, HostNotAllowed, resize_problem
from relay_server.session.manager import (
    LimitReached,
    NotAccepting,
    ProcessorBusy,
    SessionExists,
    SessionManager,
    SessionNotFound,
)
from relay_server.session.paths import VideoMode
from relay_server.webrtc.control import ControlError, ControlRejected

log = logging.getLogger(__name__)

WATCH_INTERVAL = 1.0  # seconds, when the request leaves it unset
WATCH_LIMITS = (0.1, 60.0)


class RelayServicer(pb_grpc.RelayServiceServicer):
    def __init__(self, manager: SessionManager) -> None:
        self.manager = manager

    async def StartSession(
        self, request: pb.StartSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.StartSessionResponse:
        try:
            snapshot = self.manager.start(to_config(request))
        except HostNotAllowed as error:
            await _abort(context, grpc.StatusCode.PERMISSION_DENIED, str(error), error.violations)
        except ConfigError as error:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(error), error.violations)
        except SessionExists as error:
            await _abort(context, grpc.StatusCode.ALREADY_EXISTS, str(error))
        except LimitReached as error:
            await _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
        except ProcessorBusy as error:
            await _abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(error))
        except NotAccepting as error:
            await _abort(context, grpc.StatusCode.UNAVAILABLE, str(error))
        return pb.StartSessionResponse(session=to_session(snapshot))

    async def StopSession(
        self, request: pb.StopSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.StopSessionResponse:
        try:
            snapshot = await self.manager.stop(request.session_id)
        except SessionNotFound as error:
            await _abort(context, grpc.StatusCode.NOT_FOUND, error.args[0])
        return pb.StopSessionResponse(session=to_session(snapshot))

    async def GetSession(
        self, request: pb.GetSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetSessionResponse:
        try:
            session = self.manager.get(request.session_id)
        except SessionNotFound as error:
            await _abort(context, grpc.StatusCode.NOT_FOUND, error.args[0])
        return pb.GetSessionResponse(session=to_session(session.snapshot()))

    async def ListSessions(
        self, request: pb.ListSessionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListSessionsResponse:
        return pb.ListSessionsResponse(sessions=[to_session(s) for s in self.manager.snapshots()])

    async def UpdateSession(
        self, request: pb.UpdateSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpdateSessionResponse:
        if (request.width == 0) != (request.height == 0):
            await _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "width and height go together",
                [FieldViolation("width" if request.width == 0 else "height", "set both or neither")],
            )
        requests = _control_requests(request)
        if not requests:
            await _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "nothing to update: give prompts, width and height, or pause",
                [FieldViolation("prompts", "empty, and no other field set either")],
            )
        try:
            session = self.manager.get(request.session_id)
            if session.state.ended:
                await _abort(
                    context, grpc.StatusCode.FAILED_PRECONDITION, f"session {request.session_id!r} has ended"
                )
            if request.width:
                problem = resize_problem(session.config, request.width, request.height)
                if session.config.mode is VideoMode.PASSTHROUGH:
                    await _abort(context, grpc.StatusCode.FAILED_PRECONDITION, problem)
                if problem:
                    await _abort(
                        context, grpc.StatusCode.INVALID_ARGUMENT, problem, [FieldViolation("width", problem)]
                    )
            replies = await self.manager.update(request.session_id, requests)
        except SessionNotFound as error:
            await _abort(context, grpc.StatusCode.NOT_FOUND, error.args[0])
        except ControlRejected as error:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except ControlError as error:
            await _abort(context, grpc.StatusCode.UNAVAILABLE, str(error))
        return pb.UpdateSessionResponse(session=to_session(session.snapshot()), replies=to_structs(replies))

    async def WatchSession(
        self, request: pb.WatchSessionRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchSessionResponse]:
        interval = WATCH_INTERVAL
        if request.HasField("interval"):
            interval = request.interval.ToTimedelta().total_seconds()
            low, high = WATCH_LIMITS
            if not low <= interval <= high:
                await _abort(
                    context,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"interval must be {low:g}..{high:g} s",
                    [FieldViolation("interval", f"{interval:g} s is out of range")],
                )
        try:
            snapshots = self.manager.watch(request.session_id, interval)
        except SessionNotFound as error:
            await _abort(context, grpc.StatusCode.NOT_FOUND, error.args[0])
        async for snapshot in snapshots:
            yield pb.WatchSessionResponse(session=to_session(snapshot))


def _control_requests(request: pb.UpdateSessionRequest) -> list[dict[str, Any]]:
    requests: list[dict[str, Any]] = []
    if request.prompts:
        requests.append({"type": "update_prompts", "prompts": to_dicts(request.prompts)})
    if request.width and request.height:
        requests.append({"type": "update_resolution", "width": request.width, "height": request.height})
    if request.pause == pb.PAUSE_ACTION_PAUSE:
        requests.append({"type": "pause_prompts"})
    elif request.pause == pb.PAUSE_ACTION_RESUME:
        requests.append({"type": "resume_prompts"})
    return requests


async def _abort(
    context: grpc.aio.ServicerContext,
    code: grpc.StatusCode,
    message: str,
    violations: list[FieldViolation] | None = None,
) -> NoReturn:
    """End the RPC with `code`, `message` and, for field problems, google.rpc.BadRequest."""
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message)
    if violations:
        detail = any_pb2.Any()
        detail.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                    for v in violations
                ]
            )
        )
        status.details.append(detail)
    await context.abort_with_status(rpc_status.to_status(status))
    raise AssertionError("abort_with_status returns only by raising")
