"""The output side of a session: frames in, one encode thread, segments out to a trickle channel.

    pipeline = OutputPipeline(publisher, VideoEncoder(width, height))
    pipeline.start()
    await pipeline.submit(frame, pts90k)          # as frames come back from the processor
    await pipeline.submit_packet(packet, pts90k)  # or its H.264 as it is (passthrough)
    await pipeline.submit_audio(packet, pts90k)   # as the demuxer yields them
    await pipeline.stop()                         # flushes, ends the last segment, joins

Two hand-offs cross between the event loop and the encode thread, each bounded:
- frames, encoded packets and audio in (`_Inbox`): live, frames queue in order up to a bound and
  the oldest goes beyond it (counted; the encoder is far faster than real time, so only a stall
  of the encode thread comes near it), or blocking for catch-up and tests. Packets go to the
  muxer as they are and cannot be replaced: a dropped one breaks the
  picture up to the next keyframe, so they queue in order, and when live overflows the queue
  it drops up to the next keyframe (counted). Frames and packets may take turns mid-stream
  (transcode and passthrough); the encode thread keeps the output decodable across the switches
  (`_Splicer`);
- segment bytes out (`SegmentPublisherSink`): bounded in bytes; when full the encode thread
  waits (counted). Bytes are never dropped there: a hole in the middle of a segment corrupts
  everything after it up to the next IDR, while a late segment is merely late.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import av

from relay_server.media.encoder import CLOCK, VideoEncoder
from relay_server.media.segmenter import AudioInfo, Segmenter, SegmentSink
from relay_server.trickle.publisher import Outcome, Publisher, SegmentWriter

log = logging.getLogger(__name__)

# Segment bytes between the encode thread and the publisher: about 4 s of video at 2 Mbit/s,
# enough to ride out a slow POST without stalling the encoder, small enough to bound latency.
SINK_BUFFER = 1024 * 1024
# Frames queued for the encoder: a burst of returned frames (a processor catching up) waits here.
QUEUE_FRAMES = 4
# Audio packets queued for the encode thread: over 5 s of AAC or Opus. Audio is never replaced
# by newer audio (each packet is its own stretch of sound); live, the oldest goes
# when the encode thread is that far behind, counted.
QUEUE_AUDIO = 256


@dataclass
class SinkStats:
    segments: int = 0  # segments the server accepted
    failed: int = 0  # segments lost after their bytes went out (the publisher DELETEd them)
    bytes: int = 0  # bytes handed to the publisher
    blocked: int = 0  # writes that waited for room: back-pressure on the encode thread
    blocked_seconds: float = 0.0  # how long they waited in total


@dataclass(frozen=True)
class _Begin:
    index: int


@dataclass(frozen=True)
class _End:
    index: int


class _Stop:
    pass


_Item = _Begin | _End | _Stop | bytes


class SegmentPublisherSink(SegmentSink):
    """A SegmentSink (called on the encode thread) that publishes through a trickle Publisher.

    One task on the event loop owns the publisher side. Publisher errors (ChannelClosedError,
    TrickleError, …) end it; they resolve `failed` and are raised on the encode thread by its
    next begin/write/end.
    """

    def __init__(self, publisher: Publisher, *, max_bytes: int = SINK_BUFFER) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.publisher = publisher
        self.max_bytes = max_bytes
        self.stats = SinkStats()
        self.error: BaseException | None = None
        self._cond = threading.Condition()
        self._items: deque[_Item] = deque()  # bounded by _pending bytes (markers are tiny)
        self._pending = 0  # bytes queued or being written to the publisher
        self._wakeup_due = False
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: asyncio.Event | None = None
        self._failed: asyncio.Future[BaseException] | None = None
        self._task: asyncio.Task[None] | None = None
        # Closing a segment waits for the server's answer; meanwhile the next one streams.
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def failed(self) -> asyncio.Future[BaseException]:
        """Resolves with the publisher's error; cancelled by a stop() without one."""
        if self._failed is None:
            raise RuntimeError("sink not started")
        return self._failed

    @property
    def buffered(self) -> int:
        """Bytes between the encode thread and the publisher right now."""
        return self._pending

    def start(self) -> None:
        """Start the publishing task; call on the event loop."""
        if self._task is not None:
            raise RuntimeError("sink already started")
        self._loop = asyncio.get_running_loop()
        self._ready = asyncio.Event()
        self._failed = self._loop.create_future()
        self._task = self._loop.create_task(self._drain(), name=f"segment-sink {self.publisher.url}")

    async def stop(self) -> None:
        """Publish what is queued, wait for the server's answers, end the task. A segment
        begun and not ended is aborted (DELETEd if bytes went out). Does not raise the
        publisher's error: that is in `error` and `failed`."""
        if self._task is None or self._ready is None:
            return
        with self._cond:
            self._stopping = True
            self._items.append(_Stop())
        self._ready.set()
        try:
            await asyncio.shield(self._task)
        except asyncio.CancelledError:
            # Stopping was cancelled (a timeout): do not leave the encode thread blocked.
            self._task.cancel()
            self._fail(RuntimeError("segment sink stopped"))
            raise
        finally:
            if self._failed is not None and not self._failed.done():
                self._failed.cancel()

    # -- SegmentSink, called on the encode thread ----------------------------------------------

    def begin(self, index: int) -> None:
        self._put(_Begin(index), 0)

    def write(self, data: bytes) -> None:
        if data:
            self._put(data, len(data))

    def end(self, index: int) -> None:
        self._put(_End(index), 0)

    def _put(self, item: _Item, size: int) -> None:
        with self._cond:
            self._check()
            # An item larger than the whole budget still goes once the buffer is empty.
            if self._pending and self._pending + size > self.max_bytes:
                self.stats.blocked += 1
                started = time.monotonic()
                while self._pending and self._pending + size > self.max_bytes and self.error is None:
                    self._cond.wait()
                self.stats.blocked_seconds += time.monotonic() - started
                self._check()
            self._pending += size
            self._items.append(item)
            wake, self._wakeup_due = not self._wakeup_due, True
        if wake:
            assert self._loop is not None and self._ready is not None
            self._loop.call_soon_threadsafe(self._ready.set)

    def _check(self) -> None:
        if self.error is not None:
            raise self.error
        if self._loop is None or self._stopping:
            raise RuntimeError("segment sink is not running")

    # -- the publishing task ---------------------------------------------------------------

    async def _drain(self) -> None:
        assert self._ready is not None
        writer: SegmentWriter | None = None
        try:
            while self.error is None:
                await self._ready.wait()
                self._ready.clear()
                with self._cond:
                    batch = list(self._items)
                    self._items.clear()
                    self._wakeup_due = False
                for item in batch:
                    if self.error is not None:
                        break
                    if isinstance(item, bytes):
                        assert writer is not None, "write() outside begin()/end()"
                        await writer.write(item)
                        self.stats.bytes += len(item)
                        self._release(len(item))
                    elif isinstance(item, _Begin):
                        writer = await self.publisher.segment()
                    elif isinstance(item, _End):
                        assert writer is not None, "end() without begin()"
                        self._close_soon(writer)
                        writer = None
                    else:
                        if self._closing:
                            await asyncio.wait(self._closing)
                        return
        except Exception as exc:
            self._fail(exc)
        finally:
            if writer is not None:
                await writer.abort()  # cut short: DELETEd if bytes went out, so readers end

    def _close_soon(self, writer: SegmentWriter) -> None:
        task = asyncio.get_running_loop().create_task(
            self._close(writer), name=f"segment-close {self.publisher.url}/{writer.seq}"
        )
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close(self, writer: SegmentWriter) -> None:
        try:
            outcome = await writer.close()
        except Exception as exc:
            self._fail(exc)
            return
        if outcome is Outcome.PUBLISHED:
            self.stats.segments += 1
        else:
            self.stats.failed += 1
            log.warning("output %s: segment %d %s", self.publisher.url, writer.seq, outcome.value)

    def _release(self, size: int) -> None:
        with self._cond:
            if self.error is None:  # _fail already emptied the buffer
                self._pending -= size
            self._cond.notify_all()

    def _fail(self, exc: BaseException) -> None:
        with self._cond:
            if self.error is None:
                self.error = exc
                log.warning("output %s failed: %r", self.publisher.url, exc)
            self._items.clear()
            self._pending = 0
            self._cond.notify_all()
        if self._failed is not None and not self._failed.done():
            self._failed.set_result(self.error)
        if self._ready is not None:
            self._ready.set()  # the publishing task sees the error and ends


class Policy(enum.Enum):
    """What submit() does when the encode thread is behind."""

    LIVE = "live"  # frames queue up to queue_frames, the oldest dropped beyond (counted)
    BLOCK = "block"  # catch-up and tests: submit() waits for room; nothing is dropped


@dataclass(frozen=True)
class PipelineStats:
    frames_in: int = 0  # frames submitted
    frames_dropped: int = 0  # frames let go before the encoder took them: the queue was full (LIVE)
    frames_waited: int = 0  # submits that waited for room (Policy.BLOCK)
    audio_in: int = 0  # audio packets submitted
    audio_dropped: int = 0  # oldest audio let go when QUEUE_AUDIO was full (Policy.LIVE)
    audio_waited: int = 0  # submits that waited for room (Policy.BLOCK)
    packets_in: int = 0  # encoded video packets submitted (submit_packet)
    # Packets not muxed: an overflow (Policy.LIVE) and the packets after it up to a keyframe;
    # packets before the first keyframe after frames (or at the start), or after a packet
    # dropped; packets stamped not after the video before them.
    packets_dropped: int = 0
    packets_waited: int = 0  # submits that waited for room (Policy.BLOCK)
    frames_late: int = 0  # frames stamped not after the packet before them, dropped
    keyframes_requested: int = 0  # on_keyframe_overdue calls


_T = TypeVar("_T")


class _Lane(Generic[_T]):
    """One bounded FIFO of the inbox: (item, pts90k) pairs."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.items: deque[tuple[_T, int]] = deque()

    def full(self) -> bool:
        return len(self.items) >= self.limit


@dataclass
class _Tally:
    """What one kind of input met at the inbox."""

    received: int = 0
    dropped: int = 0
    waited: int = 0


class _Inbox:
    """Frames, encoded packets and audio from the event loop to the encode thread.

    Frames and packets share one lane, in the order they came: the encode thread must see a
    switch between them where it happened. Under LIVE both queue up to the lane's limit. When it
    is full, the oldest frame goes; a packet dropped breaks every picture up to the next keyframe,
    so the queued non-keyframes go and packets are skipped up to the next keyframe (the picture
    resumes cleanly, later).

    The loop side never blocks the loop: under BLOCK it awaits room, which the thread
    announces with call_soon_threadsafe only when a submitter is actually waiting.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        policy: Policy,
        queue_frames: int,
        queue_audio: int,
        on_skip: Callable[[int], None],
    ) -> None:
        self.policy = policy
        self.video_lane: _Lane[av.VideoFrame | av.Packet] = _Lane(queue_frames)
        self.audio_lane: _Lane[av.Packet] = _Lane(queue_audio)
        self.frames = _Tally()
        self.packets = _Tally()
        self.audio = _Tally()
        self.skipping = False  # packets are dropped until the next keyframe (after an overflow)
        self.closed = False
        self.reason: BaseException | None = None  # why it closed, when it was a failure
        self._loop = loop
        self._on_skip = on_skip  # on the loop, with the pts where skipping began: a keyframe is wanted
        self._cond = threading.Condition()
        self._room = asyncio.Event()
        self._waiting = False

    async def put_frame(self, frame: av.VideoFrame, pts90k: int) -> None:
        def admit() -> bool:
            if self.policy is Policy.LIVE:
                if self.video_lane.full():
                    self._overflow()
            elif self.video_lane.full():
                return False
            self.video_lane.items.append((frame, pts90k))
            return True

        await self._put(self.frames, admit)

    async def put_packet(self, packet: av.Packet, pts90k: int) -> None:
        def admit() -> bool:
            if self.policy is Policy.BLOCK:
                if self.video_lane.full():
                    return False
            elif packet.is_keyframe:
                if self.video_lane.full():
                    self._overflow()
                self.skipping = False  # decoding resumes here
            elif self.skipping:
                self.packets.dropped += 1
                return True
            elif self.video_lane.full():
                # This packet refers to the ones _overflow lets go: it goes too.
                self._overflow()
                self.packets.dropped += 1
                self.skipping = True
                self._loop.call_soon(self._on_skip, pts90k)
                return True
            self.video_lane.items.append((packet, pts90k))
            return True

        await self._put(self.packets, admit)

    async def put_audio(self, packet: av.Packet, pts90k: int) -> None:
        def admit() -> bool:
            if self.audio_lane.full():
                if self.policy is Policy.BLOCK:
                    return False
                self.audio_lane.items.popleft()
                self.audio.dropped += 1
            self.audio_lane.items.append((packet, pts90k))
            return True

        await self._put(self.audio, admit)

    async def _put(self, tally: _Tally, admit: Callable[[], bool]) -> None:
        """Admit an item (queued, or dropped and counted by `admit`), or wait for room while
        `admit` says there is none."""
        waited = False
        while True:
            with self._cond:
                if self.closed:
                    raise self.reason or RuntimeError("output pipeline is not running")
                if admit():
                    tally.received += 1
                    self._cond.notify()
                    return
                if not waited:
                    waited = True
                    tally.waited += 1
                self._waiting = True
                self._room.clear()
            await self._room.wait()

    def _overflow(self) -> None:
        """LIVE, the video lane full: the queued non-keyframes go (what follows them cannot
        be decoded without them either); if that made no room (a lane of keyframes and
        perhaps a frame), the oldest goes."""
        kept: deque[tuple[av.VideoFrame | av.Packet, int]] = deque()
        for item, pts in self.video_lane.items:
            if isinstance(item, av.Packet) and not item.is_keyframe:
                self.packets.dropped += 1
            else:
                kept.append((item, pts))
        self.video_lane.items = kept
        if self.video_lane.full():
            oldest, _ = kept.popleft()
            (self.packets if isinstance(oldest, av.Packet) else self.frames).dropped += 1

    def take(
        self,
    ) -> tuple[list[tuple[av.Packet, int]], tuple[av.VideoFrame | av.Packet, int] | None] | None:
        """On the encode thread: wait for work; all queued audio and the next frame or packet,
        or None once closed and empty."""
        with self._cond:
            while not (self.video_lane.items or self.audio_lane.items or self.closed):
                self._cond.wait()
            if not (self.video_lane.items or self.audio_lane.items):
                return None
            audio = list(self.audio_lane.items)
            self.audio_lane.items.clear()
            video = self.video_lane.items.popleft() if self.video_lane.items else None
            if self._waiting:
                self._waiting = False
                self._loop.call_soon_threadsafe(self._room.set)
            return audio, video

    def close(self) -> None:
        """No more submissions; the thread finishes what is queued. Waiting submitters raise."""
        with self._cond:
            self.closed = True
            self._cond.notify_all()
            if self._waiting:
                self._waiting = False
                self._loop.call_soon_threadsafe(self._room.set)

    def discard(self, reason: BaseException) -> None:
        """After a failure: drop what is queued so the thread stops at once; submitters get
        `reason` raised."""
        with self._cond:
            self.reason = self.reason or reason
            self.video_lane.items.clear()
            self.audio_lane.items.clear()
        self.close()


class _Splicer:
    """On the encode thread: frames (through the encoder) and encoded packets (as they are) into
    one video stream that decodes across every switch between the two.

    - Packets join only at a keyframe: after frames, at the start, or after a packet was dropped
      (a non-keyframe refers to pictures the output does not have).
    - The first frame after packets is encoded as an IDR.
    - Timestamps only go forward: a packet not after the video before it is dropped (it cannot
      be moved without moving the ones after it), and so is a frame not after the packet before
      it (frames after frames are the encoder's to fix).
    - The packets' source places keyframes by its own GOP, maybe far apart: `overdue(pts)` is called
      when a packet is not a keyframe and either a packet segment has run `gop` of media time
      without one or none can be muxed for want of one; then at most once per further gop.
    """

    def __init__(self, encoder: VideoEncoder, segmenter: Segmenter, overdue: Callable[[int], None]) -> None:
        self.gop = round(encoder.gop / CLOCK)  # on the 90 kHz clock
        self.size = (encoder.width, encoder.height)  # what frames are encoded at (the session's)
        self.frames_late = 0
        self.packets_dropped = 0
        self._encoder = encoder
        self._segmenter = segmenter
        self._overdue = overdue
        self._last_pts: int | None = None  # of the last video muxed
        self._after_packet = False  # the last video muxed was a packet
        self._joined = False  # packets are being muxed: the next one need not be a keyframe
        self._ask_at: int | None = None  # a non-keyframe packet from here on asks; None: the next

    def frame(self, frame: av.VideoFrame, pts90k: int) -> None:
        if self._after_packet:
            assert self._last_pts is not None
            if pts90k <= self._last_pts:
                self.frames_late += 1
                return
            self._after_packet = False
            self._encoder.request_keyframe()
        self._joined = False
        self._ask_at = None
        packets = []
        if self.size != (self._encoder.width, self._encoder.height):
            packets = self._encoder.resize(*self.size)  # the session was resized
        for packet in [*packets, *self._encoder.encode(frame, pts90k)]:
            self._segmenter.mux_video(packet)
        self._last_pts = self._encoder.last_pts

    def packet(self, packet: av.Packet, pts90k: int) -> None:
        if self._last_pts is not None and pts90k <= self._last_pts:
            self.packets_dropped += 1
            if self._joined:  # the picture stops here until a keyframe: ask for one at once
                self._joined = False
                self._ask_at = None
            return
        if packet.is_keyframe:
            self._ask_at = pts90k + self.gop
        else:
            if self._ask_at is None or pts90k >= self._ask_at:
                self._ask_at = pts90k + self.gop
                self._overdue(pts90k)
            if not self._joined:
                self.packets_dropped += 1
                return
        packet.pts = packet.dts = pts90k
        packet.time_base = CLOCK
        self._segmenter.mux_video(packet)
        self._last_pts = pts90k
        self._after_packet = self._joined = True

    def close(self) -> None:
        for packet in self._encoder.close():
            self._segmenter.mux_video(packet)


class OutputPipeline:
    """VideoEncoder → Segmenter → SegmentPublisherSink on one encode thread.

    `failed` resolves with the first error (encoder, muxer or publisher); `stop()` cleans up
    and then raises that error, so it is never lost.

    `on_keyframe_overdue` is called on the event loop when the encoded packets' source should
    send a keyframe (see _Splicer; and when an overflow skips packets up to the next one), at
    most once per gop of media time.
    """

    def __init__(
        self,
        publisher: Publisher,
        encoder: VideoEncoder,
        *,
        policy: Policy = Policy.LIVE,
        drop_audio: bool = False,
        queue_frames: int = QUEUE_FRAMES,
        queue_audio: int = QUEUE_AUDIO,
        sink_bytes: int = SINK_BUFFER,
        on_keyframe_overdue: Callable[[], None] | None = None,
    ) -> None:
        self.policy = policy
        self.encoder = encoder
        self.sink = SegmentPublisherSink(publisher, max_bytes=sink_bytes)
        self.segmenter = Segmenter(self.sink, encoder.width, encoder.height, drop_audio=drop_audio)
        self.error: BaseException | None = None
        self.on_keyframe_overdue = on_keyframe_overdue
        self._queue_frames = queue_frames
        self._queue_audio = queue_audio
        self._splicer = _Splicer(encoder, self.segmenter, self._keyframe_overdue_soon)
        self._keyframes_requested = 0
        self._last_request: int | None = None  # pts of the last on_keyframe_overdue call
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inbox: _Inbox | None = None
        self._thread: threading.Thread | None = None
        self._exited: asyncio.Future[None] | None = None
        self._failed: asyncio.Future[BaseException] | None = None

    @property
    def failed(self) -> asyncio.Future[BaseException]:
        """Resolves with the first error; cancelled by a stop() without one."""
        if self._failed is None:
            raise RuntimeError("pipeline not started")
        return self._failed

    @property
    def stats(self) -> PipelineStats:
        """The input hand-off's counters, now (the stages have their own: encoder.stats,
        segmenter.stats, sink.stats)."""
        if self._inbox is None:
            return PipelineStats()
        frames, packets, audio = self._inbox.frames, self._inbox.packets, self._inbox.audio
        return PipelineStats(
            frames_in=frames.received,
            frames_dropped=frames.dropped,
            frames_waited=frames.waited,
            audio_in=audio.received,
            audio_dropped=audio.dropped,
            audio_waited=audio.waited,
            packets_in=packets.received,
            packets_dropped=packets.dropped + self._splicer.packets_dropped,
            packets_waited=packets.waited,
            frames_late=self._splicer.frames_late,
            keyframes_requested=self._keyframes_requested,
        )

    @property
    def queued_frames(self) -> tuple[int, int]:
        """Frames and packets waiting for the encode thread now, and the most that may wait."""
        inbox = self._inbox
        return (len(inbox.video_lane.items) if inbox is not None else 0), self._queue_frames

    def resize(self, width: int, height: int) -> None:
        """Encode frames at width×height from the next one on (the session was resized; any
        thread): a new IDR, and so a new segment, at the new size."""
        self._splicer.size = (width, height)

    def add_audio_stream(self, info: AudioInfo) -> None:
        """Carry this audio stream into the output (ignored with drop_audio); on the event loop,
        before its first submit_audio(). A live input's audio parameters are known only once its
        first audio packet has been demuxed, and muxers write audio up to 0.7 s after the video
        beside it: the output does not wait for it. Added after the output began, the stream
        joins at the next segment, which is begun at once: a keyframe is asked for."""
        self.segmenter.add_audio_stream(info)
        if self.segmenter.stats.segments:
            self.encoder.request_keyframe()
            if self.on_keyframe_overdue is not None:
                self.on_keyframe_overdue()

    def start(self) -> None:
        """Start the publishing task and the encode thread; call on the event loop."""
        if self._thread is not None:
            raise RuntimeError("pipeline already started")
        self._loop = loop = asyncio.get_running_loop()
        self._inbox = _Inbox(loop, self.policy, self._queue_frames, self._queue_audio, self._keyframe_overdue)
        self._exited = loop.create_future()
        self._failed = loop.create_future()
        self.sink.start()
        self.sink.failed.add_done_callback(self._sink_failed)
        # daemon: a pipeline nobody stopped must not keep the process alive at exit.
        self._thread = threading.Thread(
            target=self._run, args=(loop, self._inbox, self._exited), name="output-encode", daemon=True
        )
        self._thread.start()

    async def submit(self, frame: av.VideoFrame, pts90k: int) -> None:
        """Hand a frame to the encoder, stamped `pts90k` on the output clock. The frame is the
        pipeline's from here on. Under BLOCK this waits while QUEUE_FRAMES are queued."""
        await self._running().put_frame(frame, pts90k)

    async def submit_packet(self, packet: av.Packet, pts90k: int) -> None:
        """Hand over an encoded H.264 access unit (Annex B, `is_keyframe` set) to be muxed as it
        is, stamped `pts90k` on the output clock: no re-encode. Frames and packets may take
        turns at any point (see _Splicer for how the output stays decodable). The packet is
        the pipeline's from here on. Shares the frames' bound: under BLOCK this waits while
        QUEUE_FRAMES are queued; under LIVE a full queue drops packets up to a keyframe."""
        await self._running().put_packet(packet, pts90k)

    async def submit_audio(self, packet: av.Packet, pts90k: int) -> None:
        """Hand over an audio packet, its timestamp mapped onto the output clock."""
        await self._running().put_audio(packet, pts90k)

    async def stop(self) -> None:
        """Encode what is queued, flush the encoder, end the last segment, join the thread and
        stop the publishing task; then raise the pipeline's error, if there was one."""
        if self._inbox is None or self._exited is None or self._thread is None:
            return
        self._inbox.close()
        try:
            await asyncio.shield(self._exited)
        finally:
            # Also on cancellation: a failed sink unblocks a thread waiting to write.
            await self.sink.stop()
        self._thread.join()
        error = self.error or self.sink.error
        if error is not None:
            self._record(error)  # the sink's failure callback may not have run yet
            raise error
        if self._failed is not None:
            self._failed.cancel()

    def _running(self) -> _Inbox:
        if self._inbox is None:
            raise RuntimeError("pipeline not started")
        return self._inbox

    # -- the encode thread -----------------------------------------------------------------

    def _run(self, loop: asyncio.AbstractEventLoop, inbox: _Inbox, exited: asyncio.Future[None]) -> None:
        error: BaseException | None = None
        try:
            while (work := inbox.take()) is not None:
                audio, video = work
                for packet, pts90k in audio:
                    self.segmenter.mux_audio(packet, pts90k)
                if video is not None:
                    item, pts90k = video
                    if isinstance(item, av.Packet):
                        self._splicer.packet(item, pts90k)
                    else:
                        self._splicer.frame(item, pts90k)
            self._splicer.close()
            self.segmenter.close()
        except Exception as exc:
            error = exc
            inbox.discard(exc)
            self.segmenter.abort()
        finally:
            loop.call_soon_threadsafe(self._thread_exited, exited, error)

    def _keyframe_overdue_soon(self, pts90k: int) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._keyframe_overdue, pts90k)

    def _keyframe_overdue(self, pts90k: int) -> None:
        # Two sides ask (the encode thread, the inbox when it skips): one request per gop
        # between them, as the owner expects (it may count unanswered ones).
        if self._last_request is not None and pts90k < self._last_request + self._splicer.gop:
            return
        self._last_request = pts90k
        self._keyframes_requested += 1
        if self.on_keyframe_overdue is not None:
            self.on_keyframe_overdue()

    def _thread_exited(self, exited: asyncio.Future[None], error: BaseException | None) -> None:
        if error is not None:
            self._record(error)
        if not exited.done():
            exited.set_result(None)

    def _sink_failed(self, failed: asyncio.Future[BaseException]) -> None:
        if not failed.cancelled():
            error = failed.result()
            self._record(error)
            if self._inbox is not None:
                self._inbox.discard(error)  # nothing can be published: stop encoding

    def _record(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        if self._failed is not None and not self._failed.done():
            self._failed.set_result(self.error)
