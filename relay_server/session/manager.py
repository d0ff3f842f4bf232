"""SessionManager: the sessions of one relay server, and the rules for starting them.

It holds running sessions and the last few ended ones (so their final state can still be read),
enforces the session limit and the one-session-per-processor guard (a ComfyStream server runs one
pipeline: a second session with prompts would replace the first one's workflow), and drains them
all on shutdown. Every session is started and stopped here; nothing else owns one.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

from relay_server.session.config import SessionConfig, check_hosts, validate
from relay_server.session.session import Session, SessionSnapshot
from relay_server.webrtc.link import LinkSettings

log = logging.getLogger(__name__)

MAX_SESSIONS = 8
KEEP_ENDED = 64  # ended sessions kept for Get/List, oldest forgotten first


class SessionExists(Exception):
    """A session with this id is running."""


class SessionNotFound(KeyError):
    """No session with this id (or it ended long enough ago to be forgotten)."""


class LimitReached(Exception):
    """The relay runs as many sessions as it may."""


class ProcessorBusy(Exception):
    """Another session uses this processor, and processors are single-tenant unless allowed."""


class NotAccepting(Exception):
    """The relay is draining: no new sessions."""


class SessionManager:
    def __init__(
        self,
        *,
        max_sessions: int = MAX_SESSIONS,
        allowed_hosts: frozenset[str] = frozenset(),
        link: LinkSettings | None = None,
        keep_ended: int = KEEP_ENDED,
    ) -> None:
        self.max_sessions = max_sessions
        self.allowed_hosts = allowed_hosts
        self.link = link or LinkSettings()
        self.keep_ended = keep_ended
        self.accepting = True
        self._sessions: OrderedDict[str, Session] = OrderedDict()  # in start order

    @property
    def active(self) -> list[Session]:
        return [session for session in self._sessions.values() if not session.state.ended]

    def start(self, config: SessionConfig) -> SessionSnapshot:
        """Validate and start a session (ConfigError, HostNotAllowed, SessionExists, LimitReached,
        ProcessorBusy, NotAccepting); returns its first snapshot at once: progress shows in its
        state."""
        if not self.accepting:
            raise NotAccepting("the relay is shutting down and takes no new sessions")
        validate(config)
        check_hosts(config, self.allowed_hosts)
        existing = self._sessions.get(config.session_id)
        if existing is not None and not existing.state.ended:
            raise SessionExists(f"session {config.session_id!r} is already {existing.state.value}")
        active = self.active
        if len(active) >= self.max_sessions:
            raise LimitReached(f"this relay runs at most {self.max_sessions} sessions")
        processor = _endpoint(config.processor_url)
        for other in active:
            shared = other.config.allow_shared_processor and config.allow_shared_processor
            if _endpoint(other.config.processor_url) == processor and not shared:
                raise ProcessorBusy(
                    f"processor {config.processor_url} is in use by session {other.config.session_id!r};"
                    " set allow_shared_processor on both to share it"
                )
        session = Session(config, link=self.link)
        self._sessions.pop(config.session_id, None)
        self._sessions[config.session_id] = session
        session.start()
        self._forget_ended()
        return session.snapshot()

    def get(self, session_id: str) -> Session:
        session = self._sessions.get(session_id)
        if session is None:
            raise SessionNotFound(f"no session {session_id!r}")
        return session

    def snapshots(self) -> list[SessionSnapshot]:
        return [session.snapshot() for session in self._sessions.values()]

    async def stop(self, session_id: str) -> SessionSnapshot:
        session = self.get(session_id)
        await session.stop()
        return session.snapshot()

    async def update(self, session_id: str, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Send control requests to the session's processor in order; their replies. Raises
        ControlError/ControlRejected (webrtc.control) as the first one fails."""
        session = self.get(session_id)
        return [await session.control(request) for request in requests]

    def watch(self, session_id: str, interval: float) -> AsyncIterator[SessionSnapshot]:
        return self.get(session_id).watch(interval)

    async def drain(self) -> None:
        """Take no new sessions, stop every running one and wait for them."""
        self.accepting = False
        sessions = self.active
        if sessions:
            log.info("draining %d session(s)", len(sessions))
            await asyncio.gather(*(session.stop("the relay is shutting down") for session in sessions))

    def _forget_ended(self) -> None:
        ended = [key for key, session in self._sessions.items() if session.state.ended]
        for key in ended[: max(0, len(ended) - self.keep_ended)]:
            del self._sessions[key]


def _endpoint(url: str) -> tuple[str, str, int | None, str]:
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port, parts.path.rstrip("/")
