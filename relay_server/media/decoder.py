"""Decoder: one demuxer and one H.264 decoder for a session's whole input, on a thread of their own.

The input's bytes arrive through a ChunkQueue (filled by feed() on the event loop). The thread
demuxes MPEG-TS as the bytes come, decodes each video frame as soon as its access unit is complete,
scales it and hands it to on_frame; audio packets go to on_audio undecoded. Timestamps are the
input's own (the stream's time_base, 90 kHz for MPEG-TS), never rewritten.

Two demuxers share the work, on the one thread. H.264 video is cut out of the TS by a VideoSplitter
(tsvideo.py), which knows an access unit is complete at its last TS packet; libavformat would
know only once the next one starts, a frame interval later (see PROBE_OPTIONS). libavformat
demuxes the audio (and everything, video included, when the video is not H.264). Every chunk read
from the queue goes through the splitter first, then on to libavformat: a unit the splitter
completed is decoded when libavformat asks for the bytes after it, so that the callbacks still
come in input order (an audio packet before a frame whose last byte came after it). Input without
audio, or whose audio nobody takes, skips libavformat altogether.

Callbacks run on the decode thread, in this order per packet: on_video_packet (which may take the
packet as it is, returning True: it is then not decoded), then on_frame for each frame the packet
completed (or on_audio for an audio packet). on_audio_stream comes once,
before the first on_audio of a packet whose stream parameters are known, with an AudioInfo a
muxer can carry the packets with (built here: it must be made on the thread that owns the
demuxer); when the input has audio for on_audio, the first frames wait for it (at most
`audio_wait` of video time), so that an owner can add the stream to its output before the video
begins, unless `audio_wait` is 0 (a live relay: muxers write audio up to 0.7 s after the video
beside it, and the video must not wait for it). Exactly
one of on_end (the input ended and every frame was delivered) or on_error (the decoder gave up)
ends a run, unless stop() ended it first; on_exit comes last in every case, so an owner on an
event loop can wait for the thread without blocking (stop(wait=False), then join only once
on_exit has come).
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction

import av
from av.container import InputContainer
from av.error import InvalidDataError
from av.stream import Discard
from av.video.codeccontext import VideoCodecContext

from relay_server import settings
from relay_server._fast import ChunkQueue, QueueAborted
from relay_server.media.h264 import declared_frame_rate, is_idr
from relay_server.media.scaler import Scaler
from relay_server.media.segmenter import AudioInfo
from relay_server.media.tsvideo import AccessUnit, Damage, Program, SplitterStats, VideoSplitter

log = logging.getLogger(__name__)

READ_SIZE = 64 * 1024  # bytes per read from the queue: one subscriber chunk
# MPEG-TS has no header that ends probing (its streams come from the PMT, which comes first), so
# av.open() returns only when libavformat's probe stops: by default after ~20 frames, read to guess
# the frame rate; with a small probesize after that many bytes of packets (32, the minimum: after
# the first packet). Bytes read before the first frame came out, the Decoder fed in 1880-byte steps,
# for 512×512 at 1 Mbit/s / 512×512 with B-frames and AAC at 1.9 Mbit/s / 1280×720 with AAC at
# 3.5 Mbit/s:
#     default probing      109 KB / 180 KB / 365 KB   (analyzeduration 0, 1 µs or 0.1 s: the same)
#     probesize 32768       43 KB /  51 KB / 122 KB
#     probesize 4096 or 32  38 KB /  51 KB / 122 KB   = no later than without any probe:
# frame 0's packet is complete at 28 / 28 / 93 KB, but the demuxer's H.264 parser finds the end of
# an access unit only at the next one's PES start (frame 1's), which it is given when frame 2's
# PES starts (37 / 45 / 121 KB); B-frames add the decoder's reorder delay. So the parser costs
# one frame interval of latency throughout. "fflags=+noparse" turns it off: a video PES (one
# access unit, as TS muxers write it) is a packet as soon as the next PES starts, one frame
# sooner, and the parser's CPU goes too. Audio still comes one packet per frame (the demuxer
# splits ADTS and TS-Opus framing itself); a PES of several AAC frames stays one packet, which a
# TS muxer carries unchanged. What the parser also did, flag keyframes, h264.is_idr() does.
# That still left a frame interval: muxers leave a video PES's length out (FFmpeg's
# omit_video_pes_length=1), so libavformat knows a PES is complete only once the next one starts
# (measured end to end: frames left the decoder 34 ms after their last byte came in, at 30 fps).
# So H.264 is cut out by the VideoSplitter instead, which ends a PES at its stuffed last TS packet
# (tsvideo.py), and libavformat is left the audio. Fed one TS packet at a time, frame k of the
# clips above came out when the next PES had begun (frame 1 at 36.7 KB, its own PES ending at
# 36.5 KB; 120.7 and 119.8 KB at 720p): now with its own last packet, at 36.5 and 119.8 KB, a frame
# interval sooner live (1 frame in 60 of the 512×512 clip still waits: its last packet is full, so
# there is nothing to stuff). B-frames keep the decoder's reorder delay (2.9 → 1.95 later PESs begun
# on average when a frame comes out). The splitter costs 2.4–3.8 ms of CPU per MB (0.04 ms per 720p
# frame at 3.5 Mbit/s).
# A probe this short may miss the AAC parameters (they are in the audio packets, not in the PMT):
# they are then learned from the first audio packet.
PROBE_OPTIONS = {"probesize": "32", "fflags": "+noparse"}
CORRUPT_BUDGET = 100
# Bytes read looking for a PMT that names the video stream before the input goes to libavformat as
# it is (the trickle segments each begin with PAT and PMT; FFmpeg repeats them every 0.1 s).
PROGRAM_SEARCH = 1 << 20
# How long (in the video's own time, 90 kHz) the first frames wait for the audio stream's parameters
# by default, when the input has audio for on_audio: an owner that must add the audio stream to its
# output before the first frame reaches it.
AUDIO_WAIT = 45_000
CLOCK = Fraction(1, 90_000)  # MPEG-TS timestamps


class InputError(ValueError):
    """The input cannot be decoded: no video stream, or corrupt beyond the budget."""


@dataclass(frozen=True)
class AudioStreamInfo:
    """What a muxer needs to carry the audio packets on unchanged."""

    codec: str
    sample_rate: int
    channels: int
    time_base: Fraction
    extradata: bytes | None


@dataclass
class DecoderStats:
    """Written by the decode thread; cheap to read from the event loop (fields may be a packet apart)."""

    packets: int = 0  # video packets demuxed
    frames: int = 0  # frames delivered to on_frame
    forwarded: int = 0  # video packets on_video_packet took as they are, not decoded
    corrupt_packets: int = 0  # reads and video packets rejected as invalid data
    damaged_frames: int = 0  # frames delivered with decoding errors concealed
    audio_packets: int = 0  # audio packets delivered to on_audio
    bytes_read: int = 0  # taken from the queue by the demuxer
    # time.monotonic() when the first frame was ready: on_frame called, or a packet forwarded
    first_frame_time: float | None = None
    decode_seconds: float = 0.0  # CPU time of the decode thread: demux, decode, scale, callbacks
    # "split": H.264 access units cut out by the VideoSplitter; "libavformat": any other video.
    video_demuxer: str | None = None
    codec: str | None = None  # the input's video codec, and the size of its frames before scaling
    width: int = 0
    height: int = 0
    reorder_depth: int = 0  # frames the decoder holds back to reorder B-frames (0: no B-frames)
    declared_rate: Fraction | None = None  # frames per second the input's SPS declares (VUI timing)
    first_pts: int | None = None
    last_pts: int | None = None
    time_base: Fraction | None = None

    @property
    def frame_rate(self) -> Fraction | None:
        """Average frames per second of the decoded timeline (None before two frames)."""
        if self.first_pts is None or self.last_pts is None or self.time_base is None:
            return None
        span = (self.last_pts - self.first_pts) * self.time_base
        return (self.frames - 1) / span if span > 0 else None


class Decoder:
    """Decodes the MPEG-TS read from `queue` on its own thread until the input ends or stop()."""

    def __init__(
        self,
        queue: ChunkQueue,
        on_frame: Callable[[av.VideoFrame], object],
        *,
        scaler: Scaler | None = None,
        on_audio: Callable[[av.Packet], object] | None = None,
        on_audio_stream: Callable[[AudioInfo], object] | None = None,
        on_video_packet: Callable[[av.Packet], bool] | None = None,
        on_end: Callable[[], object] | None = None,
        on_error: Callable[[Exception], object] | None = None,
        on_exit: Callable[[], object] | None = None,
        thread_count: int | None = None,
        corrupt_budget: int = CORRUPT_BUDGET,
        audio_wait: int = AUDIO_WAIT,
        name: str = "decoder",
    ) -> None:
        self.name = name
        self.audio_wait = audio_wait  # 90 kHz ticks
        self.stats = DecoderStats()
        self.error: Exception | None = None  # why the decoder gave up, once it has
        self.audio_stream_info: AudioStreamInfo | None = None  # once the first audio packet is read
        self.splitter_stats: SplitterStats | None = None  # the VideoSplitter's, written by the thread
        self._queue = queue
        self._scaler = scaler or Scaler()
        self._on_frame = on_frame
        self._on_audio = on_audio
        self._on_audio_stream = on_audio_stream
        self._on_video_packet = on_video_packet
        self._on_end = on_end
        self._on_error = on_error
        self._on_exit = on_exit
        self._thread_count = thread_count or settings.workers()
        self._corrupt_budget = corrupt_budget
        self._errors_in_row = 0  # corrupt packets and damaged frames since the last good frame
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._started = 0.0  # thread_time() when the thread began
        self._codec: VideoCodecContext | None = None  # the decoder of the split video
        self._held: list[AccessUnit] | None = None  # first access units waiting for the audio stream

    def start(self) -> None:
        if self._thread is not None or self._stopping:
            raise RuntimeError(f"decoder {self.name} was already started or stopped")
        # In the starter's context: its context variables (the session id on log records) hold
        # on the thread too.
        context = contextvars.copy_context()
        self._thread = threading.Thread(target=context.run, args=(self._run,), name=self.name, daemon=False)
        self._thread.start()

    def stop(self, *, wait: bool = True) -> None:
        """End decoding now and wait for the thread; any time, any number of times.

        The thread may be inside on_frame: a callback that blocks must not wait on the caller.
        With wait=False only ask: on_exit says when the thread is done (the loop must not join).
        """
        self._stopping = True
        self._queue.abort()  # wakes the thread if it is waiting for input
        thread = self._thread
        if wait and thread is not None and thread is not threading.current_thread():
            thread.join()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the decode thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._run_once()
        finally:
            if self._on_exit is not None:
                self._on_exit()

    def _run_once(self) -> None:
        try:
            try:
                self._decode_input()
            except Exception as exc:
                if not self._queue.aborted and not isinstance(exc, QueueAborted):
                    raise
                if self._stopping:
                    log.debug("decoder %s: stopped", self.name)
                    return
                raise InputError("the input was aborted before its end") from exc
            if self._on_end is not None:
                self._on_end()
        except Exception as exc:
            self._fail(exc)

    def _decode_input(self) -> None:
        self._started = time.thread_time()
        splitter = VideoSplitter()
        self.splitter_stats = splitter.stats
        source = _Source(self._queue, splitter, self._split)
        program = source.find_program(PROGRAM_SEARCH)
        if not splitter.stats.packets and splitter.stats.bytes:
            # Not one TS packet: libavformat would search the input for one for as long as it lasts.
            self.stats.bytes_read = self._queue.bytes_out
            raise InputError(
                f"the input is not MPEG-TS: no TS packet (sync byte 0x47 every 188 bytes) in its "
                f"first {splitter.stats.bytes} bytes"
            )
        if program is not None and program.h264:
            self._split_video(source, program)
        else:  # no PMT, no video in it, or not H.264: libavformat demuxes it all, as it is
            source.stop_splitting()
            self.splitter_stats = None
            self._demux(source, video=True)
        source.check()  # what a callback raised inside libavformat's read
        if self._stopping or self._queue.aborted:  # the demuxer took the aborted read for the end
            raise QueueAborted("decoder stopped" if self._stopping else "ChunkQueue aborted")
        if self._codec is not None:
            self._release_held()  # the input ended before the audio stream was known
            # The end: an empty packet drains the frames held back for reordering (unlike None,
            # it gives them the stream's time_base).
            drain = av.Packet()
            drain.time_base = CLOCK
            self._decode_video(self._codec, drain)
        self.stats.bytes_read = self._queue.bytes_out
        self.stats.decode_seconds = time.thread_time() - self._started

    def _split_video(self, source: _Source, program: Program) -> None:
        """H.264 from the splitter; audio, if the input has streams besides the video and someone
        takes audio, from libavformat."""
        codec = self._codec = av.CodecContext.create("h264", "r")
        # Slice threads add no latency; frame threads would hold back one frame per thread.
        codec.thread_type = "SLICE"
        codec.thread_count = self._thread_count
        self.stats.codec = codec.name
        self.stats.video_demuxer = "split"
        if self._on_audio is None or not program.others:
            source.drain()  # reading the input decodes its video
            return
        self._held = [] if self.audio_wait else None  # the first frames wait for the audio stream
        self._demux(source, video=False)
        source.drain()  # the rest of the input, should libavformat have stopped reading before its end

    def _demux(self, source: _Source, *, video: bool) -> None:
        """libavformat demuxes the input read through `source`: its audio, and its video if `video`."""
        try:
            container = av.open(
                source, mode="r", format="mpegts", buffer_size=READ_SIZE, container_options=PROBE_OPTIONS
            )
        except Exception as exc:
            source.check()  # the probe read an end of input that a callback's error made
            if video or self._stopping or self._queue.aborted:
                raise
            log.warning("decoder %s: the input's audio cannot be demuxed: %s", self.name, exc)
            self._release_held()  # the video goes on without it
            return
        with container:
            source.check()
            if video:
                self._decode(container)
                return
            audio = container.streams.audio[0] if container.streams.audio else None
            if audio is None:  # the other streams are not audio: libavformat has nothing to do
                self._release_held()
                source.drain()
                return
            for stream in container.streams:
                if stream is not audio:
                    stream.discard = Discard.all  # libavformat skips their PES altogether
            for packet in self._packets(container, [audio]):
                source.check()
                if self._stopping:
                    raise QueueAborted("decoder stopped")
                self._audio(audio, packet)
                self.stats.bytes_read = self._queue.bytes_out
                self.stats.decode_seconds = time.thread_time() - self._started

    def _decode(self, container: InputContainer) -> None:
        """Video (and audio) as libavformat demuxes them: video that is not H.264."""
        if not container.streams.video:
            raise InputError("no video stream in the input")
        video = container.streams.video[0]
        codec = video.codec_context
        # Slice threads add no latency; frame threads would hold back one frame per thread.
        codec.thread_type = "SLICE"
        codec.thread_count = self._thread_count
        self.stats.codec = codec.name
        self.stats.video_demuxer = "libavformat"
        streams: list[av.VideoStream | av.AudioStream] = [video]
        audio = container.streams.audio[0] if self._on_audio is not None and container.streams.audio else None
        if audio is not None:
            streams.append(audio)
        for packet in self._packets(container, streams):
            if self._stopping:  # stop() from a callback, or while the demuxer had bytes buffered
                raise QueueAborted("decoder stopped")
            if packet.stream_index == video.index:
                self._video_packet(codec, packet, None)
            elif audio is not None:
                self._audio(audio, packet)
            self.stats.bytes_read = self._queue.bytes_out
            self.stats.decode_seconds = time.thread_time() - self._started
        if self._queue.aborted:  # demux() took the aborted read for the end of the input
            raise QueueAborted("ChunkQueue aborted")
        # The end: an empty packet drains the frames held back for reordering (unlike None, it
        # gives them the stream's time_base).
        drain = av.Packet()
        assert video.time_base is not None  # a demuxer always sets it
        drain.time_base = video.time_base
        self._decode_video(codec, drain)

    def _split(self, event: AccessUnit | Damage) -> None:
        """What the splitter cut out, once libavformat has read the bytes before its end."""
        if self._stopping:
            raise QueueAborted("decoder stopped")
        if isinstance(event, Damage):
            self._corrupt(f"video PES dropped: {event.reason}")
        elif self._held is not None:
            held = self._held
            held.append(event)
            first, last = held[0], held[-1]
            start = first.dts if first.dts is not None else first.pts
            end = last.dts if last.dts is not None else last.pts
            if len(held) > 64 or (start is not None and end is not None and end - start >= self.audio_wait):
                log.info("decoder %s: no audio stream parameters after %d video frames", self.name, len(held))
                self._release_held()
        else:
            self._unit(event)

    def _release_held(self) -> None:
        held, self._held = self._held, None
        for unit in held or ():
            self._unit(unit)

    def _unit(self, unit: AccessUnit) -> None:
        assert self._codec is not None
        # An SPS comes before the first slice of a unit, so this looks no further (~0.5 µs).
        self.stats.declared_rate = declared_frame_rate(unit.data) or self.stats.declared_rate
        packet = av.Packet(unit.data)
        packet.pts, packet.dts, packet.time_base = unit.pts, unit.dts, CLOCK
        self._video_packet(self._codec, packet, unit)
        self.stats.bytes_read = self._queue.bytes_out
        self.stats.decode_seconds = time.thread_time() - self._started

    def _video_packet(self, codec: VideoCodecContext, packet: av.Packet, unit: AccessUnit | None) -> None:
        self.stats.packets += 1
        if self._on_video_packet is not None:
            if unit is not None:
                packet.is_keyframe = unit.random_access or is_idr(unit.data)
            else:
                packet.is_keyframe = packet.is_keyframe or is_idr(bytes(packet))
            if self._on_video_packet(packet):
                self.stats.forwarded += 1
                if self.stats.first_frame_time is None:
                    self.stats.first_frame_time = time.monotonic()
                return  # taken as it is (zero-transcode): not decoded
        self._decode_video(codec, packet)

    def _decode_video(self, codec: VideoCodecContext, packet: av.Packet) -> None:
        try:
            frames = codec.decode(packet)
        except InvalidDataError as exc:
            self._corrupt(str(exc))
            return
        for frame in frames:
            self._deliver(frame)
        self.stats.reorder_depth = codec.reorder_depth

    def _packets(
        self, container: InputContainer, streams: list[av.VideoStream | av.AudioStream]
    ) -> Iterator[av.Packet]:
        """The packets of `streams` in input order; what the demuxer rejects is counted and skipped."""
        while True:
            try:
                for packet in container.demux(streams):
                    if not packet.size:  # demux() ends with empty packets that mean "flush"
                        return
                    yield packet
                return
            except InvalidDataError as exc:
                # The demuxer resynchronises on the next TS packet: read on.
                self._corrupt(str(exc))

    def _deliver(self, frame: av.VideoFrame) -> None:
        stats = self.stats
        if frame.is_corrupt:
            stats.damaged_frames += 1
            self._count_error(f"damaged frame at pts {frame.pts}")
        else:
            self._errors_in_row = 0
        stats.width, stats.height = frame.width, frame.height
        if stats.first_pts is None:
            stats.first_pts, stats.time_base = frame.pts, frame.time_base
        stats.last_pts = frame.pts
        scaled = self._scaler(frame)
        stats.frames += 1
        if stats.first_frame_time is None:
            stats.first_frame_time = time.monotonic()
            log.info(
                "decoder %s: first frame after %d bytes (%s %dx%d)",
                self.name,
                self._queue.bytes_out,
                stats.codec,
                frame.width,
                frame.height,
            )
        self._on_frame(scaled)

    def _audio(self, stream: av.AudioStream, packet: av.Packet) -> None:
        assert self._on_audio is not None  # audio is demuxed only for a receiver
        if self.audio_stream_info is None:
            self.audio_stream_info = _describe_audio(stream, packet)
            if self.audio_stream_info is not None and self._on_audio_stream is not None:
                self._on_audio_stream(AudioInfo(stream))
        self.stats.audio_packets += 1
        self._on_audio(packet)
        if self._held is not None and self.audio_stream_info is not None:
            self._release_held()  # the owner knows the audio stream: the video may begin

    def _corrupt(self, what: str) -> None:
        self.stats.corrupt_packets += 1
        self._count_error(what)

    def _count_error(self, what: str) -> None:
        self._errors_in_row += 1
        # Warn once per run of errors; the counters in stats say how many there were.
        level = logging.WARNING if self._errors_in_row == 1 else logging.DEBUG
        log.log(level, "decoder %s: corrupt input skipped: %s", self.name, what)
        if self._errors_in_row > self._corrupt_budget:
            raise InputError(
                f"{self._errors_in_row} corrupt packets or damaged frames in a row (last: {what})"
            )

    def _fail(self, error: Exception) -> None:
        self.error = error
        log.error("decoder %s failed: %s", self.name, error, exc_info=error)
        self._queue.abort()  # the feeder must not wait for a reader that is gone
        if self._on_error is not None:
            try:
                self._on_error(error)
            except Exception:
                log.exception("decoder %s: on_error failed", self.name)


def _describe_audio(stream: av.AudioStream, packet: av.Packet) -> AudioStreamInfo | None:
    """The audio stream's parameters, from the probe or else from decoding `packet` (None: unknown yet)."""
    context = stream.codec_context
    sample_rate, channels = context.sample_rate, context.channels
    if not sample_rate:
        # The short probe ended before the first audio packet, and AAC gives its rate and
        # channels only in its packets: decode this one to learn them (it is delivered as it was).
        try:
            frames = context.decode(packet)
        except InvalidDataError:
            return None
        if not frames:
            return None
        sample_rate, channels = frames[0].sample_rate, frames[0].layout.nb_channels
    time_base = stream.time_base
    assert time_base is not None  # a demuxer always sets it
    return AudioStreamInfo(context.name, sample_rate, channels, time_base, context.extradata)


class _Source:
    """The input as the decode thread reads it: each chunk from the queue goes through the video
    splitter, then on to libavformat (or nowhere, when nothing else needs demuxing).

    read() is libavformat's read callback. What the splitter completed goes to `on_event` once the
    bytes before its end have been handed on: libavformat asks for more only once it has demuxed
    (and the decoder delivered) every packet that ends before, so callbacks keep the input's order.
    read() never raises: an exception raised inside PyAV's read callback while av.open() probes is
    printed and dropped ("PyAV library exception being dropped"), an end of input is not. So an
    aborted queue reads as the end (the decoder then asks the queue), and what `on_event` raises is
    kept for check(), every later read returning the end.
    """

    def __init__(
        self, queue: ChunkQueue, splitter: VideoSplitter, on_event: Callable[[AccessUnit | Damage], object]
    ) -> None:
        self._queue = queue
        self._splitter: VideoSplitter | None = splitter
        self._on_event = on_event
        self._chunks: deque[bytes] = deque()  # read from the queue, not yet handed on
        self._head = 0  # bytes of _chunks[0] handed on
        self._handed = 0  # input offset handed on
        # Split out, waiting for the bytes before their end to be handed on.
        self._events: deque[AccessUnit | Damage] = deque()
        self._ended = False  # the queue has ended
        self._closed = False  # read() ends the input: aborted, or on_event raised
        self._error: Exception | None = None

    def find_program(self, limit: int) -> Program | None:
        """Read until the splitter has found the PMT (or `limit` bytes or the end); may raise QueueAborted."""
        splitter = self._splitter
        assert splitter is not None
        searched = 0
        while splitter.program is None and searched < limit and not self._ended:
            searched += self._fill()
        return splitter.program

    def stop_splitting(self) -> None:
        self._splitter = None
        self._events.clear()

    def read(self, n: int = -1) -> bytes:
        if self._closed:
            return b""
        try:
            return self._read(n)
        except QueueAborted:
            pass
        except Exception as exc:
            self._error = exc
        self._closed = True
        return b""

    def drain(self) -> None:
        """Read to the end of the input with nobody taking the bytes."""
        while self.read():
            pass

    def check(self) -> None:
        """Raise what on_event raised, if it did."""
        if self._error is not None:
            raise self._error

    def _read(self, n: int) -> bytes:
        events = self._events
        while True:
            while events and events[0].end <= self._handed:
                self._on_event(events.popleft())
            if self._chunks:
                chunk = self._chunks[0]
                start = self._head
                count = len(chunk) - start
                if 0 < n < count:
                    count = n
                if events and events[0].end - self._handed < count:
                    count = events[0].end - self._handed  # up to the next unit's end, then deliver it
                self._handed += count
                if start + count == len(chunk):
                    self._chunks.popleft()
                    self._head = 0
                    return chunk if start == 0 else chunk[start:]
                self._head = start + count
                return chunk[start : start + count]
            if self._ended:
                return b""
            self._fill()

    def _fill(self) -> int:
        chunk = self._queue.read()
        splitter = self._splitter
        if not chunk:
            self._ended = True
            if splitter is not None:
                self._events.extend(splitter.end())
            return 0
        if splitter is not None:
            self._events.extend(splitter.feed(chunk))
        self._chunks.append(chunk)
        return len(chunk)
