"""Kernel names (comm) for the relay's threads, so that a CPU breakdown can tell them apart by
kind from /proc: named_threads() in the benchmark's process (an in-process relay), or for a whole
`serve` subprocess and its workers through bench/relayhook (bench.relays)."""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from relay_server.media.encoder import VideoEncoder

COMM_LENGTH = 15  # the kernel keeps this many bytes of a thread's name


def _set_comm(name: str) -> None:
    with contextlib.suppress(OSError):
        Path("/proc/thread-self/comm").write_text(name[:COMM_LENGTH])


def _comm() -> str:
    try:
        return Path("/proc/thread-self/comm").read_text().strip()
    except OSError:
        return ""


@contextlib.contextmanager
def named_threads() -> Iterator[None]:
    """For the breakdown only: every Python thread started meanwhile gets its name as its kernel
    name (comm), which the codec threads it starts inherit; and the x264 threads a VideoEncoder
    starts (both are opened on the event loop) are named "x264 send" (the link's, Baseline
    profile) or "x264 output". Nothing else changes."""

    def name_thread(*_: Any) -> None:
        sys.setprofile(None)  # once, at the thread's first call
        _set_comm(threading.current_thread().name)

    original = VideoEncoder.__init__

    def init(encoder: VideoEncoder, *args: Any, **kwargs: Any) -> None:
        previous = _comm()
        _set_comm("x264 send" if kwargs.get("profile") else "x264 output")
        try:
            original(encoder, *args, **kwargs)
        finally:
            _set_comm(previous)

    threading.setprofile(name_thread)
    VideoEncoder.__init__ = init  # type: ignore[assignment,method-assign]
    try:
        yield
    finally:
        VideoEncoder.__init__ = original  # type: ignore[method-assign]
        threading.setprofile(None)
