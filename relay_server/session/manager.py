"""SessionManager: the sessions of one relay server, and the rules for starting them.

It holds running sessions and the last few ended ones (so their final state can still be read:
at most `keep_ended` of them and `keep_ended_bytes` of their configurations, oldest forgotten
first), enforces the session limit and the one-session-per-processor guard (a ComfyStream server
runs one pipeline: a second session with prompts would replace the first one's workflow; two URLs
are the same processor when their hosts resolve to a common address with the same port and path),
and drains them all on shutdown. Every session is started and stopped here; nothing else owns one.
Each session gets a sequence number at its start, so that a listing can be read in pages that
neither repeat nor skip a session as others start and end.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

from relay_server.errors import (
    FieldViolation,
    LimitReached,
    NotAccepting,
    Precondition,
    ProcessorBusy,
    ProcessorRejected,
    ProcessorUnavailable,
    SessionExists,
    SessionNotFound,
)
from relay_server.session.config import Endpoint, SessionConfig, check_hosts, parse_url, validate
from relay_server.session.session import Session, SessionSnapshot
from relay_server.webrtc.control import ControlError, ControlRejected
from relay_server.webrtc.link import LinkSettings

log = logging.getLogger(__name__)

MAX_SESSIONS = 8
KEEP_ENDED = 64  # ended sessions kept for Get/List, oldest forgotten first
KEEP_ENDED_BYTES = 16 << 20  # and at most this much of their configurations (prompts mostly)
RESOLVE_TIMEOUT = 2.0  # seconds a processor host's name may take to resolve
# Which field of UpdateSession each control request comes from, for a processor's refusal.
CONTROL_FIELDS = {"update_prompts": "prompts", "update_resolution": "width", "pause_prompts": "pause"}


@dataclass
class _Entry:
    session: Session
    seq: int  # order of start, for listings
    processor: frozenset[tuple[str, int, str]]  # (address, port, path) the processor URL reaches
    weight: int | None = None  # bytes held, once ended


class SessionManager:
    def __init__(
        self,
        *,
        max_sessions: int = MAX_SESSIONS,
        allowed_hosts: frozenset[str] = frozenset(),
        link: LinkSettings | None = None,
        keep_ended: int = KEEP_ENDED,
        keep_ended_bytes: int = KEEP_ENDED_BYTES,
    ) -> None:
        self.max_sessions = max_sessions
        self.allowed_hosts = allowed_hosts
        # The allow-list covers the processor's ICE candidates too (webrtc/candidates.py).
        self.link = replace(link or LinkSettings(), allowed_hosts=allowed_hosts)
        self.keep_ended = keep_ended
        self.keep_ended_bytes = keep_ended_bytes
        self.accepting = True
        # Tells this manager's listing positions from another's (a relay restarted in between).
        self.epoch = secrets.token_hex(4)
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # in start order
        self.last_position = 0  # the position of the latest session started (0 before the first)

    @property
    def active(self) -> list[Session]:
        return [entry.session for entry in self._entries.values() if not entry.session.state.ended]

    async def start(self, config: SessionConfig) -> SessionSnapshot:
        """Validate and start a session (ConfigError, HostNotAllowed, SessionExists, LimitReached,
        ProcessorBusy, NotAccepting); returns its first snapshot at once: progress shows in its
        state."""
        self._check_accepting()
        validate(config)
        check_hosts(config, self.allowed_hosts)
        processor = await _reach(parse_url(config.processor_url))
        # From here on nothing awaits: the checks and the start are one step for the event loop.
        self._check_accepting()
        existing = self._entries.get(config.session_id)
        if existing is not None and not existing.session.state.ended:
            state = existing.session.state.value
            raise SessionExists(
                f"session {config.session_id!r} is already {state}", metadata={"state": state}
            )
        if len(self.active) >= self.max_sessions:
            raise LimitReached(
                f"this relay runs at most {self.max_sessions} sessions",
                metadata={"max_sessions": str(self.max_sessions)},
            )
        for other in self._entries.values():
            if other.session.state.ended or not other.processor & processor:
                continue
            if not (other.session.config.allow_shared_processor and config.allow_shared_processor):
                other_id = other.session.config.session_id
                raise ProcessorBusy(
                    f"processor {config.processor_url} is in use by session {other_id!r};"
                    " set allow_shared_processor on both to share it",
                    precondition=Precondition(
                        "PROCESSOR_FREE",
                        config.processor_url,
                        f"in use by session {other_id!r}, which does not share it",
                    ),
                    metadata={"session_id": other_id},
                )
        session = Session(config, link=self.link)
        self._entries.pop(config.session_id, None)
        self.last_position += 1
        self._entries[config.session_id] = _Entry(session, self.last_position, processor)
        session.start()
        self._forget_ended()
        return session.snapshot()

    def get(self, session_id: str) -> Session:
        entry = self._entries.get(session_id)
        if entry is None:
            raise SessionNotFound(session_id)
        return entry.session

    def snapshots(self) -> list[SessionSnapshot]:
        return [entry.session.snapshot() for entry in self._entries.values()]

    def listing(self, after: int) -> list[tuple[int, Session]]:
        """The sessions started after position `after` (0: all), in start order, each with its
        position."""
        return [(entry.seq, entry.session) for entry in self._entries.values() if entry.seq > after]

    async def stop(self, session_id: str) -> SessionSnapshot:
        session = self.get(session_id)
        await session.stop()
        self._forget_ended()
        return session.snapshot()

    async def update(self, session_id: str, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Send control requests to the session's processor in order; their replies. Raises
        ProcessorRejected/ProcessorUnavailable as the first one fails."""
        session = self.get(session_id)
        replies = []
        for request in requests:
            try:
                replies.append(await session.control(request))
            except ControlRejected as error:
                field = CONTROL_FIELDS.get(request["type"], "pause")
                raise ProcessorRejected(
                    str(error),
                    violations=[FieldViolation(field, f"the processor refused it: {error}")],
                    metadata={"request": request["type"]},
                ) from None
            except ControlError as error:
                raise ProcessorUnavailable(str(error), metadata={"request": request["type"]}) from None
        return replies

    def watch(self, session_id: str, interval: float) -> AsyncIterator[SessionSnapshot]:
        return self.get(session_id).watch(interval)

    async def drain(self) -> None:
        """Take no new sessions, stop every running one and wait for them."""
        self.accepting = False
        sessions = self.active
        if sessions:
            log.info("draining %d session(s)", len(sessions))
            await asyncio.gather(*(session.stop("the relay is shutting down") for session in sessions))

    def _check_accepting(self) -> None:
        if not self.accepting:
            raise NotAccepting("the relay is shutting down and takes no new sessions")

    def _forget_ended(self) -> None:
        """Forget the oldest ended sessions beyond `keep_ended` of them or `keep_ended_bytes`."""
        ended = [(key, entry) for key, entry in self._entries.items() if entry.session.state.ended]
        for _, entry in ended:
            if entry.weight is None:  # an ended session's configuration no longer changes
                entry.weight = entry.session.snapshot().config.weight
        count, held = len(ended), sum(entry.weight or 0 for _, entry in ended)
        for key, entry in ended:
            if count <= self.keep_ended and held <= self.keep_ended_bytes:
                break
            del self._entries[key]
            count, held = count - 1, held - (entry.weight or 0)


async def _reach(endpoint: Endpoint) -> frozenset[tuple[str, int, str]]:
    """The addresses (with port and path) an endpoint reaches: its host resolved off the event
    loop, or the host name itself when it does not resolve within RESOLVE_TIMEOUT (the session
    then fails to connect, saying why)."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(RESOLVE_TIMEOUT):
            infos = await loop.getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_STREAM)
    except (OSError, TimeoutError) as error:
        log.info("processor host %r does not resolve (%s): compared by name", endpoint.host, error)
        return frozenset({(endpoint.host, endpoint.port, endpoint.path)})
    return frozenset((str(info[4][0]), endpoint.port, endpoint.path) for info in infos)
