"""Decoder: one demuxer and one H.264 decoder for a session's whole input, on a thread of their own.

The input's bytes arrive through a ChunkQueue (filled by feed() on the event loop). The thread
demuxes MPEG-TS as the bytes come, decodes each video frame as soon as the demuxer has its packet,
scales it and hands it to on_frame; audio packets go to on_audio undecoded. Timestamps are the
input's own (the stream's time_base, 90 kHz for MPEG-TS), never rewritten.

Callbacks run on the decode thread, in this order per packet: on_video_packet, then on_frame for
each frame the packet completed (or on_audio for an audio packet). on_audio_stream comes once,
before the first on_audio of a packet whose stream parameters are known, with an AudioInfo a
muxer can carry the packets with (built here: it must be made on the thread that owns the
demuxer). Exactly one of on_end (the input ended and every frame was delivered) or on_error (the
decoder gave up) ends a run, unless stop() ended it first; on_exit comes last in every case, so
an owner on an event loop can wait for the thread without blocking (stop(wait=False), then join
only once on_exit has come).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction

import av
from av.container import InputContainer
from av.error import InvalidDataError
from av.video.codeccontext import VideoCodecContext

from relay_server import settings
from relay_server._fast import ChunkQueue, QueueAborted
from relay_server.media.scaler import Scaler
from relay_server.media.segmenter import AudioInfo

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
# one frame interval of latency throughout (measured end to end: frames left the decoder 68 ms
# after their last byte came in, at 30 fps). "fflags=+noparse" turns it off: a video PES (one
# access unit, as TS muxers write it) is a packet as soon as the next PES starts, one frame
# sooner (frame k out at 33.8 KB instead of 43.2 KB at 512×512, 101 KB instead of 130 KB at
# 720p), and the parser's CPU goes too. Audio still comes one packet per frame (the demuxer
# splits ADTS and TS-Opus framing itself); a PES of several AAC frames stays one packet, which a
# TS muxer carries unchanged. What the parser also did, flag keyframes, _keyframe() does.
# A probe this short may miss the AAC parameters (they are in the audio packets, not in the PMT):
# they are then learned from the first audio packet.
PROBE_OPTIONS = {"probesize": "32", "fflags": "+noparse"}
CORRUPT_BUDGET = 100


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
    corrupt_packets: int = 0  # reads and video packets rejected as invalid data
    damaged_frames: int = 0  # frames delivered with decoding errors concealed
    audio_packets: int = 0  # audio packets delivered to on_audio
    bytes_read: int = 0  # taken from the queue by the demuxer
    first_frame_time: float | None = None  # time.monotonic() when on_frame was first called
    decode_seconds: float = 0.0  # CPU time of the decode thread: demux, decode, scale, callbacks
    codec: str | None = None  # the input's video codec, and the size of its frames before scaling
    width: int = 0
    height: int = 0
    reorder_depth: int = 0  # frames the decoder holds back to reorder B-frames (0: no B-frames)
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
        on_video_packet: Callable[[av.Packet], object] | None = None,
        on_end: Callable[[], object] | None = None,
        on_error: Callable[[Exception], object] | None = None,
        on_exit: Callable[[], object] | None = None,
        thread_count: int | None = None,
        corrupt_budget: int = CORRUPT_BUDGET,
        name: str = "decoder",
    ) -> None:
        self.name = name
        self.stats = DecoderStats()
        self.error: Exception | None = None  # why the decoder gave up, once it has
        self.audio_stream_info: AudioStreamInfo | None = None  # once the first audio packet is read
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

    def start(self) -> None:
        if self._thread is not None or self._stopping:
            raise RuntimeError(f"decoder {self.name} was already started or stopped")
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=False)
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
                with av.open(
                    _EndOnAbort(self._queue),
                    mode="r",
                    format="mpegts",
                    buffer_size=READ_SIZE,
                    container_options=PROBE_OPTIONS,
                ) as container:
                    self._decode(container)
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

    def _decode(self, container: InputContainer) -> None:
        started = time.thread_time()
        if not container.streams.video:
            raise InputError("no video stream in the input")
        video = container.streams.video[0]
        codec = video.codec_context
        # Slice threads add no latency; frame threads would hold back one frame per thread.
        codec.thread_type = "SLICE"
        codec.thread_count = self._thread_count
        self.stats.codec = codec.name
        streams: list[av.VideoStream | av.AudioStream] = [video]
        audio = container.streams.audio[0] if self._on_audio is not None and container.streams.audio else None
        if audio is not None:
            streams.append(audio)
        for packet in self._packets(container, streams):
            if self._stopping:  # stop() from a callback, or while the demuxer had bytes buffered
                raise QueueAborted("decoder stopped")
            if packet.stream_index == video.index:
                self.stats.packets += 1
                if self._on_video_packet is not None:
                    packet.is_keyframe = packet.is_keyframe or _keyframe(bytes(packet))
                    self._on_video_packet(packet)
                self._decode_video(codec, packet)
            elif audio is not None:
                self._audio(audio, packet)
            self.stats.bytes_read = self._queue.bytes_out
            self.stats.decode_seconds = time.thread_time() - started
        if self._queue.aborted:  # demux() took the aborted read for the end of the input
            raise QueueAborted("ChunkQueue aborted")
        # The end: an empty packet drains the frames held back for reordering (unlike None, it
        # gives them the stream's time_base).
        drain = av.Packet()
        assert video.time_base is not None  # a demuxer always sets it
        drain.time_base = video.time_base
        self._decode_video(codec, drain)
        self.stats.decode_seconds = time.thread_time() - started

    def _decode_video(self, codec: VideoCodecContext, packet: av.Packet) -> None:
        try:
            frames = codec.decode(packet)
        except InvalidDataError as exc:
            self._corrupt(exc)
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
                self._corrupt(exc)

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

    def _corrupt(self, exc: Exception) -> None:
        self.stats.corrupt_packets += 1
        self._count_error(str(exc))

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


class _EndOnAbort:
    """The ChunkQueue as the demuxer reads it: an aborted queue reads as the end of the input.

    An exception raised inside PyAV's read callback while av.open() probes is printed and dropped
    ("PyAV library exception being dropped"); an end of input is not. The decoder then tells an
    abort from a real end by asking the queue.
    """

    def __init__(self, queue: ChunkQueue) -> None:
        self._queue = queue

    def read(self, n: int = -1) -> bytes:
        try:
            return self._queue.read(n)
        except QueueAborted:
            return b""


# An H.264 access unit starts an IDR picture when it holds a NAL unit of type 5 (the low five
# bits of the byte after a start code).
_IDR = re.compile(rb"\x00\x00\x01[\x05\x25\x45\x65]")


def _keyframe(access_unit: bytes) -> bool:
    return _IDR.search(access_unit) is not None
