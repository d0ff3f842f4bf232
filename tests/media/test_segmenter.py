"""Segmenter: one self-contained MPEG-TS segment per GOP, streamed to the sink, audio carried along."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from fractions import Fraction
from functools import cache
from itertools import pairwise

import av
import numpy as np
import pytest

from bench.liveinput import ffmpeg_errors
from relay_server.media.encoder import CLOCK, VideoEncoder
from relay_server.media.segmenter import AudioInfo, Segmenter
from relay_server.media.testsource import PatternFrames
from tests.media.test_encoder import HEIGHT, KINDS, TICKS, WIDTH, timeline

AUDIO_RATE = 48_000


class RecordingSink:
    """A SegmentSink that keeps each segment's bytes and the order of the calls."""

    def __init__(self) -> None:
        self.segments: dict[int, bytearray] = {}
        self.events: list[tuple[str, int]] = []
        self._current: int | None = None

    def begin(self, index: int) -> None:
        assert self._current is None, "begin() inside a segment"
        self.events.append(("begin", index))
        self.segments[index] = bytearray()
        self._current = index

    def write(self, data: bytes) -> None:
        assert self._current is not None, "write() outside a segment"
        self.segments[self._current] += data

    def end(self, index: int) -> None:
        assert self._current == index
        self.events.append(("end", index))
        self._current = None

    def ended(self) -> list[bytes]:
        return [bytes(self.segments[index]) for kind, index in self.events if kind == "end"]


@cache
def _audio_clip(codec: str, seconds: float) -> bytes:
    """A tone encoded with PyAV and muxed into MPEG-TS, as the relay's input carries it."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mpegts") as container:
        stream = container.add_stream(codec, rate=AUDIO_RATE)
        stream.layout = "stereo"
        samples = np.arange(round(seconds * AUDIO_RATE)) / AUDIO_RATE
        tone = (0.2 * np.sin(2 * np.pi * 440 * samples)).astype(np.float32)
        for start in range(0, len(tone), 1024):
            chunk = tone[start : start + 1024]
            frame = av.AudioFrame.from_ndarray(np.stack([chunk, chunk]), format="fltp", layout="stereo")
            frame.sample_rate, frame.pts, frame.time_base = AUDIO_RATE, start, Fraction(1, AUDIO_RATE)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buffer.getvalue()


def audio_source(codec: str, seconds: float = 3.0) -> tuple[AudioInfo, list[tuple[av.Packet, int]]]:
    """An input audio stream as the demuxer hands it over: its info and (packet, pts90k) pairs."""
    with av.open(io.BytesIO(_audio_clip(codec, seconds)), format="mpegts") as container:
        stream = container.streams.audio[0]
        info = AudioInfo(stream)
        packets = [p for p in container.demux(stream) if p.size]
    return info, [(p, round(p.pts * p.time_base / CLOCK)) for p in packets]


@dataclass
class Run:
    sink: RecordingSink
    segmenter: Segmenter
    encoder: VideoEncoder
    video_pts: list[int]  # output timestamps given to the encoder
    audio_pts: list[int] = field(default_factory=list)  # output timestamps given to mux_audio


def run(
    stamps: list[int],
    *,
    audio: tuple[AudioInfo, list[tuple[av.Packet, int]]] | None = None,
    offset: int = 0,
    gop: float = 1.0,
    drop_audio: bool = False,
    audio_ahead: int = TICKS // 10,
) -> Run:
    """Encode frames at `stamps` + `offset` and segment them; audio moves onto the output clock
    by the same offset and arrives `audio_ahead` ahead of the video, as it does from the demuxer
    (the video goes through the processor)."""
    sink = RecordingSink()
    encoder = VideoEncoder(WIDTH, HEIGHT, gop=gop)
    segmenter = Segmenter(sink, WIDTH, HEIGHT, drop_audio=drop_audio)
    result = Run(sink, segmenter, encoder, [pts + offset for pts in stamps])
    pending = []
    if audio is not None:
        segmenter.add_audio_stream(audio[0])
        pending = list(audio[1])
    pattern = PatternFrames(WIDTH, HEIGHT)
    for index, pts in enumerate(stamps):
        while pending and pending[0][1] <= pts + audio_ahead:
            packet, audio_pts = pending.pop(0)
            result.audio_pts.append(audio_pts + offset)
            segmenter.mux_audio(packet, audio_pts + offset)
        for packet in encoder.encode(pattern.frame(index), pts + offset):
            segmenter.mux_video(packet)
    for packet in encoder.close():
        segmenter.mux_video(packet)
    segmenter.close()
    return result


@dataclass
class Decoded:
    video_pts: list[int]
    keyframes: list[bool]
    audio_pts: list[int]
    audio_streams: int
    audio_frames: int


def decode(data: bytes) -> Decoded:
    """Decode one segment on its own."""
    with av.open(io.BytesIO(data), format="mpegts") as container:
        frames = list(container.decode(video=0))
        audio_streams = len(container.streams.audio)
    audio_pts, audio_frames = [], 0
    if audio_streams:
        with av.open(io.BytesIO(data), format="mpegts") as container:
            for packet in container.demux(audio=0):
                if packet.size:
                    assert packet.pts is not None
                    audio_pts.append(packet.pts)
                audio_frames += len(packet.decode())
    return Decoded(
        [f.pts for f in frames], [f.key_frame for f in frames], audio_pts, audio_streams, audio_frames
    )


@pytest.mark.parametrize("kind", KINDS)
def test_one_self_contained_segment_per_gop(kind: str) -> None:
    stamps = timeline(kind)
    result = run(stamps)
    segments = result.sink.ended()
    decoded = [decode(data) for data in segments]  # each segment on its own

    assert all(d.keyframes[0] for d in decoded)
    out = [pts for d in decoded for pts in d.video_pts]
    assert len(out) == len(stamps)  # frames in = frames out
    assert all(b > a for a, b in pairwise(out))  # monotonic across segments
    assert out == [p.pts for p in _reencode(stamps)]
    # Segment k starts at the first frame at or past the start of segment k-1 plus the GOP: at
    # least a GOP apart, and less than a GOP plus the longest gap between frames.
    starts = [d.video_pts[0] for d in decoded]
    longest_gap = max(b - a for a, b in pairwise(out))
    assert all(TICKS <= b - a < TICKS + longest_gap for a, b in pairwise(starts))
    assert result.segmenter.stats.segments == len(segments) == result.encoder.stats.keyframes
    assert result.segmenter.stats.bytes == sum(map(len, segments))
    # And the segments played back to back are one stream.
    with av.open(io.BytesIO(b"".join(segments)), format="mpegts") as container:
        assert [f.pts for f in container.decode(video=0)] == out


def _reencode(stamps: list[int]) -> list[av.Packet]:
    encoder = VideoEncoder(WIDTH, HEIGHT, gop=1.0)
    pattern = PatternFrames(WIDTH, HEIGHT)
    packets = [p for i, pts in enumerate(stamps) for p in encoder.encode(pattern.frame(i), pts)]
    return packets + encoder.close()


def test_bytes_reach_the_sink_as_each_packet_is_muxed() -> None:
    sink = RecordingSink()
    segmenter = Segmenter(sink, WIDTH, HEIGHT)
    packets = _reencode(timeline("30fps", seconds=1.5))
    idr, *rest = packets
    segmenter.mux_video(idr)
    # The keyframe is in the sink before the next frame is even encoded.
    assert sink.events == [("begin", 0)]
    assert len(sink.segments[0]) >= idr.size
    sizes = []
    for packet in rest:
        if packet.is_keyframe:
            assert sink.events == [("begin", 0)]  # segment 0 ends only when segment 1 begins
        segmenter.mux_video(packet)
        sizes.append(len(sink.segments[0]))
    assert sink.events == [("begin", 0), ("end", 0), ("begin", 1)]
    # Segment 0 grew with every one of its packets, not once at its end.
    assert len(set(sizes[:29])) == 29


@pytest.mark.parametrize("codec", ["aac", "libopus"])
def test_with_audio_each_video_packet_is_out_as_it_is_muxed(codec: str) -> None:
    """Audio from a live input comes behind the video (muxers write it up to 0.7 s late, in PES
    of several frames), so nothing with a later timestamp follows a video packet soon: one
    muxer interleaving both would hold each until the next. Its bytes are out at once."""
    info, audio = audio_source(codec, seconds=1.0)
    sink = RecordingSink()
    segmenter = Segmenter(sink, WIDTH, HEIGHT)
    segmenter.add_audio_stream(info)
    written = []
    for packet in _reencode(timeline("30fps", seconds=1.0)):
        while audio and audio[0][1] < packet.dts - TICKS // 3:
            segmenter.mux_audio(*audio.pop(0))
        before = sum(len(data) for data in sink.segments.values())
        segmenter.mux_video(packet)
        written.append(sum(len(data) for data in sink.segments.values()) - before >= packet.size)
    assert all(written), written


@pytest.mark.parametrize("codec", ["aac", "libopus"])
def test_audio_is_carried_in_sync(codec: str) -> None:
    info, audio = audio_source(codec)
    # Video stamped on arrival: the output clock runs 0.25 s ahead of the input's; the caller
    # maps audio by the same offset.
    result = run(timeline("30fps"), audio=(info, audio), offset=22_500, audio_ahead=TICKS * 3)
    decoded = [decode(data) for data in result.sink.ended()]

    assert all(d.audio_streams == 1 for d in decoded)
    out = [pts for d in decoded for pts in d.audio_pts]
    assert out == result.audio_pts  # every packet, at the timestamp it was given
    assert result.segmenter.stats.audio_packets == len(audio)
    assert sum(d.audio_frames for d in decoded) == len(audio)  # and each one decodes
    # Audio sits with its video: in the segment whose frames it plays under, so it is never
    # further than a frame from the video next to it (the last segment also takes the tail
    # that outlasts the video).
    starts = [d.video_pts[0] for d in decoded] + [2**33]
    for d, start, end in zip(decoded, starts, starts[1:], strict=False):
        assert all(start <= pts < end for pts in d.audio_pts)
    # Two muxers, one program: each segment holds one PAT and PMT naming both streams, whose
    # continuity counters run on without a gap on every PID; readers find nothing to say.
    for data in result.sink.ended():
        assert continuity_gaps(data) == 0
    assert ffmpeg_errors(b"".join(result.sink.ended())) == ""


def continuity_gaps(data: bytes) -> int:
    """TS packets with payload whose continuity_counter is not the one before it on its PID + 1."""
    last: dict[int, int] = {}
    gaps = 0
    for offset in range(0, len(data), 188):
        pid = (data[offset + 1] & 0x1F) << 8 | data[offset + 2]
        if not data[offset + 3] & 0x10:
            continue  # no payload: the counter does not move
        counter = data[offset + 3] & 0xF
        if pid in last and counter != (last[pid] + 1) & 0xF:
            gaps += 1
        last[pid] = counter
    return gaps


def test_drop_audio_gives_no_audio_stream() -> None:
    info, audio = audio_source("aac", seconds=1.0)
    result = run(timeline("30fps", seconds=1.0), audio=(info, audio), drop_audio=True)
    (segment,) = result.sink.ended()
    assert decode(segment).audio_streams == 0
    assert result.segmenter.stats.audio_dropped == len(audio)
    assert result.segmenter.stats.audio_packets == 0


def test_audio_before_the_first_keyframe_and_beyond_the_queue_is_dropped() -> None:
    info, audio = audio_source("aac", seconds=1.0)
    sink = RecordingSink()
    segmenter = Segmenter(sink, WIDTH, HEIGHT, audio_queue=8)
    segmenter.add_audio_stream(info)
    for packet, pts in audio[:12]:  # video stalled: 8 are held, the 4 oldest go
        segmenter.mux_audio(packet, pts)
    assert segmenter.stats.audio_dropped == 4
    packets = _reencode([audio[5][1] + 1, audio[11][1] + 1])
    segmenter.mux_video(packets[0])  # the stream starts here: audio 4 and 5 came before it
    assert segmenter.stats.audio_dropped == 6
    segmenter.mux_video(packets[1])
    segmenter.close()
    assert segmenter.stats.audio_packets == 6
    assert decode(sink.ended()[0]).audio_pts == [pts for _, pts in audio[6:12]]


def test_audio_timestamps_stay_monotonic() -> None:
    info, audio = audio_source("libopus", seconds=1.0)
    sink = RecordingSink()
    segmenter = Segmenter(sink, WIDTH, HEIGHT)
    segmenter.add_audio_stream(info)
    segmenter.mux_video(_reencode([0])[0])
    (first, _), (second, _) = audio[:2]
    segmenter.mux_audio(first, 900)
    segmenter.mux_audio(second, 900)  # the same timestamp twice: moved on by a tick
    segmenter.close()
    assert segmenter.stats.audio_pts_fixed == 1
    assert decode(sink.ended()[0]).audio_pts == [900, 901]


def test_audio_stream_comes_first() -> None:
    _, audio = audio_source("aac", seconds=1.0)
    segmenter = Segmenter(RecordingSink(), WIDTH, HEIGHT)
    with pytest.raises(RuntimeError, match="add_audio_stream"):
        segmenter.mux_audio(*audio[0])


def test_an_audio_stream_added_late_joins_at_the_next_segment() -> None:
    """A live input's audio may come after its video began: the segment in progress goes on
    without it, the next one carries it (its owner asks for a keyframe at once), and the audio
    that came in between waits for it, in order, rather than going into a segment without it."""
    info, audio = audio_source("aac", seconds=2.0)
    sink = RecordingSink()
    segmenter = Segmenter(sink, WIDTH, HEIGHT)
    video = _reencode(timeline("30fps", seconds=2.0))  # an IDR every second
    segmenter.mux_video(video[0])
    segmenter.add_audio_stream(info)
    joined = next(pts for _, pts in audio if pts >= video[0].dts)
    for packet in video[1:]:
        while audio and audio[0][1] < packet.dts:
            segmenter.mux_audio(*audio.pop(0))
        segmenter.mux_video(packet)
    segmenter.close()
    first, second = (decode(data) for data in sink.ended())
    assert (first.audio_streams, second.audio_streams) == (0, 1)
    assert second.audio_pts[0] == joined and second.audio_pts == sorted(second.audio_pts)
    assert segmenter.stats.audio_dropped == 0
    assert segmenter.stats.audio_packets == len(second.audio_pts)


def test_abort_stops_output_without_ending_the_segment() -> None:
    sink = RecordingSink()
    segmenter = Segmenter(sink, WIDTH, HEIGHT)
    packets = _reencode(timeline("30fps", seconds=0.2))
    for packet in packets:
        segmenter.mux_video(packet)
    written = len(sink.segments[0])
    segmenter.abort()
    assert sink.events == [("begin", 0)]
    assert len(sink.segments[0]) == written
