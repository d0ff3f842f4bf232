"""RelayError: the relay's own errors, each with a stable reason and the gRPC status it maps to.

The reason (UPPER_SNAKE_CASE, never reworded) is what a caller branches on; the message is for
people. `code` names a gRPC status code (grpc.StatusCode member name) without importing gRPC here:
the servicer turns an error into a google.rpc.Status in one place, with these details:

- every error: ErrorInfo(reason, domain=DOMAIN, metadata);
- `violations` (INVALID_ARGUMENT, PERMISSION_DENIED): BadRequest, one field violation each;
- `retry_after` (UNAVAILABLE, RESOURCE_EXHAUSTED): RetryInfo;
- `precondition` (FAILED_PRECONDITION): PreconditionFailure naming the precondition that failed.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

DOMAIN = "trickle-relay"


class FieldViolation(NamedTuple):
    field: str  # the request field at fault, e.g. "publish_url" or "encoder.gop"
    description: str


class Precondition(NamedTuple):
    type: str  # what kind of precondition, e.g. "PROCESSOR_FREE"
    subject: str  # what it is about, e.g. the processor URL or "sessions/ID"
    description: str


class RelayError(Exception):
    """An error of the relay's own, reported to callers as `code` with `reason`."""

    reason: ClassVar[str] = "INTERNAL"
    code: ClassVar[str] = "INTERNAL"
    retry_after: ClassVar[float | None] = None  # seconds worth waiting before a retry

    def __init__(
        self,
        message: str,
        *,
        violations: list[FieldViolation] | None = None,
        precondition: Precondition | None = None,
        metadata: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.violations = violations or []
        self.precondition = precondition
        self.metadata = metadata or {}


class ConfigError(RelayError, ValueError):
    """The request is invalid; `violations` says where and why."""

    reason = "INVALID_FIELD"
    code = "INVALID_ARGUMENT"

    def __init__(self, violations: list[FieldViolation], message: str = "") -> None:
        super().__init__(
            message or "; ".join(f"{v.field}: {v.description}" for v in violations),
            violations=violations,
            metadata={"fields": ",".join(v.field for v in violations)},
        )


class HostNotAllowed(ConfigError):
    """A URL names a host outside the relay's allow-list."""

    reason = "HOST_NOT_ALLOWED"
    code = "PERMISSION_DENIED"


class SessionNotFound(RelayError, KeyError):
    """No session with this id (or it ended long enough ago to be forgotten)."""

    reason = "SESSION_NOT_FOUND"
    code = "NOT_FOUND"

    def __init__(self, session_id: str) -> None:
        super().__init__(f"no session {session_id!r}", metadata={"session_id": session_id})

    def __str__(self) -> str:  # KeyError's would quote the message
        return self.message


class SessionExists(RelayError):
    """A session with this id is running."""

    reason = "SESSION_EXISTS"
    code = "ALREADY_EXISTS"


class LimitReached(RelayError):
    """The relay runs as many sessions as it may."""

    reason = "SESSION_LIMIT_REACHED"
    code = "RESOURCE_EXHAUSTED"
    retry_after = 5.0  # a session may end at any time; polling faster than this helps nobody


class NotAccepting(RelayError):
    """The relay is draining: no new sessions."""

    reason = "DRAINING"
    code = "UNAVAILABLE"
    retry_after = 1.0  # another replica, or this one once restarted


class WorkerDown(RelayError):
    """The worker process running the session is being started again."""

    reason = "WORKER_DOWN"
    code = "UNAVAILABLE"
    retry_after = 1.0  # a worker starts in about a second


class ProcessorBusy(RelayError):
    """Another session uses this processor, and processors are single-tenant unless allowed."""

    reason = "PROCESSOR_IN_USE"
    code = "FAILED_PRECONDITION"


class SessionEnded(RelayError):
    """The session has ended: it takes no more changes."""

    reason = "SESSION_ENDED"
    code = "FAILED_PRECONDITION"


class NotResizable(RelayError):
    """The session forwards its input as it is, at the input's size."""

    reason = "SESSION_NOT_RESIZABLE"
    code = "FAILED_PRECONDITION"


class ProcessorRejected(RelayError):
    """The processor answered a control request with a failure (a workflow it cannot run)."""

    reason = "PROCESSOR_REJECTED"
    code = "INVALID_ARGUMENT"


class ProcessorUnavailable(RelayError):
    """The processor cannot take a control request now (not connected, no reply in time)."""

    reason = "PROCESSOR_UNAVAILABLE"
    code = "UNAVAILABLE"
    retry_after = 1.0  # the session reconnects its processor by itself


class Unauthenticated(RelayError):
    """The call carries no bearer token, a malformed one or a wrong one."""

    reason = "UNAUTHENTICATED"
    code = "UNAUTHENTICATED"
