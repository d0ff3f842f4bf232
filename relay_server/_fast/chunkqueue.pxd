from cpython.pythread cimport PyThread_type_lock


cdef class ChunkQueue:
    cdef object _chunks
    cdef Py_ssize_t _head
    cdef Py_ssize_t _low_water
    cdef bint _full
    cdef object _on_writable
    # Binary semaphore the reader sleeps on without the GIL: held = no wake-up pending.
    cdef PyThread_type_lock _wakeup
    cdef readonly Py_ssize_t capacity
    cdef readonly Py_ssize_t size
    cdef readonly long long bytes_in
    cdef readonly long long bytes_out
    cdef readonly bint closed
    cdef readonly bint aborted
    cdef readonly bint waiting

    cdef void _wake(self) noexcept
