"""Test clips made with PyAV: H.264 (+ AAC or Opus) in MPEG-TS, cut into trickle-style segments.

Every segment is muxed on its own, starting with PAT/PMT as segments on a trickle channel do, and
timestamps run on across segments on the 90 kHz clock. Each frame shows its index as a binary code
of black and white stripes across the top quarter (read_index reads it back after lossy coding);
the rest is a horizontal luma ramp, so tests can tell which part of a frame a scaler kept.
"""

from __future__ import annotations

import io
import math
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from dataclasses import dataclass
from fractions import Fraction
from functools import cache
from typing import Literal

import av
import numpy as np

from relay_server.trickle.publisher import Publisher, SegmentWriter

CHUNK = 64 * 1024  # what a trickle subscriber hands out per read
CLOCK = Fraction(1, 90_000)
# First video pts: B-frames give the first packets dts below pts, and MPEG-TS has no negative
# timestamps (the muxer would shift each segment on its own and break continuity).
START = 90_000
AUDIO_RATE = 48_000
INDEX_BITS = 10  # up to 1024 frames
CODE_ROWS = 4  # the code fills the top 1/CODE_ROWS of the frame
RAMP_LOW, RAMP_HIGH = 40, 220  # luma of the ramp at the left and right edges


@dataclass(frozen=True)
class ClipSpec:
    width: int = 512
    height: int = 512
    fps: int = 30
    frames: int = 30
    gop: int = 15  # frames from one keyframe to the next
    b_frames: int = 0  # libx264 `bf`
    variable_fps: bool = False  # frame durations vary between 0.5 and 1.5 times 1/fps
    audio: Literal["aac", "opus"] | None = None
    cut: Literal["keyframe", "mid_gop"] = "keyframe"  # where segments start


@dataclass(frozen=True)
class Clip:
    spec: ClipSpec
    segments: tuple[bytes, ...]
    video_pts: tuple[int, ...]  # pts of frame i (90 kHz), by frame index
    audio_packets: int

    @property
    def data(self) -> bytes:
        return b"".join(self.segments)


def pattern(width: int, height: int, index: int, detail: bool = False) -> av.VideoFrame:
    """Frame `index` of a clip: its index in stripes over a luma ramp, neutral chroma.

    `detail` adds moving noise to the ramp, so that clips have a live stream's bitrate (1-3 Mbit/s).
    """
    ramp = np.linspace(RAMP_LOW, RAMP_HIGH, width).round().astype(np.uint8)
    luma = np.broadcast_to(ramp, (height, width)).copy()
    if detail:
        dy, dx = (index * 7) % height, (index * 13) % width
        luma += _noise(width, height)[dy : dy + height, dx : dx + width]
    bits = [(index >> bit) & 1 for bit in range(INDEX_BITS)]
    edges = np.linspace(0, width, INDEX_BITS + 1).round().astype(int)
    for bit, left, right in zip(bits, edges, edges[1:], strict=False):
        luma[: height // CODE_ROWS, left:right] = 235 if bit else 16
    chroma = np.full(((height + 1) // 2, (width + 1) // 2), 128, np.uint8)
    frame = av.VideoFrame(width, height, "yuv420p")
    for plane, pixels in zip(frame.planes, (luma, chroma, chroma), strict=True):
        view = np.frombuffer(memoryview(plane), np.uint8).reshape(-1, plane.line_size)
        view[: pixels.shape[0], : pixels.shape[1]] = pixels
    return frame


@cache
def _noise(width: int, height: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 10, (2 * height, 2 * width), np.uint8)


def read_index(frame: av.VideoFrame, top: int = 0, height: int | None = None) -> int:
    """The index pattern() drew, read from rows top..top+height of a (possibly scaled) frame."""
    height = frame.height - top if height is None else height
    plane = frame.planes[0]
    luma = np.frombuffer(memoryview(plane), np.uint8).reshape(-1, plane.line_size)
    row = luma[top + height // (2 * CODE_ROWS), : frame.width]
    centres = ((np.arange(INDEX_BITS) + 0.5) * frame.width / INDEX_BITS).astype(int)
    return sum(1 << bit for bit, x in enumerate(centres) if row[x] > 128)


def ramp_luma(fraction: float) -> float:
    """The ramp's luma at `fraction` of the width from the left."""
    return RAMP_LOW + (RAMP_HIGH - RAMP_LOW) * fraction


@cache
def make_clip(spec: ClipSpec) -> Clip:
    """Encode and segment a clip (cached: clips are immutable and tests share them)."""
    master = av.open(io.BytesIO(), "w", format="mpegts")
    video = master.add_stream(
        "libx264",
        rate=spec.fps,
        options={"preset": "ultrafast", "bf": str(spec.b_frames), "sc_threshold": "0", "threads": "1"},
    )
    video.width, video.height, video.pix_fmt = spec.width, spec.height, "yuv420p"
    video.time_base = CLOCK
    video.codec_context.time_base = CLOCK
    video.codec_context.gop_size = spec.gop
    audio = None
    if spec.audio is not None:
        audio = master.add_stream("aac" if spec.audio == "aac" else "libopus", rate=AUDIO_RATE)
        audio.layout = "stereo"
        audio.format = "fltp" if spec.audio == "aac" else "flt"
    # Opens the encoders, so the templates below carry their extradata (AAC config, OpusHead).
    master.start_encoding()

    video_pts = _video_timeline(spec)
    packets: list[av.Packet] = []
    for index, pts in enumerate(video_pts):
        frame = pattern(spec.width, spec.height, index, detail=True)
        frame.pts, frame.time_base = pts, CLOCK
        packets += video.encode(frame)
    packets += video.encode(None)
    audio_packets = 0
    if audio is not None:
        end = Fraction(video_pts[-1] - START, 90_000) + Fraction(1, spec.fps)
        encoded = _encode_audio(audio, end)
        audio_packets = len(encoded)
        packets += encoded
    # Interleave as a live muxer would: by decode time, video first on ties.
    packets.sort(key=lambda p: (_decode_time(p), p.stream is not video))
    segments = _cut(spec, packets, [s for s in (video, audio) if s is not None])
    master.close()
    return Clip(spec, tuple(segments), tuple(video_pts), audio_packets)


def _decode_time(packet: av.Packet) -> Fraction:
    assert packet.dts is not None and packet.time_base is not None
    return packet.dts * packet.time_base


def _video_timeline(spec: ClipSpec) -> list[int]:
    step = 90_000 // spec.fps
    if not spec.variable_fps:
        return [START + index * step for index in range(spec.frames)]
    rng = np.random.default_rng(spec.frames)
    steps = rng.integers(step // 2, step * 3 // 2, spec.frames)
    return [START + int(offset) for offset in np.concatenate(([0], np.cumsum(steps[:-1])))]


def _encode_audio(stream: av.AudioStream, seconds: Fraction) -> list[av.Packet]:
    """A 440 Hz tone of `seconds`, starting with the video."""
    context = stream.codec_context
    samples = context.frame_size or 1024
    packets: list[av.Packet] = []
    count = math.ceil(seconds * AUDIO_RATE / samples)
    for index in range(count):
        t = (index * samples + np.arange(samples)) / AUDIO_RATE
        tone = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
        pcm = np.stack([tone, tone]) if context.format.is_planar else np.repeat(tone, 2)[None, :]
        frame = av.AudioFrame.from_ndarray(pcm, format=context.format.name, layout="stereo")
        frame.sample_rate = AUDIO_RATE
        frame.pts = START * AUDIO_RATE // 90_000 + index * samples
        frame.time_base = Fraction(1, AUDIO_RATE)
        packets += stream.encode(frame)
    packets += stream.encode(None)
    return packets


def _cut(
    spec: ClipSpec, packets: list[av.Packet], streams: list[av.VideoStream | av.AudioStream]
) -> list[bytes]:
    video = streams[0]
    segments: list[bytes] = []
    current: list[av.Packet] = []
    decoded = 0  # video packets so far, in decode order
    for packet in packets:
        if packet.stream is video:
            if spec.cut == "keyframe":
                boundary = packet.is_keyframe and decoded > 0
            else:
                boundary = decoded % spec.gop == spec.gop // 2
            if boundary and current:
                segments.append(_mux(current, streams))
                current = []
            decoded += 1
        current.append(packet)
    segments.append(_mux(current, streams))
    return segments


def _mux(packets: list[av.Packet], templates: list[av.VideoStream | av.AudioStream]) -> bytes:
    """One self-contained MPEG-TS segment holding `packets`, with every stream in its PMT."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mpegts") as muxer:
        streams = [muxer.add_stream_from_template(template, opaque=True) for template in templates]
        for packet in packets:
            packet.stream = streams[packet.stream.index]
            muxer.mux(packet)
    return buffer.getvalue()


async def chunks(data: bytes, size: int = CHUNK) -> AsyncIterator[bytes]:
    for offset in range(0, len(data), size):
        yield data[offset : offset + size]


async def publish_segments(publisher: Publisher, first: SegmentWriter, segments: Iterable[bytes]) -> None:
    """Write `segments` live, chunk by chunk, starting with the already opened writer `first`."""
    writer = first
    for index, data in enumerate(segments):
        if index:
            writer = await publisher.segment()
        async for chunk in chunks(data):
            await writer.write(chunk)
        await writer.close()


async def memory_subscriber(
    segments: Iterable[bytes], size: int = CHUNK
) -> AsyncIterator[AsyncIterator[bytes]]:
    """What a trickle Subscriber yields (segments as chunks), from memory."""
    for data in segments:
        yield chunks(data, size)


async def take(
    subscriber: AsyncIterable[AsyncIterable[bytes]], count: int
) -> AsyncIterator[AsyncIterable[bytes]]:
    """The first `count` segments of a live channel: then the stream ends for whoever reads it."""
    seen = 0
    async for segment in subscriber:
        yield segment
        seen += 1
        if seen == count:
            return
