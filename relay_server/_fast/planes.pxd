cdef enum:
    MAX_PLANES = 4  # the most any pixel format has

cdef struct Plane:
    unsigned char *dst
    const unsigned char *src
    Py_ssize_t dst_line
    Py_ssize_t src_line
    Py_ssize_t rows

cdef void _copy_planes(Plane *planes, int count) noexcept nogil
