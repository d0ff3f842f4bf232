"""RelayServicer: RelayService's RPCs, thin: proto in, SessionManager, proto out.

Every request is bounded (bounds.py) and checked before anything acts on it. Errors are the
relay's own (relay_server.errors.RelayError), turned into a google.rpc.Status here and nowhere
else: the code the error names, its message, and details (ErrorInfo on every error; BadRequest,
RetryInfo or PreconditionFailure where the error carries them). Anything else that escapes a
handler is a fault of the relay: INTERNAL with ErrorInfo, and its traceback in the log.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from relay_server.api.relay.v1 import relay_service_pb2 as pb
from relay_server.api.relay.v1 import relay_service_pb2_grpc as pb_grpc
from relay_server.errors import (
    DOMAIN,
    ConfigError,
    FieldViolation,
    NotResizable,
    Precondition,
    RelayError,
    SessionEnded,
)
from relay_server.service import bounds, pages
from relay_server.service.convert import duration, seconds, to_config, to_dicts, to_session, to_structs
from relay_server.session.config import resize_problem
from relay_server.session.manager import SessionManager
from relay_server.session.paths import VideoMode

log = logging.getLogger(__name__)

WATCH_INTERVAL = 1.0  # seconds, when the request leaves it unset
WATCH_LIMITS = (0.1, 60.0)
PAUSE_ACTIONS = (pb.PAUSE_ACTION_UNSPECIFIED, pb.PAUSE_ACTION_PAUSE, pb.PAUSE_ACTION_RESUME)


class RelayServicer(pb_grpc.RelayServiceServicer):
    def __init__(self, manager: SessionManager, replica: str | None = None) -> None:
        self.manager = manager
        self.replica = replica  # qualifies the session ids this relay makes

    async def StartSession(
        self, request: pb.StartSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.StartSessionResponse:
        async with reported(context):
            bounds.check_prompts(request.prompts)
            snapshot = await self.manager.start(to_config(request, self.replica))
        return pb.StartSessionResponse(session=to_session(snapshot))

    async def StopSession(
        self, request: pb.StopSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.StopSessionResponse:
        async with reported(context):
            bounds.check_session_id(request.session_id)
            snapshot = await self.manager.stop(request.session_id)
        return pb.StopSessionResponse(session=to_session(snapshot))

    async def GetSession(
        self, request: pb.GetSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetSessionResponse:
        async with reported(context):
            bounds.check_session_id(request.session_id)
            session = self.manager.get(request.session_id)
        return pb.GetSessionResponse(session=to_session(session.snapshot()))

    async def ListSessions(
        self, request: pb.ListSessionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListSessionsResponse:
        async with reported(context):
            size = pages.page_size(request.page_size)
            after = pages.decode_token(request.page_token, self.manager.epoch, self.manager.last_position)
        entries = [
            (position, lambda session=session: to_session(session.snapshot()))
            for position, session in self.manager.listing(after)
        ]
        sessions, last = pages.take_page(entries, size)
        token = "" if last is None else pages.encode_token(self.manager.epoch, last)
        return pb.ListSessionsResponse(sessions=sessions, next_page_token=token)

    async def UpdateSession(
        self, request: pb.UpdateSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpdateSessionResponse:
        async with reported(context):
            requests = _check_update(request)
            session = self.manager.get(request.session_id)
            subject = f"sessions/{request.session_id}"
            if session.state.ended:
                raise SessionEnded(
                    f"session {request.session_id!r} has ended",
                    precondition=Precondition(
                        "SESSION_ACTIVE", subject, f"the session is {session.state.value}"
                    ),
                )
            if request.width:
                problem = resize_problem(session.config, request.width, request.height)
                if session.config.mode is VideoMode.PASSTHROUGH:
                    raise NotResizable(
                        problem, precondition=Precondition("SESSION_RESIZABLE", subject, problem)
                    )
                if problem:
                    raise ConfigError([FieldViolation("width", problem)], message=problem)
            replies = await self.manager.update(request.session_id, requests)
        return pb.UpdateSessionResponse(session=to_session(session.snapshot()), replies=to_structs(replies))

    async def WatchSession(
        self, request: pb.WatchSessionRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchSessionResponse]:
        async with reported(context):
            bounds.check_session_id(request.session_id)
            interval = WATCH_INTERVAL
            if request.HasField("interval"):
                interval = seconds(request.interval)
                low, high = WATCH_LIMITS
                if not low <= interval <= high:
                    problem = FieldViolation("interval", f"{interval:g} s is out of range")
                    raise ConfigError([problem], message=f"interval must be {low:g}..{high:g} s")
            snapshots = self.manager.watch(request.session_id, interval)
            async for snapshot in snapshots:
                yield pb.WatchSessionResponse(session=to_session(snapshot))


def _check_update(request: pb.UpdateSessionRequest) -> list[dict[str, Any]]:
    """The control requests an UpdateSession asks for, once its fields are checked."""
    bounds.check_session_id(request.session_id)
    bounds.check_prompts(request.prompts)
    if request.pause not in PAUSE_ACTIONS:
        raise ConfigError([FieldViolation("pause", f"unknown value {request.pause}")])
    if (request.width == 0) != (request.height == 0):
        problem = FieldViolation("width" if request.width == 0 else "height", "set both or neither")
        raise ConfigError([problem], message="width and height go together")
    requests = _control_requests(request)
    if not requests:
        problem = FieldViolation("prompts", "empty, and no other field set either")
        raise ConfigError([problem], message="nothing to update: give prompts, width and height, or pause")
    return requests


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


@contextlib.asynccontextmanager
async def reported(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    """End the RPC with the status of a RelayError raised inside, or INTERNAL for anything else."""
    try:
        yield
    except grpc.aio.AbortError:
        raise
    except RelayError as error:
        await abort(context, error)
    except Exception:
        log.exception("RelayService call failed")
        await abort(context, RelayError("internal error"))


async def abort(context: grpc.aio.ServicerContext, error: RelayError) -> None:
    """End the RPC with `error`'s status and details."""
    await context.abort_with_status(rpc_status.to_status(to_status(error)))


def to_status(error: RelayError) -> status_pb2.Status:
    """The google.rpc.Status a RelayError is reported with: its code and message, ErrorInfo, and
    BadRequest, RetryInfo or PreconditionFailure when it carries them."""
    details: list[Message] = []
    if error.violations:
        details.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                    for v in error.violations
                ]
            )
        )
    if error.retry_after is not None:
        details.append(error_details_pb2.RetryInfo(retry_delay=duration(error.retry_after)))
    if error.precondition is not None:
        kind, subject, description = error.precondition
        violation = error_details_pb2.PreconditionFailure.Violation(
            type=kind, subject=subject, description=description
        )
        details.append(error_details_pb2.PreconditionFailure(violations=[violation]))
    # ErrorInfo last: a client that reads only the first detail still finds the one for its code.
    details.append(error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=error.metadata))
    status = status_pb2.Status(code=getattr(code_pb2, error.code), message=error.message)
    for detail in details:
        status.details.add().Pack(detail)
    return status
