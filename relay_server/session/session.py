"""Session: one relay and what surrounds it, driven through its states.

    STARTING ──▶ RUNNING ◀──▶ DEGRADED          (the processor link connects, is lost, is back)
        │           │            │
        └───────────┴────────────┴──▶ STOPPING ──▶ STOPPED   (stop(), or the input ended)
                                                └─▶ FAILED    (the relay raised: input, link, output)

A session owns every task it starts: the relay, the control relay (control_url → the
processor's control channel), and the message channels for status heartbeats (events_url,
every HEARTBEAT seconds and on each state change) and the processor's text outputs (data_url).
Whatever ends it, all of them are stopped and awaited, and the output channel is DELETEd (its
end of stream for readers).

Watchers never slow the media path: a state change only bumps a version and sets an event;
each watcher builds its own snapshot when it is ready for one.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import enum
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from relay_server.media.decoder import InputError
from relay_server.media.feeder import InputNotFound
from relay_server.session.config import SessionConfig, resize_problem
from relay_server.session.control import relay_control
from relay_server.session.messages import MessageChannel
from relay_server.session.relay import Relay, RelayStats
from relay_server.trickle.errors import TrickleError
from relay_server.trickle.publisher import Publisher
from relay_server.webrtc.control import ControlError
from relay_server.webrtc.link import LinkSettings, LinkState

log = logging.getLogger(__name__)

HEARTBEAT = 10.0  # seconds between status events when nothing changes
RATE_WINDOW = 1.0  # rates are measured over at least this many seconds
RATE_SAMPLES = 8

# The id of the session whose work is running: set for every task a session starts (tasks copy
# the context they are created in) and while stop() runs, so that log records can carry it
# (relay_server.service.logs). The decode thread runs in a copy of its starter's context.
current_session_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "current_session_id", default=None
)


class SessionState(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    DEGRADED = "degraded"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"

    @property
    def ended(self) -> bool:
        return self in (SessionState.STOPPED, SessionState.FAILED)


@dataclass(frozen=True)
class Rates:
    """Per second, over the last RATE_WINDOW seconds or more."""

    decoded: float = 0.0
    sent: float = 0.0
    returned: float = 0.0
    encoded: float = 0.0
    segments_in: float = 0.0
    segments_out: float = 0.0
    published: float = 0.0  # video frames written to the output, on every path


@dataclass(frozen=True)
class SessionSnapshot:
    config: SessionConfig
    state: SessionState
    reason: str
    created: datetime
    state_since: datetime
    stats: RelayStats
    rates: Rates
    version: int  # bumped on every state change


class Session:
    def __init__(self, config: SessionConfig, *, link: LinkSettings | None = None) -> None:
        self.config = config
        self.state = SessionState.STARTING
        self.reason = ""
        self.created = self.state_since = datetime.now(UTC)
        self.version = 0
        self._change = asyncio.Event()  # set (and replaced) on every version bump
        self._output = Publisher(config.publish_url)
        # The processor is asked for the output's bitrate: when it is remuxed, its video is the output.
        link_settings = replace(
            link or LinkSettings(),
            offer_timeout=config.offer_timeout,
            max_fps=config.max_fps,
            return_bitrate=config.encoder.bitrate,
        )
        self._relay: Relay | None = Relay(
            config.subscribe_url,
            self._output,
            config.processor_url,
            width=config.width,
            height=config.height,
            prompts=list(config.prompts) or None,
            mode=config.scale_mode,
            video_mode=config.mode,
            encoder=config.encoder,
            link=link_settings,
            fill=config.fill,
            latency_budget=config.latency_budget,
            on_link_state=self._on_link_state,
            on_data=self._on_data,
            name=config.session_id,
        )
        self._events = MessageChannel(config.events_url) if config.events_url else None
        self._data = MessageChannel(config.data_url) if config.data_url else None
        self._samples: deque[tuple[float, tuple[int, ...]]] = deque(maxlen=RATE_SAMPLES)
        self._task: asyncio.Task[None] | None = None
        # Once ended, a session is only its final snapshot: the media path (codec contexts,
        # frame pools, the peer connection: ~12 MB) is let go while the manager keeps the
        # session readable.
        self._final: SessionSnapshot | None = None

    @property
    def relay(self) -> Relay:
        if self._relay is None:
            raise RuntimeError(f"session {self.config.session_id} has ended: its media path is released")
        return self._relay

    @property
    def done(self) -> bool:
        return self._task is not None and self._task.done()

    def start(self) -> None:
        token = current_session_id.set(self.config.session_id)
        try:
            self._task = asyncio.create_task(self._run(), name=f"session {self.config.session_id}")
        finally:
            current_session_id.reset(token)

    async def stop(self, reason: str = "stopped by request") -> None:
        """Stop the session and wait until everything it owns has ended."""
        token = current_session_id.set(self.config.session_id)
        try:
            if not self.state.ended and self.state is not SessionState.STOPPING:
                self._set_state(SessionState.STOPPING, reason)
            if self._relay is not None:
                await self._relay.stop()
            if self._task is not None:
                await asyncio.wait([self._task])
        finally:
            current_session_id.reset(token)

    async def control(self, request: dict[str, Any]) -> dict[str, Any]:
        """A request on the processor's control channel, and its reply (see ProcessorLink). A new
        resolution the processor accepted is the session's size from then on, end to end."""
        if self._relay is None:
            raise ControlError(f"session {self.config.session_id} has ended")
        resize = request.get("type") == "update_resolution"
        if resize:
            problem = resize_problem(self.config, request.get("width"), request.get("height"))
            if problem:
                raise ControlError(problem)
        reply = await self._relay.link.control(request)
        if resize and self._relay is not None:
            width, height = request["width"], request["height"]
            self._relay.resize(width, height)
            self.config = replace(self.config, width=width, height=height)
        self._bump()  # prompts or the size may have changed
        return reply

    def snapshot(self) -> SessionSnapshot:
        if self._final is not None:
            return self._final
        stats = self.relay.stats
        return SessionSnapshot(
            config=replace(self.config, prompts=tuple(self.relay.link.prompts or ())),
            state=self.state,
            reason=self.reason,
            created=self.created,
            state_since=self.state_since,
            stats=stats,
            rates=self._rates(stats),
            version=self.version,
        )

    async def watch(self, interval: float) -> AsyncIterator[SessionSnapshot]:
        """A snapshot now, then one on every state change and every `interval` seconds, until
        the session has ended (its final snapshot is the last)."""
        while True:
            snapshot = self.snapshot()
            yield snapshot
            if snapshot.state.ended:
                return
            await self.until_changed(snapshot.version, interval)

    async def until_changed(self, version: int, within: float) -> None:
        """Return once the version is past `version`, or after `within` seconds."""
        if self.version != version:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await self._change.wait()

    # -- the run ---------------------------------------------------------------------------------

    async def _run(self) -> None:
        config = self.config
        helpers: list[asyncio.Task[None]] = []
        for channel in (self._events, self._data):
            if channel is not None:
                channel.start()
        if self._events is not None:
            helpers.append(asyncio.create_task(self._heartbeat(), name=f"heartbeat {config.session_id}"))
        if config.control_url:
            helpers.append(asyncio.create_task(self._relay_control(), name=f"control {config.session_id}"))
        try:
            await self.relay.run()
        except Exception as error:
            log.warning("session %s failed: %s", config.session_id, error)
            self._set_state(SessionState.FAILED, failure_reason(error))
        finally:
            for task in helpers:
                task.cancel()
            if helpers:
                await asyncio.wait(helpers)
            try:
                await self._output.close()  # DELETE: the output's end of stream
            except TrickleError as error:
                log.warning("session %s: output channel not deleted: %s", config.session_id, error)
            if not self.state.ended:
                reason = self.reason if self.state is SessionState.STOPPING else "the input ended"
                self._set_state(SessionState.STOPPED, reason)
            if self._events is not None:
                self._events.send(self._status())  # the final state: the heartbeat has ended
            for channel in (self._events, self._data):
                if channel is not None:
                    await channel.close()
            self._final = self.snapshot()
            self._relay = None

    async def _heartbeat(self) -> None:
        assert self._events is not None
        while True:
            version = self.version
            self._events.send(self._status())
            await self.until_changed(version, HEARTBEAT)

    async def _relay_control(self) -> None:
        try:
            await relay_control(self.config.control_url, self.control, self._on_control_reply)
        except TrickleError as error:
            # The session goes on without it; the events and the log say so.
            log.warning("session %s: control channel lost: %s", self.config.session_id, error)
            self._on_control_reply({}, {"type": "error", "error": f"control channel lost: {error}"})

    def _status(self) -> dict[str, Any]:
        snapshot = self.snapshot()
        stats = snapshot.stats
        return {
            "type": "status",
            "session_id": self.config.session_id,
            "gateway_request_id": self.config.gateway_request_id,
            "state": snapshot.state.value,
            "reason": snapshot.reason,
            "timestamp": datetime.now(UTC).isoformat(),
            "fps": {
                "decoded": snapshot.rates.decoded,
                "returned": snapshot.rates.returned,
                "published": snapshot.rates.published,
            },
            "frames": {
                "decoded": stats.frames_decoded,
                "returned": stats.frames_returned,
                "published": stats.frames_published,
            },
            "latency_ms": {"p50": _ms(stats.link.latency_p50), "p99": _ms(stats.link.latency_p99)},
        }

    # -- callbacks -------------------------------------------------------------------------------

    def _on_link_state(self, state: LinkState, reason: str) -> None:
        if self.state in (SessionState.STOPPING, SessionState.STOPPED, SessionState.FAILED):
            return
        if state is LinkState.CONNECTED:
            self._set_state(SessionState.RUNNING, "")
        elif state is LinkState.RECONNECTING:
            self._set_state(SessionState.DEGRADED, reason)
        elif state is LinkState.CONNECTING:
            self._set_state(SessionState.STARTING, reason)

    def _on_data(self, text: str) -> None:
        if self._data is not None:
            self._data.send({"type": "data", "session_id": self.config.session_id, "data": text})

    def _on_control_reply(self, request: dict[str, Any], reply: dict[str, Any]) -> None:
        if self._events is not None:
            self._events.send({"type": "control_reply", "session_id": self.config.session_id, "reply": reply})

    def _set_state(self, state: SessionState, reason: str) -> None:
        if (state, reason) == (self.state, self.reason):
            return
        log.info("session %s: %s%s", self.config.session_id, state.value, f" ({reason})" if reason else "")
        self.state, self.reason = state, reason
        self.state_since = datetime.now(UTC)
        self._bump()

    def _bump(self) -> None:
        self.version += 1
        change, self._change = self._change, asyncio.Event()
        change.set()  # wakes every watcher waiting on this version

    def _rates(self, stats: RelayStats) -> Rates:
        now = time.monotonic()
        counters = (
            stats.frames_decoded,
            stats.link.send.frames,
            stats.frames_returned,
            stats.frames_encoded,
            stats.feed.segments,
            stats.sink.segments,
            stats.frames_published,
        )
        if not self._samples or now - self._samples[-1][0] >= RATE_WINDOW / 2:
            self._samples.append((now, counters))
        base = next((s for s in reversed(self._samples) if now - s[0] >= RATE_WINDOW), self._samples[0])
        elapsed = now - base[0]
        if elapsed < RATE_WINDOW / 2:
            return Rates()
        return Rates(*((b - a) / elapsed for a, b in zip(base[1], counters, strict=True)))


def failure_reason(error: Exception) -> str:
    """The reason a failed session gives: what the input's errors say is a sentence a person can
    act on as it is; other errors carry their class's name, which says where they came from."""
    if isinstance(error, InputError | InputNotFound):
        return str(error)
    return f"{type(error).__name__}: {error}"


def _ms(seconds: float) -> float | None:
    return None if seconds != seconds else round(seconds * 1000, 1)  # NaN: not measured
