"""Copy a decoded frame's pixels into a pooled frame: the compiled build (Cython, pure-Python mode).

Same behaviour as _planes_py.py, the plain reference (see it for what is copied). What compiling
buys: plain memcpy with the GIL released once per frame, and no numpy views to build.
"""

import cython
from cython.cimports.libc.stdint import uintptr_t
from cython.cimports.libc.string import memcpy
from cython.cimports.relay_server._fast.planes import MAX_PLANES, Plane

from ._planes_py import check_line_sizes, check_same_geometry, copy_timing


@cython.cfunc
@cython.nogil
@cython.exceptval(check=False)
def _copy_planes(planes: cython.pointer(Plane), count: cython.int) -> cython.void:
    i: cython.int
    row: cython.Py_ssize_t
    for i in range(count):
        plane = planes[i]
        if plane.dst_line == plane.src_line:
            memcpy(plane.dst, plane.src, plane.src_line * plane.rows)
        else:
            width: cython.Py_ssize_t = min(plane.dst_line, plane.src_line)
            for row in range(plane.rows):
                memcpy(plane.dst + row * plane.dst_line, plane.src + row * plane.src_line, width)


def copy_frame(src: object, dst: object) -> None:
    """Copy the pixels, pts and time_base of `src` into `dst`, whose buffers must not be shared."""
    check_same_geometry(src, dst)
    planes = cython.declare(Plane[MAX_PLANES])
    count: cython.int = 0
    for src_plane, dst_plane in zip(src.planes, dst.planes, strict=True):
        check_line_sizes(src_plane.line_size, dst_plane.line_size)
        if count == MAX_PLANES:
            raise ValueError(f"{src.format.name} has more than {MAX_PLANES} planes")
        planes[count].src = cython.cast(cython.p_uchar, cython.cast(uintptr_t, src_plane.buffer_ptr))
        planes[count].dst = cython.cast(cython.p_uchar, cython.cast(uintptr_t, dst_plane.buffer_ptr))
        planes[count].src_line = src_plane.line_size
        planes[count].dst_line = dst_plane.line_size
        planes[count].rows = src_plane.height
        count += 1
    with cython.nogil:
        _copy_planes(planes, count)
    copy_timing(src, dst)
