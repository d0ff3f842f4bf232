"""Scaler: session size in yuv420p, aspect ratio kept by black bars or a centre crop."""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest
from av.video.frame import PictureType

from relay_server.media.scaler import ScaleMode, Scaler
from tests.media.clips import CLOCK, pattern, ramp_luma, read_index

TOLERANCE = 6  # luma levels lost to scaling and chroma-sited filtering


def source(width: int, height: int, index: int = 5, fmt: str = "yuv420p") -> av.VideoFrame:
    frame = pattern(width, height, index)
    if fmt != "yuv420p":
        frame = frame.reformat(format=fmt)
    frame.pts, frame.time_base = 123_456, CLOCK
    frame.pict_type = PictureType.I
    return frame


def planes(frame: av.VideoFrame) -> list[np.ndarray]:
    return [
        np.frombuffer(memoryview(plane), np.uint8).reshape(-1, plane.line_size)[: plane.height, : plane.width]
        for plane in frame.planes
    ]


def assert_converted(out: av.VideoFrame, width: int, height: int) -> None:
    assert (out.width, out.height, out.format.name) == (width, height, "yuv420p")
    assert (out.pts, out.time_base) == (123_456, CLOCK)
    assert out.pict_type == PictureType.NONE


@pytest.mark.parametrize(("width", "height"), [(1280, 720), (642, 362), (641, 361)])
def test_letterbox_adds_black_bars_above_and_below(width: int, height: int) -> None:
    out = Scaler(512, 512, ScaleMode.LETTERBOX)(source(width, height))
    assert_converted(out, 512, 512)
    luma, u, v = planes(out)
    content = 288  # 16:9 in 512 wide, rounded to even
    top = (512 - content) // 2
    for rows in (slice(0, top), slice(top + content, 512)):
        assert (luma[rows] == 16).all()
        chroma_rows = slice(rows.start // 2, rows.stop // 2)
        assert (u[chroma_rows] == 128).all() and (v[chroma_rows] == 128).all()
    assert read_index(out, top=top, height=content) == 5
    ramp_row = luma[top + content * 3 // 4]  # below the index code: the ramp, whole width
    for x in (4, 256, 507):
        assert abs(int(ramp_row[x]) - ramp_luma(x / 511)) < TOLERANCE


def test_letterbox_of_a_tall_frame_adds_bars_left_and_right() -> None:
    out = Scaler(512, 288, ScaleMode.LETTERBOX)(source(480, 640))
    assert_converted(out, 512, 288)
    luma, _, _ = planes(out)
    content = 216  # 480×640 fitted into 288 rows
    left = (512 - content) // 2
    assert (luma[:, :left] == 16).all() and (luma[:, left + content :] == 16).all()
    assert (luma[200, left + 2 : left + content - 2] > 16).all()


@pytest.mark.parametrize(("width", "height"), [(1280, 720), (642, 362), (641, 361)])
def test_crop_keeps_the_centre(width: int, height: int) -> None:
    out = Scaler(512, 512, ScaleMode.CROP)(source(width, height))
    assert_converted(out, 512, 512)
    luma, u, v = planes(out)
    # The centre height×height square of the input fills the output: no bars, and the ramp
    # runs over the middle of its range only.
    kept = (width - height) / 2 / width, (width + height) / 2 / width
    ramp_row = luma[400]
    assert abs(int(ramp_row[1]) - ramp_luma(kept[0])) < TOLERANCE
    assert abs(int(ramp_row[510]) - ramp_luma(kept[1])) < TOLERANCE
    assert abs(int(ramp_row[256]) - ramp_luma(0.5)) < TOLERANCE
    assert (u == 128).all() and (v == 128).all()


def test_same_size_yuv420p_passes_through() -> None:
    frame = source(512, 512)
    scaler = Scaler(512, 512)
    assert scaler(frame) is frame
    assert frame.pict_type == PictureType.NONE
    assert scaler.graphs_built == 0


@pytest.mark.parametrize("fmt", ["yuvj420p", "yuv444p", "nv12"])
def test_no_size_still_converts_to_yuv420p(fmt: str) -> None:
    scaler = Scaler()
    out = scaler(source(640, 360, fmt=fmt))
    assert_converted(out, 640, 360)
    assert read_index(out) == 5


def test_graph_is_rebuilt_only_when_the_input_changes() -> None:
    scaler = Scaler(512, 512, ScaleMode.LETTERBOX)
    sizes = [(1280, 720)] * 3 + [(640, 480)] * 2 + [(1280, 720)]
    # Every output is kept: frames from the graph's pool stay valid while referenced.
    outputs = [scaler(source(width, height, index)) for index, (width, height) in enumerate(sizes)]
    assert scaler.graphs_built == 3
    assert all((out.width, out.height) == (512, 512) for out in outputs)
    content = {1280: (112, 288), 640: (64, 384)}  # (top bar, content height) by input width
    indices = [read_index(out, *content[width]) for out, (width, _) in zip(outputs, sizes, strict=True)]
    assert indices == list(range(len(sizes)))


def test_frames_without_a_time_base_are_scaled() -> None:
    frame = pattern(1280, 720, 9)
    frame.pts = 7
    out = Scaler(512, 512)(frame)
    assert (out.width, out.height, out.pts) == (512, 512, 7)
    assert out.time_base == Fraction(1, 90_000)


@pytest.mark.parametrize(("width", "height"), [(511, 512), (512, 289), (0, 512), (-2, 2)])
def test_bad_sizes_are_rejected(width: int, height: int) -> None:
    with pytest.raises(ValueError):
        Scaler(width, height)
