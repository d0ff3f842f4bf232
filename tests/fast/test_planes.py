"""copy_frame: pixels of a decoded frame into a pooled one, on both builds."""

from __future__ import annotations

import io
from collections.abc import Callable
from fractions import Fraction
from types import SimpleNamespace

import av
import numpy as np
import pytest

RNG = np.random.default_rng(7)
BYTES_PER_PIXEL = {"yuv420p": 1, "yuv444p": 1, "rgb24": 3}


def pixels(frame: av.VideoFrame) -> list[np.ndarray]:
    """Each plane's visible bytes, without the padding at the end of its lines."""
    size = BYTES_PER_PIXEL[frame.format.name]
    lines = [np.frombuffer(memoryview(plane), np.uint8).reshape(plane.height, -1) for plane in frame.planes]
    return [rows[:, : plane.width * size] for rows, plane in zip(lines, frame.planes, strict=True)]


def same_pixels(a: av.VideoFrame, b: av.VideoFrame) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(pixels(a), pixels(b), strict=True))


def fresh(width: int, height: int, fmt: str = "yuv420p") -> av.VideoFrame:
    """A frame allocated by PyAV, filled with noise (its line sizes are PyAV's own alignment)."""
    frame = av.VideoFrame(width, height, fmt)
    for plane in frame.planes:
        np.frombuffer(memoryview(plane), np.uint8)[:] = RNG.integers(0, 256, plane.buffer_size, np.uint8)
    return frame


def padded(width: int, height: int, line_size: int) -> av.VideoFrame:
    """A yuv420p frame over a numpy buffer with wider lines than PyAV would choose."""
    rows = RNG.integers(0, 256, (height * 3 // 2, line_size), np.uint8)
    return av.VideoFrame.from_numpy_buffer(rows, format="yuv420p", width=width)


def decoded(width: int, height: int) -> av.VideoFrame:
    """A frame as the decode thread gets it: the H.264 decoder pads lines its own way."""
    out = io.BytesIO()
    with av.open(out, "w", format="mpegts") as container:
        stream = container.add_stream("libx264", rate=30, options={"preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        source = fresh(width, height)
        source.pts = 0
        container.mux(stream.encode(source))
        container.mux(stream.encode())
    out.seek(0)
    with av.open(out, mode="r") as container:
        return next(container.decode(video=0))


CASES: dict[str, tuple[Callable[[], av.VideoFrame], Callable[[], av.VideoFrame], bool]] = {
    # name: (source, destination, whether their line sizes differ)
    "512x512": (lambda: fresh(512, 512), lambda: fresh(512, 512), False),
    "512x512-padded-source": (lambda: padded(512, 512, 640), lambda: fresh(512, 512), True),
    "512x512-padded-destination": (lambda: fresh(512, 512), lambda: padded(512, 512, 576), True),
    "642x362-decoded": (lambda: decoded(642, 362), lambda: fresh(642, 362), True),
    "641x361": (lambda: fresh(641, 361), lambda: fresh(641, 361), False),
    "642x362-rgb24": (lambda: fresh(642, 362, "rgb24"), lambda: fresh(642, 362, "rgb24"), False),
}


@pytest.mark.parametrize("case", CASES)
def test_copies_pixels_pts_and_time_base(impl: SimpleNamespace, case: str) -> None:
    make_source, make_destination, strides_differ = CASES[case]
    src, dst = make_source(), make_destination()
    src.pts, src.time_base = 1234, Fraction(1, 90_000)
    src_lines = [plane.line_size for plane in src.planes]
    dst_lines = [plane.line_size for plane in dst.planes]
    assert (src_lines != dst_lines) == strides_differ
    buffers = [plane.buffer_ptr for plane in dst.planes]
    impl.copy_frame(src, dst)
    assert same_pixels(dst, src)
    assert [plane.buffer_ptr for plane in dst.planes] == buffers  # copied in place
    assert (dst.pts, dst.time_base) == (1234, Fraction(1, 90_000))


def test_copies_an_unset_time_base(impl: SimpleNamespace) -> None:
    src, dst = fresh(64, 64), fresh(64, 64)
    dst.pts, dst.time_base = 5, Fraction(1, 90_000)
    impl.copy_frame(src, dst)
    assert (dst.pts, dst.time_base) == (None, None)


@pytest.mark.parametrize(
    "other",
    [(512, 510, "yuv420p"), (510, 512, "yuv420p"), (512, 512, "yuv444p"), (512, 512, "rgb24")],
    ids=str,
)
def test_rejects_a_different_geometry(impl: SimpleNamespace, other: tuple[int, int, str]) -> None:
    src, dst = fresh(512, 512), fresh(*other)
    before = [plane.copy() for plane in pixels(dst)]
    with pytest.raises(ValueError, match="cannot copy"):
        impl.copy_frame(src, dst)
    assert all(np.array_equal(x, y) for x, y in zip(pixels(dst), before, strict=True))
