"""Copy a decoded frame's pixels into a pooled frame: the plain-Python reference build (numpy views).

planes.py is the compiled build with the same behaviour. Each row copies min(src, dst line size)
bytes: every pixel byte plus some alignment padding, which is harmless (both lines are at least that
long) and lets equal line sizes copy a plane in one block.
"""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np


def check_same_geometry(src: av.VideoFrame, dst: av.VideoFrame) -> None:
    if (src.format.name, src.width, src.height) != (dst.format.name, dst.width, dst.height):
        raise ValueError(
            f"cannot copy a {src.format.name} {src.width}x{src.height} frame"
            f" into a {dst.format.name} {dst.width}x{dst.height} one"
        )


def check_line_sizes(src_line: int, dst_line: int) -> None:
    if src_line <= 0 or dst_line <= 0:
        raise ValueError("frames stored bottom-up (line size <= 0) are not supported")


def copy_frame(src: av.VideoFrame, dst: av.VideoFrame) -> None:
    """Copy the pixels, pts and time_base of `src` into `dst`, whose buffers must not be shared."""
    check_same_geometry(src, dst)
    for src_plane, dst_plane in zip(src.planes, dst.planes, strict=True):
        src_line, dst_line, rows = src_plane.line_size, dst_plane.line_size, src_plane.height
        check_line_sizes(src_line, dst_line)
        source = np.frombuffer(memoryview(src_plane), np.uint8)
        target = np.frombuffer(memoryview(dst_plane), np.uint8)
        if src_line == dst_line:
            np.copyto(target, source)
        else:
            width = min(src_line, dst_line)
            np.copyto(target.reshape(rows, dst_line)[:, :width], source.reshape(rows, src_line)[:, :width])
    copy_timing(src, dst)


def copy_timing(src: av.VideoFrame, dst: av.VideoFrame) -> None:
    dst.pts = src.pts
    time_base = src.time_base
    # PyAV reports an unset time base (0/1) as None but accepts only a fraction.
    dst.time_base = Fraction(0, 1) if time_base is None else time_base
