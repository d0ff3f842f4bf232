"""VideoEncoder: keyframes by media time, monotonic 90 kHz timestamps, bounded bitrate."""

from __future__ import annotations

import random
from itertools import pairwise

import av
import numpy as np
import pytest
from av.video.frame import PictureType

from relay_server.media.encoder import CLOCK, VideoEncoder
from relay_server.media.scaler import ScaleMode
from relay_server.media.testsource import PatternFrames

WIDTH, HEIGHT = 160, 96
TICKS = 90_000


def timeline(kind: str, seconds: float = 3.0) -> list[int]:
    """Frame timestamps on the 90 kHz clock as a processor might return them."""
    if kind.endswith("fps"):
        fps = int(kind.removesuffix("fps"))
        return [round(i * TICKS / fps) for i in range(int(seconds * fps))]
    rng = random.Random(kind)
    stamps, pts = [], 0
    while pts < seconds * TICKS:
        stamps.append(pts)
        if kind == "vfr":  # random gaps: 60 fps bursts to 150 ms stalls
            pts += rng.randrange(1_500, 13_500)
        elif kind == "repeats":  # a frame stamped twice now and then
            pts += 0 if rng.random() < 0.2 else 3_000
        elif kind == "rate-changes":  # 30 → 60 → 24 → 30 fps, switching mid-GOP
            second = pts / TICKS
            pts += 3_000 if second < 0.7 else 1_500 if second < 1.6 else 3_750 if second < 2.3 else 3_000
    return stamps


KINDS = ["30fps", "25fps", "24fps", "60fps", "vfr", "repeats", "rate-changes"]


def encode(encoder: VideoEncoder, stamps: list[int]) -> list[av.Packet]:
    pattern = PatternFrames(encoder.width, encoder.height)
    packets = []
    for index, pts in enumerate(stamps):
        packets += encoder.encode(pattern.frame(index), pts)
    return packets + encoder.close()


@pytest.mark.parametrize("kind", KINDS)
def test_idr_on_first_frame_at_or_past_gop_and_pts_strictly_monotonic(kind: str) -> None:
    stamps = timeline(kind)
    encoder = VideoEncoder(WIDTH, HEIGHT, gop=1.0)
    packets = encode(encoder, stamps)

    assert len(packets) == len(stamps) == encoder.stats.frames
    out = [p.pts for p in packets]
    assert all(p.dts == p.pts for p in packets)  # no B-frames
    assert all(b > a for a, b in pairwise(out))
    # A stamp not after the previous output moves on by one tick; the others are kept as given.
    kept: list[int] = []
    for pts in stamps:
        kept.append(pts if not kept or pts > kept[-1] else kept[-1] + 1)
    assert out == kept
    assert encoder.stats.pts_fixed == sum(k != s for k, s in zip(kept, stamps, strict=True))

    # Expected IDRs: the first frame, then the first frame at or past the previous IDR + gop.
    expected, due = [], 0
    for pts in out:
        if pts >= due:
            expected.append(pts)
            due = pts + TICKS
    assert [p.pts for p in packets if p.is_keyframe] == expected
    assert encoder.stats.keyframes == len(expected)
    assert encoder.stats.bytes == sum(p.size for p in packets)
    assert encoder.stats.encode_seconds > 0


def test_input_picture_types_are_ignored() -> None:
    """Decoded frames keep I/P/B; an encoder given an "I" frame would make a keyframe of it."""
    encoder = VideoEncoder(WIDTH, HEIGHT, gop=1.0)
    pattern = PatternFrames(WIDTH, HEIGHT)
    packets = []
    for index in range(45):
        frame = pattern.frame(index)
        frame.pict_type = PictureType.I
        packets += encoder.encode(frame, index * 3_000)
    packets += encoder.close()
    assert [p.pts for p in packets if p.is_keyframe] == [0, 90_000]


def test_keyframes_are_idrs_that_decode_alone() -> None:
    encoder = VideoEncoder(WIDTH, HEIGHT, gop=0.5)
    packets = encode(encoder, timeline("30fps", seconds=1.0))
    second_gop = packets[[p.pts for p in packets].index(45_000) :]
    decoder = av.CodecContext.create("h264", "r")
    frames = [f for p in second_gop for f in decoder.decode(p)] + decoder.decode(None)
    assert len(frames) == len(second_gop)
    assert frames[0].key_frame


@pytest.mark.parametrize("mode", list(ScaleMode), ids=lambda mode: mode.value)
def test_other_sizes_and_formats_are_fitted_by_the_scale_mode(mode: ScaleMode) -> None:
    """A frame of another shape (one the processor made before a resize reached it) keeps its
    proportions: letterboxed or cropped as the session's input is, never stretched."""
    encoder = VideoEncoder(WIDTH, HEIGHT, mode=mode)
    square = av.VideoFrame.from_ndarray(np.full((48, 48, 3), 255, np.uint8), format="rgb24")
    packets = encoder.encode(square, 0) + encoder.close()
    assert encoder.stats.reformatted == 1
    decoder = av.CodecContext.create("h264", "r")
    (frame,) = [f for p in packets for f in decoder.decode(p)]
    assert (frame.width, frame.height, frame.format.name) == (WIDTH, HEIGHT, "yuv420p")
    luma = frame.to_ndarray()[:HEIGHT]
    sides, centre = luma[:, :16].mean(), luma[:, 64:96].mean()
    assert centre > 200
    assert sides < 40 if mode is ScaleMode.LETTERBOX else sides > 200


def test_bitrate_is_capped_on_noise() -> None:
    """The VBV holds a stretch of noise to about the target rate (plain ABR: twice as much here)."""
    bitrate, seconds, fps = 500_000, 2, 30
    encoder = VideoEncoder(256, 256, bitrate=bitrate, fps=fps)
    rng = np.random.default_rng(1)
    total = 0
    for index in range(seconds * fps):
        noise = rng.integers(0, 256, (256 * 3 // 2, 256), np.uint8)
        frame = av.VideoFrame.from_ndarray(noise, format="yuv420p")
        total += sum(p.size for p in encoder.encode(frame, round(index * TICKS / fps)))
    # At most the rate over the span plus one full VBV buffer (a second at the rate).
    assert total <= bitrate * (seconds + 1) / 8
    assert total > bitrate * seconds / 8 / 2  # and noise does get the bits


def test_refuses_negative_timestamps_and_frames_after_close() -> None:
    encoder = VideoEncoder(WIDTH, HEIGHT)
    with pytest.raises(ValueError, match="start at 0"):
        encoder.encode(PatternFrames(WIDTH, HEIGHT).frame(0), -1)
    encode(encoder, timeline("30fps", seconds=0.2))
    assert encoder.close() == []
    with pytest.raises(RuntimeError, match="closed"):
        encoder.encode(PatternFrames(WIDTH, HEIGHT).frame(0), 90_000)


def test_packets_are_on_the_90khz_clock() -> None:
    encoder = VideoEncoder(WIDTH, HEIGHT)
    packets = encode(encoder, timeline("25fps", seconds=0.2))
    assert {p.time_base for p in packets} == {CLOCK}
    assert [p.pts for p in packets] == [i * 3_600 for i in range(5)]
