cdef class FrameSlot:
    cdef object _factory
    cdef list _pool
    cdef object _pending
    cdef object _on_ready
    cdef readonly Py_ssize_t max_buffers
    cdef readonly Py_ssize_t buffers
    cdef readonly long long published
    cdef readonly long long taken
    cdef readonly long long dropped
