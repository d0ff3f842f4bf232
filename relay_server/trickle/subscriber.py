"""Subscriber: follows a trickle channel at its live edge, handing out each segment as chunks.

    async with Subscriber(url) as subscriber:
        async for segment in subscriber:
            async for chunk in segment:
                ...

A segment is handed out as soon as its first byte exists and its bytes are streamed as they
arrive, never buffered whole. While segment n is read, a GET for n+1 is already waiting at the
server (preconnect), so the next segment starts without a round trip.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from types import TracebackType

import aiohttp

from relay_server import redirects, settings
from relay_server.backoff import Backoff
from relay_server.trickle import protocol
from relay_server.trickle.backoff import RetryBudget
from relay_server.trickle.errors import RedirectRefused, TrickleError

log = logging.getLogger(__name__)

# How long a stalled segment may still deliver its tail once the next one has started. A
# publisher writes segments in order, so by then the tail is at most a network delay away; a
# longer stall means the publisher died mid-segment without closing it.
ABANDON_AFTER = 1.0
# After a failure the channel may be gone or rewound (server restart); within the start-up grace,
# waits for a segment to start are re-issued this often until data flows, not every TRICKLE_TIMEOUT.
RECOVERY_WAIT = 2.0
# Retry timing for a channel that does not exist yet (404 within the start-up grace). A session
# routinely starts before its input, whose first frames wait for the next try: measured, a
# session started 5 s before its input had its first output 0.31-0.39 s after the first input
# frame with tries up to 0.5 s apart, 0.06-0.12 s with tries 0.02 s apart. A try every 0.1 s:
# ten small requests a second, for at most the start-up grace.
NOT_FOUND_BACKOFF = Backoff(initial=0.1, factor=1.0, maximum=0.1, attempts=1_000_000)

_TRANSPORT_ERRORS = (aiohttp.ClientError, OSError)


@dataclass
class SubscriberStats:
    segments: int = 0  # segments with data handed out
    bytes: int = 0  # bytes handed out
    skipped: int = 0  # segments jumped over (470) or empty
    retries: int = 0  # failed requests tried again
    reissues: int = 0  # requests re-issued after TRICKLE_TIMEOUT without progress
    abandoned: int = 0  # segments cut short: stalled while the next one had started, or evicted


@dataclass(frozen=True)
class _Opened:
    seq: int
    response: aiohttp.ClientResponse


@dataclass(frozen=True)
class _Ended:
    reason: str  # "closed" | "not_found" | "lost" (a resumed segment is no longer there)


class Subscriber:
    """Reads a channel from `start_seq` (-2: the segment in progress, -1: the next one)."""

    def __init__(
        self,
        url: str,
        *,
        start_seq: int = protocol.SEQ_IN_PROGRESS,
        chunk_size: int | None = None,
        timeout: float | None = None,
        startup_grace: float = 10.0,
        backoff: Backoff | None = None,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        if start_seq < protocol.SEQ_IN_PROGRESS:
            raise ValueError(f"start_seq must be >= -2, got {start_seq}")
        self.url = url.rstrip("/")
        self.chunk_size = chunk_size or settings.chunk_size()
        self.timeout = timeout or settings.request_timeout()
        self.startup_grace = startup_grace
        self.backoff = backoff or Backoff()
        self.stats = SubscriberStats()
        # The channel did not exist yet when reading began (404 within the start-up grace): its
        # stream is read from its start, not joined while live.
        self.waited_for_channel = False
        # Why iteration ended: "closed" (Lp-Trickle-Closed) or "not_found" (404); None while live.
        self.end_reason: str | None = None
        self._session = session
        self._owns_session = session is None
        self._seq = start_seq
        self._current: Segment | None = None
        self._next: asyncio.Task[_Opened | _Ended] | None = None
        self._loop = asyncio.get_running_loop()
        # A 404 before this loop time means "not created yet" rather than "gone".
        self._grace_until = self._loop.time() + startup_grace
        self._recovering = False
        self._closed = False

    async def __aenter__(self) -> Subscriber:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def __aiter__(self) -> Subscriber:
        return self

    async def __anext__(self) -> Segment:
        if self._current is not None:
            self._current.release()
            self._current = None
        if self._closed or self.end_reason is not None:
            raise StopAsyncIteration
        pending, self._next = self._next or self._start_open(self._seq), None
        opened = await pending
        if isinstance(opened, _Ended):
            self.end_reason = opened.reason
            log.info("subscriber %s: end of stream (%s)", self.url, opened.reason)
            raise StopAsyncIteration
        self._seq = opened.seq + 1
        self.stats.segments += 1
        self._current = Segment(self, opened.seq, opened.response)
        self._next = self._start_open(self._seq)
        self._next.add_done_callback(self._current._next_started)
        return self._current

    async def close(self) -> None:
        """Stop reading: cancel the waiting preconnect and drop the connections."""
        if self._closed:
            return
        self._closed = True
        if self._current is not None:
            self._current.release()
        if self._next is not None:
            self._next.cancel()
            try:
                opened = await self._next
            except (asyncio.CancelledError, TrickleError):
                pass
            else:
                if isinstance(opened, _Opened):
                    opened.response.close()
        if self._owns_session and self._session is not None:
            await self._session.close()

    # -- requests -------------------------------------------------------------------------

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                # No total timeout: a long-poll may legitimately wait for minutes.
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.timeout),
                read_bufsize=max(self.chunk_size, 64 * 1024),
                auto_decompress=False,
            )
        return self._session

    def _start_open(self, seq: int) -> asyncio.Task[_Opened | _Ended]:
        return self._loop.create_task(self._open(seq), name=f"trickle-get {self.url}/{seq}")

    async def _open(self, seq: int, *, resume: bool = False) -> _Opened | _Ended:
        """Wait until `seq` has data and return its response, or say why the stream ended.

        Follows 470 to the live edge and skips empty segments, except when `resume` is set:
        then only `seq` itself will do, and its absence ends the segment ("lost"). Raises
        RedirectRefused on a 3xx, TrickleError when the retries are spent.
        """
        failures = RetryBudget(self.backoff, f"GET {self.url}/{seq}")
        not_found = RetryBudget(NOT_FOUND_BACKOFF, f"GET {self.url}/{seq}")
        while True:
            url = f"{self.url}/{seq}"
            try:
                async with asyncio.timeout(self._wait_limit()):
                    response = await self._http().get(url, allow_redirects=False)
            except TimeoutError:
                # No headers yet is normal for a segment that has not started; re-issuing
                # guards against a connection that died silently on the way.
                self.stats.reissues += 1
                continue
            except _TRANSPORT_ERRORS as exc:
                await self._pause_after_failure(failures, f"GET {seq}: {exc!r}")
                continue
            status = response.status
            if status == 200:
                if response.headers.get(protocol.CLOSED):
                    response.release()
                    return _Ended("closed")
                resolved = _header_int(response, protocol.SEQ, seq)
                if response.content_length == 0:
                    response.release()
                    if resume:
                        return _Ended("lost")
                    self.stats.skipped += 1
                    seq = resolved + 1
                    continue
                # Data flows: from now on a 404 means the channel is gone.
                self._recovering = False
                self._grace_until = 0.0
                return _Opened(resolved, response)
            response.release()
            refused = redirects.refusal(url, response)
            if refused is not None:
                raise RedirectRefused(f"GET {refused}")
            if status == protocol.STATUS_NOT_IN_RING:
                if resume:
                    return _Ended("lost")
                latest = _header_int(response, protocol.LATEST, seq)
                if latest < seq:
                    # The channel went backwards: the server restarted or the publisher reset.
                    self._recovering = True
                self.stats.skipped += max(0, latest - seq)
                log.info("subscriber %s: seq %d not available, jumping to %d", self.url, seq, latest)
                seq = latest
            elif status == 404:
                if self._loop.time() >= self._grace_until:
                    return _Ended("not_found")
                self.waited_for_channel = self.waited_for_channel or not self.stats.segments
                await not_found.pause("404 within the start-up grace")
            else:
                await self._pause_after_failure(failures, f"GET {seq}: HTTP {status}")

    async def _pause_after_failure(self, budget: RetryBudget, failure: str) -> None:
        log.warning("subscriber %s: %s; retrying", self.url, failure)
        await budget.pause(failure)
        self.stats.retries += 1
        # The server may have lost the channel (restart): a 404 soon after is "not yet", not "gone".
        self._recovering = True
        self._grace_until = max(self._grace_until, self._loop.time() + self.startup_grace)

    def _wait_limit(self) -> float:
        """How long to wait for a segment to start before re-issuing the request."""
        # Shortly after a failure the seq we wait on may never come (the channel was rewound).
        if self._recovering and self._loop.time() < self._grace_until:
            return min(RECOVERY_WAIT, self.timeout)
        return self.timeout

    def _next_has_data(self) -> bool:
        upcoming = self._next
        return (
            upcoming is not None
            and upcoming.done()
            and not upcoming.cancelled()
            and upcoming.exception() is None
            and isinstance(upcoming.result(), _Opened)
        )


class Segment:
    """One segment's bytes, streamed as they arrive: iterate it, or call read() until b""."""

    def __init__(self, subscriber: Subscriber, seq: int, response: aiohttp.ClientResponse) -> None:
        self.seq = seq
        self.content_type = response.headers.get("Content-Type", "")
        self.offset = 0  # bytes handed out so far
        # True when the segment ended early: its publisher died mid-segment while the stream
        # went on, or it fell out of the server's ring during a resume.
        self.truncated = False
        self._subscriber = subscriber
        self._response: aiohttp.ClientResponse | None = response
        self._skip = 0  # bytes still to drop after a resume re-read the segment from its start
        self._reading: asyncio.Timeout | None = None

    def __aiter__(self) -> Segment:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self.read()
        if not chunk:
            raise StopAsyncIteration
        return chunk

    async def read(self) -> bytes:
        """The next chunk (at most the subscriber's chunk size), or b"" at the segment's end."""
        subscriber = self._subscriber
        while self._response is not None:
            limit = ABANDON_AFTER if subscriber._next_has_data() else subscriber.timeout
            try:
                async with asyncio.timeout(limit) as self._reading:
                    chunk = await self._response.content.read(subscriber.chunk_size)
            except TimeoutError:
                if subscriber._next_has_data():
                    log.warning(
                        "subscriber %s: segment %d stalled after the next began; cut",
                        subscriber.url,
                        self.seq,
                    )
                    self._cut_short()
                    return b""
                subscriber.stats.reissues += 1
                await self._resume(f"no data for {limit:.1f}s")
                continue
            except _TRANSPORT_ERRORS as exc:
                subscriber.stats.retries += 1
                await self._resume(repr(exc))
                continue
            finally:
                self._reading = None
            if not chunk:
                self.release()
                return b""
            if self._skip:
                if len(chunk) <= self._skip:
                    self._skip -= len(chunk)
                    continue
                chunk = chunk[self._skip :]
                self._skip = 0
            self.offset += len(chunk)
            subscriber.stats.bytes += len(chunk)
            return chunk
        return b""

    def release(self) -> None:
        """Stop reading this segment (the rest of it is dropped)."""
        if self._response is not None:
            self._response.close()
            self._response = None

    def _next_started(self, _: object) -> None:
        # The next segment has data: a read blocked on this one need not wait long for its tail.
        reading = self._reading
        if reading is not None and self._subscriber._next_has_data():
            deadline = asyncio.get_running_loop().time() + ABANDON_AFTER
            when = reading.when()
            if when is None or when > deadline:
                reading.reschedule(deadline)

    def _cut_short(self) -> None:
        self.truncated = True
        self._subscriber.stats.abandoned += 1
        self.release()

    async def _resume(self, why: str) -> None:
        """Re-request this segment after a failure mid-body and skip what was already handed out."""
        subscriber = self._subscriber
        log.warning(
            "subscriber %s: segment %d broke at byte %d (%s); resuming",
            subscriber.url,
            self.seq,
            self.offset,
            why,
        )
        self.release()
        opened = await subscriber._open(self.seq, resume=True)
        if isinstance(opened, _Ended):
            self._cut_short()
            return
        self._response = opened.response
        self._skip = self.offset


def _header_int(response: aiohttp.ClientResponse, name: str, default: int) -> int:
    value = protocol.parse_seq(response.headers.get(name, ""))
    return default if value is None else value
