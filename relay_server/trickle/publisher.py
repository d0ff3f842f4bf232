"""Publisher: writes a trickle channel segment by segment, each body streamed as it is produced.

    async with Publisher(url) as publisher:
        async with await publisher.segment() as segment:
            await segment.write(data)

Opening segment n also opens the POST for n+1 (preconnect): its headers go out at once
(`Expect: 100-continue` makes the client send them before any body), so the server has the
next slot ready and subscribers waiting on it are served the moment n+1's first byte is written.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType

import aiohttp

from relay_server import redirects, settings
from relay_server.backoff import Backoff
from relay_server.trickle import protocol
from relay_server.trickle.backoff import RetryBudget
from relay_server.trickle.errors import ChannelClosedError, RedirectRefused, TrickleError

log = logging.getLogger(__name__)

# Body chunks queued per segment before write() waits for the network (back-pressure).
QUEUE_CHUNKS = 64
_TRANSPORT_ERRORS = (aiohttp.ClientError, OSError)


@dataclass
class PublisherStats:
    segments: int = 0  # segments fully published
    bytes: int = 0  # body bytes handed to the network
    retries: int = 0  # POSTs tried again after failing before their first byte
    failed: int = 0  # segments lost after bytes went out (each closed with DELETE)


class Outcome(enum.Enum):
    PUBLISHED = "published"
    FAILED = "failed"  # broke after bytes went out; the segment was DELETEd
    CLOSED = "closed"  # the server closed the channel (404 or Lp-Trickle-Closed)
    CANCELLED = "cancelled"  # ended by the publisher (shutdown or abort)


class Publisher:
    """Publishes segments start_seq, start_seq+1, …; start_seq=None continues an existing channel."""

    def __init__(
        self,
        url: str,
        *,
        mime_type: str = "video/MP2T",
        start_seq: int | None = 0,
        timeout: float | None = None,
        backoff: Backoff | None = None,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        if start_seq is not None and start_seq < 0:
            raise ValueError(f"start_seq must be >= 0 or None, got {start_seq}")
        self.url = url.rstrip("/")
        self.mime_type = mime_type
        self.timeout = timeout or settings.request_timeout()
        self.backoff = backoff or Backoff(initial=0.25, factor=2.0, maximum=4.0, attempts=8)
        self.stats = PublisherStats()
        self._session = session
        self._owns_session = session is None
        self._seq = start_seq
        # Continuing a channel: the first POST resets the ring so stale readers let go.
        self._reset = start_seq is None
        self._preconnected: _Upload | None = None
        self._uploads: set[_Upload] = set()
        self._remote_closed = False
        self._closed = False

    async def __aenter__(self) -> Publisher:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def channel_closed(self) -> bool:
        """True once the server said the channel is gone; segment() then raises."""
        return self._remote_closed

    @property
    def next_seq(self) -> int | None:
        return self._seq

    async def create_channel(self) -> None:
        """Create the channel now (`POST /{ch}` with its MIME type), so readers can wait on it
        before the first segment is written."""
        try:
            async with self._http().post(
                self.url, headers={protocol.EXPECT_CONTENT: self.mime_type}, allow_redirects=False
            ) as response:
                status = response.status
                refused = redirects.refusal(self.url, response)
        except _TRANSPORT_ERRORS as exc:
            raise TrickleError(f"creating {self.url}: {exc!r}") from exc
        if refused is not None:
            raise RedirectRefused(f"creating: POST {refused}")
        if status != 200:
            raise TrickleError(f"creating {self.url}: HTTP {status}")

    async def segment(self) -> SegmentWriter:
        """Start the next segment (already preconnected when possible) and preconnect the one after."""
        if self._closed:
            raise RuntimeError("publisher is closed")
        if self._remote_closed:
            raise ChannelClosedError(f"{self.url} was closed by the server")
        if self._seq is None:
            self._seq = await self._fetch_next_write()
        upload, self._preconnected = self._preconnected or self._start_upload(self._seq), None
        self._seq += 1
        self._preconnected = self._start_upload(self._seq)
        return SegmentWriter(self, upload)

    async def close(self, *, delete_channel: bool = True) -> None:
        """End pending uploads and, unless told otherwise, DELETE the channel."""
        if self._closed:
            return
        self._closed = True
        if delete_channel and not self._remote_closed:
            await self._delete(self.url)
        # The preconnected upload may have ended on its own (a refused redirect, say): its
        # outcome is collected with the others'.
        preconnected = {self._preconnected} if self._preconnected is not None else set()
        for upload in self._uploads | preconnected:
            await upload.cancel()
        if self._owns_session and self._session is not None:
            await self._session.close()

    # -- internals --------------------------------------------------------------------------

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                # No total timeout: a preconnected POST waits as long as its segment takes to start.
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.timeout),
            )
        return self._session

    def _start_upload(self, seq: int) -> _Upload:
        headers = {"Content-Type": self.mime_type}
        if self._reset:
            headers[protocol.RESET] = "1"
            self._reset = False
        upload = _Upload(self, seq, headers)
        self._uploads.add(upload)
        upload.task.add_done_callback(lambda _: self._uploads.discard(upload))
        return upload

    async def _fetch_next_write(self) -> int:
        url = f"{self.url}/next"
        failures = RetryBudget(self.backoff, f"GET {url}")
        while True:
            try:
                async with self._http().get(url, allow_redirects=False) as response:
                    if response.status == 404:
                        return 0  # a new channel: the first POST creates it where allowed
                    if response.status == 200:
                        return int(await response.text())
                    refused = redirects.refusal(url, response)
                    what = f"HTTP {response.status}"
            except (*_TRANSPORT_ERRORS, ValueError) as exc:
                refused, what = None, repr(exc)
            if refused is not None:
                raise RedirectRefused(f"GET {refused}")
            await self._pause_after_failure(failures, what)

    async def _pause_after_failure(self, budget: RetryBudget, failure: str) -> None:
        log.warning("publisher %s: %s; retrying", self.url, failure)
        await budget.pause(failure)
        self.stats.retries += 1

    async def _delete(self, url: str) -> None:
        """Best-effort DELETE: it releases readers, and failing it must not stop a shutdown."""
        try:
            async with asyncio.timeout(self.timeout):
                async with self._http().delete(url, allow_redirects=False) as response:
                    refused = redirects.refusal(url, response)
                    if refused is not None:
                        log.warning("publisher: DELETE %s", refused)
                    else:
                        log.debug("publisher: DELETE %s → %d", url, response.status)
        except (*_TRANSPORT_ERRORS, TimeoutError) as exc:
            log.warning("publisher: DELETE %s failed: %r", url, exc)


class _Upload:
    """One segment's POST: retried on a new connection while no byte went out, DELETEd after."""

    def __init__(self, publisher: Publisher, seq: int, headers: dict[str, str]) -> None:
        self.publisher = publisher
        self.seq = seq
        self.url = f"{publisher.url}/{seq}"
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(QUEUE_CHUNKS)
        self.sent = 0  # body bytes handed to the connection
        self._headers = headers
        self.task = asyncio.get_running_loop().create_task(self._run(), name=f"trickle-post {self.url}")

    @property
    def finished(self) -> bool:
        return self.task.done()

    async def put(self, data: bytes | None) -> None:
        if not self.finished:
            await self.queue.put(data)

    async def cancel(self) -> Outcome:
        """Stop this upload; a half-written segment is closed with DELETE so readers do not hang."""
        self.task.cancel()
        try:
            outcome = await self.result()
        except TrickleError:
            outcome = Outcome.FAILED
        if outcome is Outcome.CANCELLED and self.sent:
            await self.publisher._delete(self.url)
        return outcome

    async def result(self) -> Outcome:
        try:
            return await asyncio.shield(self.task)
        except asyncio.CancelledError:
            if not self.task.cancelled():
                raise  # the caller was cancelled, not the upload
            return Outcome.CANCELLED

    async def _body(self) -> AsyncIterator[bytes]:
        while (chunk := await self.queue.get()) is not None:
            self.sent += len(chunk)
            self.publisher.stats.bytes += len(chunk)
            yield chunk

    async def _run(self) -> Outcome:
        publisher = self.publisher
        failures = RetryBudget(publisher.backoff, f"POST {self.url}")
        try:
            while True:
                try:
                    async with publisher._http().post(
                        self.url,
                        data=self._body(),
                        headers=self._headers,
                        expect100=True,
                        allow_redirects=False,
                    ) as response:
                        status = response.status
                        closed = bool(response.headers.get(protocol.CLOSED))
                        refused = redirects.refusal(self.url, response)
                except _TRANSPORT_ERRORS as exc:
                    what = repr(exc)
                else:
                    if refused is not None:
                        raise RedirectRefused(f"POST {refused}")
                    if status == 404 or closed:
                        publisher._remote_closed = True
                        log.info("publisher %s: channel closed by the server", publisher.url)
                        return Outcome.CLOSED
                    if status == 200:
                        publisher.stats.segments += 1
                        return Outcome.PUBLISHED
                    what = f"HTTP {status}"
                if self.sent:
                    log.warning(
                        "publisher %s: segment %d broke after %d bytes (%s)",
                        publisher.url,
                        self.seq,
                        self.sent,
                        what,
                    )
                    publisher.stats.failed += 1
                    await publisher._delete(self.url)
                    return Outcome.FAILED
                await publisher._pause_after_failure(failures, what)
        finally:
            # Nobody will read the queue again: unblock a writer waiting for room.
            while not self.queue.empty():
                self.queue.get_nowait()


class SegmentWriter:
    """Streams one segment's body. Close it to finish the segment; use it as `async with`."""

    def __init__(self, publisher: Publisher, upload: _Upload) -> None:
        self.seq = upload.seq
        self._publisher = publisher
        self._upload = upload
        self._ended = False

    async def __aenter__(self) -> SegmentWriter:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            await self.close()
        else:
            await self.abort()

    async def write(self, data: bytes) -> None:
        """Queue bytes for the body; waits while the network is behind. Dropped if the upload broke."""
        if self._ended:
            raise RuntimeError(f"segment {self.seq} is already closed")
        if data:
            await self._upload.put(data)

    async def close(self) -> Outcome:
        """Finish the segment and wait for the server's answer.

        Raises ChannelClosedError when the server closed the channel and TrickleError when the
        POST could not get through at all; a segment that broke midway is FAILED, not raised.
        """
        if not self._ended:
            self._ended = True
            await self._upload.put(None)
        outcome = await self._upload.result()
        if outcome is Outcome.CLOSED:
            raise ChannelClosedError(f"{self._publisher.url} was closed by the server")
        return outcome

    async def abort(self) -> Outcome:
        """Give up on this segment; if bytes went out it is closed with DELETE."""
        self._ended = True
        return await self._upload.cancel()
