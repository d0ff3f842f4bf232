"""Encoded packets to MPEG-TS segments: one segment per GOP, streamed to a sink as it is muxed.

A segment begins at every video keyframe and decodes on its own (PAT/PMT first, then the IDR
with its SPS/PPS in-band); timestamps are the packets' own, so they run on across segments.

Muxing approach, measured (512×512 @ 30 fps, 2 Mbit/s, 20 s = 600 video packets in 10
segments, PyAV 18 / FFmpeg 8.1, flush_packets=1):
- one long-lived muxer, cut before each keyframe: 1.6–1.8 ms CPU for the 20 s of video. FFmpeg
  repeats PAT/PMT before every keyframe by itself, so these segments are self-contained too;
- a fresh `av.open(..., format="mpegts")` per segment: 1.6–2.1 ms CPU, of which opening,
  writing the header and closing cost 0.02 ms per segment (also with an AAC or Opus stream:
  8–9 ms CPU for the 20 s of video plus audio). The output differs by 188 bytes in 5.3 MB.
Either way muxing is noise next to encoding (~1 ms CPU per frame). A fresh muxer per segment
also closes cleanly: closing writes out everything it holds before the keyframe that cuts. (Its
continuity counters start afresh in each segment; played back to back the segments still decode
as one stream, which the tests check.)

Audio and video are muxed by two muxers, one stream each, into one transport stream. One muxer
with both streams interleaves them (`av_interleaved_write_frame`, all PyAV offers): it writes a
packet only once one with a later timestamp is in, so each video packet waited for the next
(measured end to end: 34 ms more latency at 30 fps, 16 ms at 60, than without audio), and the
last before a gap (a slow or reconnecting processor) until the gap's first fill. A muxer with one
stream writes each packet as it comes. The video muxer's PSI (PAT, PMT, SDT) is replaced by the
tables of a muxer with both streams (the audio stream on AUDIO_PID), and the audio muxer's is
left out: readers see one program with both streams, as before. The order across the two is
still by time: audio waits here until the video passes its timestamp, so it also lands in the
segment whose frames it plays under. Cost, measured: 13.7 ms CPU against 10.1 ms for one muxer,
for 20 s of 256×256 video with AAC (0.006 ms a frame).

Video PES carry their length (omit_video_pes_length=0) where it fits in 16 bits (frames under 64
KiB): a reader's demuxer then has a frame the moment its last byte is in, where otherwise it
knows a frame complete only when the next one starts (one frame interval later; at a gap, later).
"""

from __future__ import annotations

import contextlib
import io
from collections import deque
from dataclasses import dataclass
from fractions import Fraction
from typing import Protocol

import av
import av.container
import av.stream

from relay_server.media.encoder import CLOCK
from relay_server.media.h264 import sps_in, with_frame_rate

# Audio packets waiting for the video to pass their timestamp. Audio arrives from the demuxer
# ahead of the processed video; 256 packets is over 5 s of AAC or Opus. When video stalls for
# longer, the oldest audio goes (live: the newest matters) and `audio_dropped` counts it.
AUDIO_QUEUE = 256
TS_PACKET = 188
# The muxers' write buffer, whole TS packets (the PSI is found by TS packet). With flush_packets=1
# bytes reach the sink at the end of every packet, and within a large packet (an IDR) every time
# this much has been written.
WRITE_BUFFER = 174 * TS_PACKET
# The audio stream's PID: the video's is FFmpeg's first (0x100), in both muxers.
AUDIO_PID = 0x101
PMT_PID = 0x1000  # FFmpeg's (mpegts_pmt_start_pid)
# flush_packets: the sink gets each packet's bytes as it is muxed, not when the buffer fills.
# mpegts_copyts: timestamps as given, never offset by the muxer.
MUXER_OPTIONS = {"flush_packets": "1", "mpegts_copyts": "1"}


class SegmentSink(Protocol):
    """Where segments go. Called on the thread that feeds the segmenter, in order:
    begin(n), write(...)*, end(n), begin(n + 1), ..."""

    def begin(self, index: int) -> None: ...

    def write(self, data: bytes) -> None: ...

    def end(self, index: int) -> None: ...


class AudioInfo:
    """An audio stream's codec parameters, copied out of its source (the input demuxer) so its
    packets can be carried into the output as they are, with no re-encode.

    Build it on the thread that owns the source; it shares nothing with the source afterwards,
    so it may be used on another thread and outlive the demuxer.
    """

    def __init__(self, stream: av.AudioStream) -> None:
        """Raises ValueError for codecs MPEG-TS cannot carry."""
        # An output container that is never started (so never writes) keeps a stream whose
        # codec parameters (extradata, layout, …) are a copy of the source's; each segment's
        # audio stream is made from it.
        self._holder = av.open(io.BytesIO(), "w", format="mpegts")
        self._template = self._holder.add_stream_from_template(stream)
        context = self._template.codec_context
        # A demuxer that probed only a few bytes may not know AAC's rate and channels (they
        # are in its packets); the source's decoder context learns them by decoding one.
        source = stream.codec_context if context.sample_rate == 0 else context
        self.codec: str = context.name
        self.sample_rate: int = source.sample_rate
        self.layout: str = source.layout.name
        self.time_base: Fraction | None = stream.time_base
        self.extradata: bytes | None = context.extradata

    def add_to(self, container: av.container.OutputContainer) -> av.AudioStream:
        """A stream for these packets in `container`, before its header is written."""
        stream = container.add_stream_from_template(self._template)
        # Parameters the source's demuxer lacked; start_encoding() copies them into the header.
        stream.codec_context.sample_rate = self.sample_rate
        stream.codec_context.layout = self.layout
        return stream

    def __repr__(self) -> str:
        return f"AudioInfo({self.codec} {self.sample_rate} Hz {self.layout})"


@dataclass
class SegmenterStats:
    segments: int = 0  # segments begun
    bytes: int = 0  # bytes handed to the sink
    video_packets: int = 0  # video packets muxed
    video_dropped: int = 0  # video packets before the first keyframe (no segment to put them in)
    audio_packets: int = 0  # audio packets muxed
    audio_dropped: int = 0  # audio before the first segment with audio, beyond AUDIO_QUEUE, or drop_audio
    audio_pts_fixed: int = 0  # audio timestamps not after the previous one, moved to previous + 1


class Segmenter:
    """Feed packets in order from one thread: `mux_video`, `mux_audio`; `close()` at the end."""

    def __init__(
        self,
        sink: SegmentSink,
        width: int,
        height: int,
        *,
        drop_audio: bool = False,
        start_index: int = 0,
        audio_queue: int = AUDIO_QUEUE,
    ) -> None:
        self.width = width
        self.height = height
        self.drop_audio = drop_audio
        # What every SPS muxed declares (its VUI timing), when set: the input's frame rate, which
        # readers take the stream's to be (any thread may set it; the muxing thread reads it).
        self.frame_rate: Fraction | None = None
        self.stats = SegmenterStats()
        self._sink = sink
        self._next_index = start_index
        self._index = -1  # segment being written
        # The audio stream carried, and the PSI of a program with it and the video: one attribute,
        # set on one thread and read on another.
        self._carried: tuple[AudioInfo, dict[int, bytes]] | None = None
        # (pts90k, packet) in arrival order, which mux_audio keeps in pts order.
        self._audio: deque[tuple[int, av.Packet]] = deque(maxlen=audio_queue)
        self._last_audio_pts: int | None = None
        self._open: _OpenSegment | None = None

    def add_audio_stream(self, info: AudioInfo) -> None:
        """Carry an audio stream in every segment from the next one begun (any thread: the muxing
        thread reads it when it begins one); audio before that is dropped, counted."""
        if not self.drop_audio:
            self._carried = info, _program_tables(info)

    def mux_video(self, packet: av.Packet) -> None:
        """Mux an encoded video packet (pts = dts on the 90 kHz clock); a keyframe cuts."""
        dts = packet.dts
        assert dts is not None, "encoded video packets carry timestamps"
        # Audio that plays before this frame goes ahead of it, and before a cut into the
        # segment it belongs to.
        self._release_audio(before=dts)
        if packet.is_keyframe:
            data = bytes(packet)
            sps = sps_in(data)
            if sps is not None:  # the stream's size, for the segment's stream (it may change)
                self.width, self.height = sps.width, sps.height
            if self.frame_rate is not None:
                packet = _retimed(packet, data, self.frame_rate)
            self._end_segment()
            self._begin_segment()
            self._release_audio(before=dts)  # what waited for the first segment with audio
        if self._open is None:
            self.stats.video_dropped += 1
            return
        self._open.video.mux(packet)
        self.stats.video_packets += 1

    def mux_audio(self, packet: av.Packet, pts90k: int) -> None:
        """Carry an audio packet at `pts90k` on the output clock (the caller maps it there).

        It is held until video passes its timestamp, so the two interleave by time.
        """
        if self._carried is None:
            if not self.drop_audio:
                raise RuntimeError("mux_audio before add_audio_stream")
            self.stats.audio_dropped += 1
            return
        if self._last_audio_pts is not None and pts90k <= self._last_audio_pts:
            pts90k = self._last_audio_pts + 1
            self.stats.audio_pts_fixed += 1
        self._last_audio_pts = pts90k
        if packet.duration and packet.time_base:
            packet.duration = round(packet.duration * packet.time_base / CLOCK)
        packet.pts = packet.dts = pts90k
        packet.time_base = CLOCK
        if len(self._audio) == self._audio.maxlen:
            self.stats.audio_dropped += 1  # the deque lets the oldest go
        self._audio.append((pts90k, packet))

    def close(self) -> None:
        """Mux the audio still held and end the last segment."""
        self._release_audio(before=None)
        self._end_segment()

    def abort(self) -> None:
        """Give up the segment in progress after a failure: nothing more reaches the sink, and
        it gets no end() (its owner decides what a cut-short segment means)."""
        self._audio.clear()
        if self._open is not None:
            muxers, self._open = self._open.muxers, None
            for muxer in muxers:
                muxer.writer.discard = True
                # Closing writes the trailer, which the discarding writer swallows; after a failed
                # write the muxer's output is in error and the trailer fails: nothing is lost.
                with contextlib.suppress(av.FFmpegError):
                    muxer.container.close()

    # -- internals --------------------------------------------------------------------------

    def _release_audio(self, before: int | None) -> None:
        if (
            before is not None
            and self._open is not None
            and self._open.audio is None
            and self._carried is not None
        ):
            return  # the stream came after this segment began: it joins at the next, begun at once
        audio = self._audio
        while audio and (before is None or audio[0][0] < before):
            _, packet = audio.popleft()
            if self._open is None or self._open.audio is None:
                self.stats.audio_dropped += 1  # before the first keyframe: no segment yet
                continue
            self._open.audio.mux(packet)
            self.stats.audio_packets += 1

    def _begin_segment(self) -> None:
        self._index = self._next_index
        self._next_index += 1
        self.stats.segments += 1
        self._sink.begin(self._index)
        carried = self._carried
        tables = carried[1] if carried is not None else None
        # The video PES carry their length (see the module's docstring).
        video = _Muxer.open(_TsWriter(self._sink, self.stats, tables), {"omit_video_pes_length": "0"})
        video.stream = video.container.add_mux_stream("h264", width=self.width, height=self.height)
        video.stream.time_base = CLOCK
        video.container.start_encoding()
        audio = None
        if carried is not None:
            # Each audio packet in a PES of its own, written as it comes: FFmpeg would gather small
            # ones (AAC frames, Opus packets) into PES of 2930 bytes, up to 0.4 s behind the video.
            options = {"mpegts_start_pid": str(AUDIO_PID), "pes_payload_size": "0"}
            audio = _Muxer.open(_TsWriter(self._sink, self.stats, {}), options)
            audio.stream = carried[0].add_to(audio.container)
            audio.container.start_encoding()
        self._open = _OpenSegment(video, audio)

    def _end_segment(self) -> None:
        if self._open is None:
            return
        muxers, self._open = self._open.muxers, None
        # Closing writes out what a muxer still holds (the audio muxer buffers a PES's frames).
        for muxer in muxers:
            muxer.container.close()
        self._sink.end(self._index)


def _retimed(packet: av.Packet, data: bytes, rate: Fraction) -> av.Packet:
    retimed = with_frame_rate(data, rate)
    if retimed is data:
        return packet
    copy = av.Packet(retimed)
    copy.pts, copy.dts, copy.time_base, copy.is_keyframe = packet.pts, packet.dts, packet.time_base, True
    return copy


def _program_tables(info: AudioInfo) -> dict[int, bytes]:
    """The PSI packets (PAT, PMT, SDT) of one program with an H.264 stream and this audio
    stream on AUDIO_PID, by PID: what a muxer with both writes before its first packet."""
    data = io.BytesIO()
    with av.open(data, "w", format="mpegts", container_options=MUXER_OPTIONS) as container:
        video = container.add_mux_stream("h264", width=16, height=16)
        info.add_to(container)
        packet = av.Packet(b"\x00\x00\x00\x01\x09\xf0")  # an access unit delimiter
        packet.stream, packet.pts, packet.dts, packet.time_base = video, 0, 0, CLOCK
        container.mux(packet)
    tables: dict[int, bytes] = {}
    written = data.getvalue()
    for offset in range(0, len(written), TS_PACKET):
        pid = _pid(written, offset)
        if not _is_table(pid):
            break  # the first stream packet: the tables come before it
        tables.setdefault(pid, written[offset : offset + TS_PACKET])
    return tables


def _pid(data: bytes, offset: int) -> int:
    return (data[offset + 1] & 0x1F) << 8 | data[offset + 2]


def _is_table(pid: int) -> bool:
    """PSI and SI are on the PIDs below 0x20, and on the PMT's."""
    return pid < 0x20 or pid == PMT_PID


class _TsWriter:
    """The file object a muxer writes to: its TS packets go straight on to the sink, but for its
    PSI when `tables` is given: a PSI packet is replaced by the one of `tables` on its PID
    (continuity counted on), or left out when `tables` has none."""

    def __init__(self, sink: SegmentSink, stats: SegmenterStats, tables: dict[int, bytes] | None) -> None:
        self.discard = False
        self._sink = sink
        self._stats = stats
        self._tables = tables
        self._continuity: dict[int, int] = {}  # per PID of `tables`: the next counter

    def write(self, data: bytes) -> int:
        if not self.discard:
            out = data if self._tables is None else self._swap_tables(data)
            if out:
                self._sink.write(out)
                self._stats.bytes += len(out)
        return len(data)

    def _swap_tables(self, data: bytes) -> bytes:
        # Writes are whole TS packets: the muxer writes them whole into a buffer of whole ones
        # (WRITE_BUFFER) and flushes it at the end of every packet muxed.
        pieces: list[bytes] = []
        kept = 0  # data up to here is in `pieces` or left out
        for offset in range(0, len(data) - TS_PACKET + 1, TS_PACKET):
            pid = _pid(data, offset)
            if not _is_table(pid):
                continue
            pieces.append(data[kept:offset])
            kept = offset + TS_PACKET
            assert self._tables is not None
            table = self._tables.get(pid)
            if table is not None:
                counter = self._continuity.get(pid, 0)
                self._continuity[pid] = (counter + 1) & 0xF
                pieces.append(table[:3] + bytes([table[3] & 0xF0 | counter]) + table[4:])
        if not pieces:
            return data
        pieces.append(data[kept:])
        return b"".join(pieces)


class _Muxer:
    """One MPEG-TS muxer of one stream, writing through its _TsWriter."""

    def __init__(self, container: av.container.OutputContainer, writer: _TsWriter) -> None:
        self.container = container
        self.writer = writer
        self.stream: av.stream.Stream | None = None

    @classmethod
    def open(cls, writer: _TsWriter, options: dict[str, str]) -> _Muxer:
        container = av.open(
            writer, "w", format="mpegts", buffer_size=WRITE_BUFFER, container_options=MUXER_OPTIONS | options
        )
        return cls(container, writer)

    def mux(self, packet: av.Packet) -> None:
        packet.stream = self.stream
        self.container.mux(packet)


@dataclass(frozen=True)
class _OpenSegment:
    video: _Muxer
    audio: _Muxer | None

    @property
    def muxers(self) -> tuple[_Muxer, ...]:
        return (self.video,) if self.audio is None else (self.video, self.audio)
