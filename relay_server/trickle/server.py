"""The embedded trickle server: the reference server's behaviour (docs/trickle-protocol.md) on aiohttp.

Channels live in memory. Each keeps a ring of `RING_SLOTS` segments; a segment is a list of the
byte strings its publisher sent, shared by every reader without copying. Nothing here polls: readers
and waiting requests sleep on futures that writers and closers resolve, and the only timers are one
idle timer per channel and one `100 Continue` keepalive timer per POST still waiting for its body.

What a client can make the server hold is bounded (limits.py): bytes per segment (413), bytes across
the server and channels (503 with Retry-After), open connections (429, admission.py), the time a
connection may take to send a request head and a POST its first body byte. A segment's bytes are
given back when nothing can read them any more: replaced, refused, or out of the ring with no reader.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from bisect import bisect_right
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType

from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError

from relay_server.serving import bind, until_signalled
from relay_server.trickle.admission import Admission, AdmissionSite
from relay_server.trickle.limits import BufferBudget, BuffersFull, SegmentTooLarge, TrickleLimits
from relay_server.trickle.protocol import (
    CLOSED,
    CLOSED_VALUE,
    EXPECT_CONTENT,
    LATEST,
    RESET,
    RING_SLOTS,
    SEQ,
    SEQ_IN_PROGRESS,
    SEQ_NEXT,
    STATUS_NOT_IN_RING,
    parse_seq,
)

logger = logging.getLogger(__name__)


Chunk = bytes | memoryview

# A reader catching up writes runs of small chunks as one piece of about this size: one copy instead
# of one syscall per chunk. Chunks at least this big go out as they are.
_WRITE_SIZE = 64 * 1024
# How long stop() lets handlers finish their answers (a slow reader draining a segment) before
# aiohttp cancels them.
_STOP_GRACE = 1.0
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# What a refusal for lack of room asks the client to wait: room comes back as segments and
# channels are released, which a live stream does every segment.
_RETRY_AFTER = "1"

# What reading a request body raises when the upload breaks while the connection is up (a body
# aiohttp cannot decode). A dropped connection instead cancels the handler (handler_cancellation).
_UPLOAD_ERRORS = (ConnectionError, web.RequestPayloadError)
# What a client alone causes, when aiohttp logs it.
_CLIENT_ERRORS = (HttpProcessingError, web.RequestPayloadError, ConnectionResetError)


class _ClientErrorsAtDebug(logging.Filter):
    """aiohttp logs as an error with a traceback every malformed request (a 400), a body it cannot
    decode while it drains what a handler left unread, and a client gone while aiohttp itself writes
    to it (an interim `100 Continue`). Any client can cause these, and they say nothing about the
    server: such records go to debug, one line each."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, _CLIENT_ERRORS):
            logger.debug("%s: %r", record.getMessage(), error)
            return False
        return True


# The logger aiohttp's connection handlers report to.
_http_logger = logging.getLogger(f"{__name__}.http")
_http_logger.addFilter(_ClientErrorsAtDebug())


class _Signal:
    """An auto-clearing event: `notify` wakes everyone waiting now; later waiters wait for the next."""

    __slots__ = ("_waiters",)

    def __init__(self) -> None:
        self._waiters: set[asyncio.Future[None]] = set()

    def notify(self) -> None:
        if not self._waiters:  # the common case: called on every change, usually unobserved
            return
        waiters, self._waiters = self._waiters, set()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def wait(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.add(waiter)
        try:
            await waiter
        finally:
            # A cancelled waiter must not stay behind: clients could pile them up on a quiet segment.
            self._waiters.discard(waiter)


@dataclass(frozen=True, slots=True)
class SegmentSnapshot:
    seq: int
    size: int
    closed: bool
    readers: int  # GETs streaming or waiting on this segment
    readers_waiting: int  # those of them blocked until more bytes arrive (or the segment ends)
    writing: bool  # a POST is attached and may still add bytes


@dataclass(frozen=True, slots=True)
class ChannelSnapshot:
    name: str
    mime_type: str
    next_write: int
    closed: bool
    segments: Mapping[int, SegmentSnapshot]  # by seq, for the segments currently in the ring


@dataclass(slots=True)
class ServerStats:
    channels_created: int = 0
    channels_closed: int = 0
    bytes_in: int = 0  # segment bytes received from publishers
    bytes_out: int = 0  # segment bytes sent to readers
    get_requests: int = 0
    post_requests: int = 0
    waiting_gets: int = 0  # GETs whose answer has not started: long-polls with no headers yet
    waiting_posts: int = 0  # POSTs that have not received a body byte yet (preconnects)
    refusals: Counter[str] = field(default_factory=Counter)  # requests refused by a limit, by reason


class Upload:
    """One POST's claim on a segment.

    Only the newest claim writes. A claim that has not received a byte yet is released (its POST is
    answered at once) when its segment closes or another POST claims the segment.
    """

    __slots__ = ("released", "segment", "started")

    def __init__(self, segment: Segment) -> None:
        self.segment = segment
        self.started = False
        self.released: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def release(self) -> None:
        if not self.started and not self.released.done():
            self.released.set_result(None)

    def write(self, data: bytes) -> None:
        self.started = True
        self.segment.append(self, data)


class Segment:
    """The bytes of one seq, as written so far, and whether more can come."""

    def __init__(
        self, seq: int, on_change: Callable[[], None], *, budget: BufferBudget, max_bytes: int
    ) -> None:
        self.seq = seq
        self.size = 0
        self.closed = False
        self.readers = 0
        self.readers_waiting = 0
        self._chunks: list[bytes] = []
        self._starts: list[int] = []  # offset of each chunk, to find where a reader resumes
        self._upload: Upload | None = None
        self._data = _Signal()
        self._on_change = on_change
        self._budget = budget
        self._max_bytes = max_bytes
        self._in_ring = True

    @property
    def fresh(self) -> bool:
        """Nothing written and not closed: a pre-created slot waiting for its publisher."""
        return self.size == 0 and not self.closed

    def claim(self) -> Upload:
        """Make a new POST the writer. Content already written (or a close) is discarded: a re-POST
        replaces the segment, and readers already past the new end get EOF when they next look."""
        if self._upload is not None:
            self._upload.release()
        if not self.fresh:
            self._drop_content()
            self.closed = False
        self._upload = Upload(self)
        self._on_change()
        return self._upload

    def append(self, upload: Upload, data: bytes) -> None:
        # A closed or re-claimed segment is final for this upload: its late bytes go nowhere.
        if upload is not self._upload:
            return
        if self.size + len(data) > self._max_bytes:
            raise SegmentTooLarge(f"segment {self.seq} would pass {self._max_bytes} bytes")
        self._budget.take(len(data))
        self._chunks.append(data)
        self._starts.append(self.size)
        self.size += len(data)
        self._data.notify()
        self._on_change()

    def detach(self, upload: Upload) -> bool:
        """The upload is over (finished or broken); True when it was still the writer."""
        if upload is not self._upload:
            return False
        self._upload = None
        self._on_change()
        return True

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._upload is not None:
            self._upload.release()
            self._upload = None
        self._data.notify()
        self._on_change()

    def discard(self) -> None:
        """End the segment without its content (a refused upload): readers past the new end get EOF."""
        self._drop_content()
        self.close()

    def evict(self) -> None:
        """The ring no longer holds this segment: close it, and drop its bytes once no reader is left."""
        self.close()
        self._in_ring = False
        self._release_if_unread()

    async def read(self, pos: int) -> list[Chunk]:
        """The bytes after offset `pos`, waiting until there are some; empty when the segment ends
        there. A reader past the end (the content was replaced by a shorter one) has ended too."""
        while pos == self.size and not self.closed:
            self.readers_waiting += 1
            self._on_change()
            try:
                await self._data.wait()
            finally:
                self.readers_waiting -= 1
                self._on_change()
        if pos >= self.size:
            return []
        index = bisect_right(self._starts, pos) - 1
        offset = pos - self._starts[index]
        first = self._chunks[index]
        return [memoryview(first)[offset:] if offset else first, *self._chunks[index + 1 :]]

    @contextlib.contextmanager
    def reader(self) -> Iterator[None]:
        self.readers += 1
        self._on_change()
        try:
            yield
        finally:
            self.readers -= 1
            self._release_if_unread()
            self._on_change()

    def _release_if_unread(self) -> None:
        if not self._in_ring and self.readers == 0:
            self._drop_content()

    def _drop_content(self) -> None:
        if self.size:
            self._budget.give_back(self.size)
            self._chunks, self._starts, self.size = [], [], 0
            self._on_change()

    def snapshot(self) -> SegmentSnapshot:
        return SegmentSnapshot(
            self.seq, self.size, self.closed, self.readers, self.readers_waiting, self._upload is not None
        )


class Channel:
    """One named stream: the ring of segments, nextWrite, and the idle timer that sweeps it."""

    def __init__(
        self,
        name: str,
        mime_type: str,
        *,
        idle_timeout: float,
        on_idle: Callable[[Channel], None],
        on_change: Callable[[], None],
        budget: BufferBudget,
        max_segment_bytes: int,
    ) -> None:
        self.name = name
        self.mime_type = mime_type
        self.next_write = 0
        self.closed = False
        self._ring: list[Segment | None] = [None] * RING_SLOTS
        self._on_change = on_change
        self._budget = budget
        self._max_segment_bytes = max_segment_bytes
        self._loop = asyncio.get_running_loop()
        self._idle_timeout = idle_timeout
        self._on_idle = on_idle
        self._last_activity = self._loop.time()
        # One timer per channel that re-arms itself from the last activity when it fires early, so
        # activity costs only a timestamp and there is no periodic sweep.
        self._idle_timer = self._loop.call_at(self._last_activity + idle_timeout, self._check_idle)

    def segment(self, seq: int) -> Segment | None:
        """The segment `seq` if the ring still holds it."""
        found = self._ring[seq % RING_SLOTS] if seq >= 0 else None
        return found if found is not None and found.seq == seq else None

    def resolve_read(self, seq: int) -> int:
        if seq == SEQ_NEXT:
            return self.next_write
        if seq == SEQ_IN_PROGRESS:
            return max(self.next_write - 1, 0)
        return seq

    def segment_for_read(self, seq: int) -> Segment | None:
        """The segment a GET reads, pre-created when it is the live edge (or 1 on a new channel)."""
        found = self.segment(seq)
        if found is None and (seq == self.next_write or (self.next_write == 0 and seq == 1)):
            found = self._install(seq)
        return found

    def segment_for_write(self, seq: int) -> Segment:
        """The segment a POST writes (-1 is nextWrite), created in its slot if the ring lacks it."""
        if seq == SEQ_NEXT:
            seq = self.next_write
        found = self.segment(seq)
        return found if found is not None else self._install(seq)

    def start_segment(self, seq: int) -> None:
        """The first byte of `seq` arrived: it is now the segment in progress, and the channel is live."""
        self.next_write = seq + 1
        self._last_activity = self._loop.time()
        self._on_change()

    def end_segment(self, segment: Segment) -> None:
        """Close a segment on purpose (its upload ended, or a DELETE). One that ends empty at the live
        edge counts as written, so readers that skip it find the next seq waiting, not a 470."""
        segment.close()
        if segment.size == 0 and segment.seq >= self.next_write:
            self.next_write = segment.seq + 1
            self._on_change()

    def reset(self, keep: Segment) -> None:
        """A publisher restarted on `keep`: close the segments of the old run so stalled readers move
        on. Pre-created segments ahead of `keep` stay open: the new run is about to write them."""
        for segment in self._ring:
            if segment is None or segment is keep or (segment.seq > keep.seq and segment.fresh):
                continue
            segment.close()

    def close(self) -> None:
        """Close every segment; waiting requests are answered and readers reach their end."""
        self.closed = True
        self._idle_timer.cancel()
        for segment in self._ring:
            if segment is not None:
                segment.evict()
        self._ring = [None] * RING_SLOTS
        self._on_change()

    def snapshot(self) -> ChannelSnapshot:
        segments = {s.seq: s.snapshot() for s in self._ring if s is not None}
        return ChannelSnapshot(self.name, self.mime_type, self.next_write, self.closed, segments)

    def _install(self, seq: int) -> Segment:
        # The slot's previous segment is evicted; its readers keep the object and still get its bytes.
        slot = seq % RING_SLOTS
        evicted = self._ring[slot]
        if evicted is not None:
            evicted.evict()
        segment = self._ring[slot] = Segment(
            seq, self._on_change, budget=self._budget, max_bytes=self._max_segment_bytes
        )
        self._on_change()
        return segment

    def _check_idle(self) -> None:
        deadline = self._last_activity + self._idle_timeout
        if self._loop.time() >= deadline:
            self._on_idle(self)
        else:
            self._idle_timer = self._loop.call_at(deadline, self._check_idle)


class _ContinueKeepalive:
    """Sends an interim `100 Continue` every `interval` seconds to a POST still waiting for its first
    body byte, so the connection is not idle to proxies and clients (the reference does the same)."""

    def __init__(self, request: web.BaseRequest, interval: float) -> None:
        self._transport = request.transport
        self._interval = interval
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        # HTTP/1.0 clients must not get 1xx answers.
        if interval > 0 and request.version >= (1, 1):
            self._timer = self._loop.call_later(interval, self._send)

    def _send(self) -> None:
        if self._transport is None or self._transport.is_closing():
            return
        self._transport.write(_CONTINUE)
        self._timer = self._loop.call_later(self._interval, self._send)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


def _coalesce(chunks: Sequence[Chunk], size: int) -> Iterator[Chunk]:
    """The chunks as writes: runs of small ones joined up to about `size`, big ones as they are."""
    run: list[Chunk] = []
    run_size = 0
    for chunk in chunks:
        if len(chunk) >= size:
            if run:
                yield run[0] if len(run) == 1 else b"".join(run)
                run, run_size = [], 0
            yield chunk
            continue
        run.append(chunk)
        run_size += len(chunk)
        if run_size >= size:
            yield b"".join(run)
            run, run_size = [], 0
    if run:
        yield run[0] if len(run) == 1 else b"".join(run)


def _text(status: int, text: str, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=text, headers=headers)


def _invalid_idx() -> web.Response:
    return _text(400, "Invalid idx")


def _stream_not_found() -> web.Response:
    return _text(404, "Stream not found")


class TrickleServer:
    """A trickle server on aiohttp.web. `start()` binds (port 0 picks a free one); `stop()` closes
    every channel, answers every waiting request and returns once all handlers and timers are done."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        autocreate: bool = True,
        idle_timeout: float = 300.0,
        keepalive_interval: float = 10.0,
        limits: TrickleLimits | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.url = ""
        self.stats = ServerStats()
        self.limits = limits or TrickleLimits()
        self._autocreate = autocreate
        self._idle_timeout = idle_timeout
        self._keepalive_interval = keepalive_interval
        self._channels: dict[str, Channel] = {}
        self._changed = _Signal()
        self._budget = BufferBudget(self.limits.max_buffered_bytes)
        # A refused connection lingers at most as long as an admitted one may take to send its head.
        self.admission = Admission(
            self.limits.max_connections,
            self.limits.header_timeout,
            on_change=self._changed.notify,
            on_refused=lambda: self._count_refusal("connections"),
        )
        # Connections of uploads mid-body; stop() drops them (their bytes have nowhere to go once
        # the channels are closed, and a live publisher's body may not end for a long time).
        self._uploading: set[web.RequestHandler] = set()
        self._runner: web.AppRunner | None = None
        self._stopping = False

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/{channel}", self._create_channel)
        app.router.add_delete("/{channel}", self._delete_channel)
        app.router.add_get("/{channel}/next", self._next, allow_head=False)
        app.router.add_get("/{channel}/{seq}", self._get, allow_head=False)
        app.router.add_post("/{channel}/{seq}", self._post)
        app.router.add_delete("/{channel}/{seq}", self._delete_segment)
        self._runner, self.port, self.url = await bind(
            app,
            self.host,
            self.port,
            site=functools.partial(AdmissionSite, admission=self.admission),
            # Without it aiohttp keeps running a long-poll whose client has gone.
            handler_cancellation=True,
            shutdown_timeout=_STOP_GRACE,
            # aiohttp closes a connection that has no complete request head this long after it
            # connected or finished its previous request.
            keepalive_timeout=self.limits.header_timeout,
            logger=_http_logger,
        )

    async def stop(self) -> None:
        if self._runner is None or self._stopping:
            return
        self._stopping = True
        for channel in list(self._channels.values()):
            self._close_channel(channel, "server stopping")
        for connection in list(self._uploading):
            connection.force_close()
        await self._runner.cleanup()
        self._runner = None
        self._changed.notify()

    async def __aenter__(self) -> TrickleServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def channel_url(self, name: str) -> str:
        return f"{self.url}/{name}"

    @property
    def buffered_bytes(self) -> int:
        """Segment bytes held now, counted against `limits.max_buffered_bytes`."""
        return self._budget.used

    @property
    def connections(self) -> int:
        """Connections open now, counted against `limits.max_connections`."""
        return self.admission.admitted

    @property
    def channels(self) -> int:
        return len(self._channels)

    def snapshot(self, name: str) -> ChannelSnapshot | None:
        channel = self._channels.get(name)
        return channel.snapshot() if channel is not None else None

    # The public API takes a timeout, like asyncio.wait_for; callers need not wrap it.
    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Return once `predicate()` holds; it is re-checked on every change of server state.
        Raises TimeoutError after `timeout` seconds."""
        async with asyncio.timeout(timeout):
            while not predicate():
                await self._changed.wait()

    # -- channels ---------------------------------------------------------------------------------

    def _create(self, name: str, mime_type: str) -> Channel:
        channel = Channel(
            name,
            mime_type,
            idle_timeout=self._idle_timeout,
            on_idle=self._sweep,
            on_change=self._changed.notify,
            budget=self._budget,
            max_segment_bytes=self.limits.max_segment_bytes,
        )
        self._channels[name] = channel
        self.stats.channels_created += 1
        logger.info("channel %s created (%s)", name, mime_type or "no mime type")
        self._changed.notify()
        return channel

    def _close_channel(self, channel: Channel, why: str) -> None:
        if self._channels.get(channel.name) is channel:
            del self._channels[channel.name]
        channel.close()
        self.stats.channels_closed += 1
        logger.info("channel %s closed (%s)", channel.name, why)
        self._changed.notify()

    def _sweep(self, channel: Channel) -> None:
        self._close_channel(channel, f"idle for {self._idle_timeout:g} s")

    # -- handlers ---------------------------------------------------------------------------------

    async def _create_channel(self, request: web.Request) -> web.Response:
        self._count_post()
        if self._stopping:
            return _stopping()
        name = request.match_info["channel"]
        if name not in self._channels:
            if self._channels_exhausted():
                return self._refuse_busy("channels", "Too many channels")
            self._create(name, request.headers.get(EXPECT_CONTENT, ""))
        return web.Response()

    async def _delete_channel(self, request: web.Request) -> web.Response:
        channel = self._channels.get(request.match_info["channel"])
        if channel is None:
            return _text(400, "Invalid stream")
        self._close_channel(channel, "deleted")
        return web.Response()

    async def _next(self, request: web.Request) -> web.Response:
        self._count_get()
        channel = self._channels.get(request.match_info["channel"])
        if channel is None:
            return _stream_not_found()
        return _text(200, str(channel.next_write), {LATEST: str(channel.next_write)})

    async def _delete_segment(self, request: web.Request) -> web.Response:
        channel = self._channels.get(request.match_info["channel"])
        if channel is None:
            return _stream_not_found()
        seq = parse_seq(request.match_info["seq"])
        if seq is None:
            return _invalid_idx()
        segment = channel.segment(seq)
        if segment is None:
            return _text(400, "Nonexistent segment")
        logger.debug("%s/%d deleted", channel.name, seq)
        channel.end_segment(segment)
        return web.Response()

    async def _get(self, request: web.Request) -> web.StreamResponse:
        self._count_get()
        channel = self._channels.get(request.match_info["channel"])
        if channel is None:
            return _stream_not_found()
        requested = parse_seq(request.match_info["seq"])
        if requested is None:
            return _invalid_idx()
        latest = channel.next_write
        seq = channel.resolve_read(requested)
        segment = channel.segment_for_read(seq)
        logger.debug("GET %s/%d (asked %d, nextWrite %d)", channel.name, seq, requested, latest)
        if segment is None:
            return web.Response(
                status=STATUS_NOT_IN_RING,
                reason="Entry Not Found",
                text="Entry not found",
                headers={LATEST: str(latest), SEQ: str(seq)},
            )
        headers = {SEQ: str(seq)}
        if seq != latest:
            headers[LATEST] = str(latest)
        with segment.reader():
            return await self._stream_segment(request, channel, segment, headers)

    async def _stream_segment(
        self, request: web.Request, channel: Channel, segment: Segment, headers: dict[str, str]
    ) -> web.StreamResponse:
        # The long-poll: no headers go out until the first byte exists or the segment ends.
        self.stats.waiting_gets += 1
        self._changed.notify()
        try:
            chunks = await segment.read(0)
        finally:
            self.stats.waiting_gets -= 1
            self._changed.notify()
        if not chunks:
            if channel.closed:
                headers[CLOSED] = CLOSED_VALUE
            return web.Response(headers=headers)
        response = web.StreamResponse(headers=headers)
        # Echo the channel's MIME type even when empty, as the reference does.
        response.headers[hdrs.CONTENT_TYPE] = channel.mime_type
        pos = 0
        try:
            await response.prepare(request)
            while chunks:
                for piece in _coalesce(chunks, _WRITE_SIZE):
                    await response.write(piece)
                    pos += len(piece)
                    self.stats.bytes_out += len(piece)
                chunks = await segment.read(pos)
            await response.write_eof()
        except ConnectionResetError:
            logger.debug("reader of %s/%d went away after %d bytes", channel.name, segment.seq, pos)
        return response

    async def _post(self, request: web.Request) -> web.Response:
        self._count_post()
        if self._stopping:
            return _stopping()
        name = request.match_info["channel"]
        seq = parse_seq(request.match_info["seq"])
        if seq is None or seq == SEQ_IN_PROGRESS:
            return _invalid_idx()
        channel = self._channels.get(name)
        if channel is None:
            if not self._autocreate:
                response = _stream_not_found()
                # The reference closes the connection so a waiting preconnect wakes up.
                response.force_close()
                return response
            if self._channels_exhausted():
                return self._refuse_busy("channels", "Too many channels")
            channel = self._create(name, request.headers.get(hdrs.CONTENT_TYPE, ""))
        if self._budget.exhausted:
            return self._refuse_busy("buffers", "Server buffers full")
        segment = channel.segment_for_write(seq)
        if RESET in request.headers:
            channel.reset(segment)
        upload = segment.claim()
        logger.debug("POST %s/%d (asked %d)", channel.name, segment.seq, seq)
        try:
            return await self._receive(request, channel, upload)
        finally:
            segment.detach(upload)

    async def _receive(self, request: web.Request, channel: Channel, upload: Upload) -> web.Response:
        segment = upload.segment
        headers = {SEQ: str(segment.seq)}
        try:
            data = await self._first_body_bytes(request, upload)
        except _UPLOAD_ERRORS as exc:
            logger.debug("upload %s/%d broke before its first byte: %r", channel.name, segment.seq, exc)
            return await _answer_and_close(request, _text(500, "Server error"))
        except TimeoutError:
            self._count_refusal("first_byte_timeout")
            timeout = self.limits.first_byte_timeout
            return await _answer_and_close(request, _text(408, f"No body within {timeout:g} s"))
        if data is None:
            # Released before any byte: the body is unread, so end the connection after answering.
            response = self._upload_answer(channel, headers)
            response.force_close()
            return response
        if data:
            channel.start_segment(segment.seq)
        self._uploading.add(request.protocol)
        try:
            while data:
                upload.write(data)
                self.stats.bytes_in += len(data)
                data = await request.content.readany()
        except _UPLOAD_ERRORS as exc:
            # The segment stays open on purpose (as in the reference): its readers wait until a
            # DELETE of the seq, a reset, slot reuse or the channel closing ends it.
            logger.debug("upload %s/%d broke mid-body: %r", channel.name, segment.seq, exc)
            return await _answer_and_close(request, _text(500, "Server error"))
        except SegmentTooLarge as exc:
            segment.discard()
            return self._refuse("segment_too_large", 413, f"Segment too large: {exc}", mid_body=True)
        except BuffersFull as exc:
            segment.discard()
            return self._refuse_busy("buffers", f"Server buffers full: {exc}", mid_body=True)
        finally:
            self._uploading.discard(request.protocol)
        if segment.detach(upload):
            channel.end_segment(segment)
        return self._upload_answer(channel, headers)

    async def _first_body_bytes(self, request: web.Request, upload: Upload) -> bytes | None:
        """The first piece of the body (b"" for an empty one), or None when the upload was released
        first; TimeoutError when neither happens within the first-byte timeout. Meanwhile the POST
        counts as waiting and gets `100 Continue` keepalives."""
        self.stats.waiting_posts += 1
        self._changed.notify()
        keepalive = _ContinueKeepalive(request, self._keepalive_interval)
        read = asyncio.ensure_future(request.content.readany())
        try:
            done, _ = await asyncio.wait(
                (read, upload.released),
                timeout=self.limits.first_byte_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if not done:
                raise TimeoutError
        finally:
            keepalive.cancel()
            self.stats.waiting_posts -= 1
            self._changed.notify()
            if not read.done():
                read.cancel()
            elif not read.cancelled():
                read.exception()  # retrieved, also when this handler is being cancelled
        # Bytes that arrived together with the release are still taken: the segment drops them.
        return read.result() if read.done() else None

    @staticmethod
    def _upload_answer(channel: Channel, headers: dict[str, str]) -> web.Response:
        if channel.closed:
            headers[CLOSED] = CLOSED_VALUE
        return web.Response(headers=headers)

    def _count_get(self) -> None:
        self.stats.get_requests += 1
        self._changed.notify()

    def _count_post(self) -> None:
        self.stats.post_requests += 1
        self._changed.notify()

    def _channels_exhausted(self) -> bool:
        return len(self._channels) >= self.limits.max_channels

    def _count_refusal(self, reason: str) -> None:
        self.stats.refusals[reason] += 1
        logger.debug("request refused: %s", reason)
        self._changed.notify()

    def _refuse(
        self,
        reason: str,
        status: int,
        text: str,
        headers: Mapping[str, str] | None = None,
        *,
        mid_body: bool = False,
    ) -> web.Response:
        """A limit refused the request. Either way aiohttp reads and drops what is left of the body
        for a while after the answer, so the client gets the answer, not a reset; a body cut off
        `mid_body` also ends the connection, as its sender may never stop."""
        self._count_refusal(reason)
        response = _text(status, text, headers)
        if mid_body:
            response.force_close()
        return response

    def _refuse_busy(self, reason: str, text: str, *, mid_body: bool = False) -> web.Response:
        return self._refuse(reason, 503, text, {hdrs.RETRY_AFTER: _RETRY_AFTER}, mid_body=mid_body)


async def _answer_and_close(request: web.Request, response: web.Response) -> web.Response:
    """Answer, then drop the connection: the rest of the body cannot (or will not) be read, and
    aiohttp would otherwise try to drain it after the handler (and log a broken one again)."""
    response.force_close()
    await response.prepare(request)
    await response.write_eof()
    request.protocol.force_close()  # flushes the answer, then closes
    return response


def _stopping() -> web.Response:
    # Retryable, unlike 404 (which clients take as end of stream): the server is going away.
    response = _text(503, "Server stopping")
    response.force_close()
    return response


async def serve_forever(
    host: str, port: int, *, autocreate: bool, idle_timeout: float, limits: TrickleLimits
) -> None:
    """Run a TrickleServer until SIGINT or SIGTERM, then stop it cleanly."""
    async with TrickleServer(
        host, port, autocreate=autocreate, idle_timeout=idle_timeout, limits=limits
    ) as server:
        logger.info(
            "trickle server listening on %s (autocreate %s, idle timeout %g s, %s)",
            server.url,
            "on" if autocreate else "off",
            idle_timeout,
            limits,
        )
        await until_signalled()
        logger.info("trickle server stopping")
