"""What the embedded trickle server may be made to hold, and the byte account that enforces it.

Every limit has a `trickle-relay trickle-server` flag and a TRICKLE_* variable (settings.py). The
defaults fit a 2-core box with 24 GiB running the relay's demo, tests and benchmarks: video segments
of a few MB, a handful of channels and connections per session, several sessions at once.
"""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1024 * 1024


class SegmentTooLarge(Exception):
    """A segment's body went past `max_segment_bytes`."""


class BuffersFull(Exception):
    """The server's segments together would hold more than `max_buffered_bytes`."""


@dataclass(frozen=True)
class TrickleLimits:
    # A segment is one GOP; 1080p at 20 Mbit/s with a 4 s GOP is 10 MB.
    max_segment_bytes: int = 64 * MiB
    # Bytes held by every segment of every channel, including evicted ones slow readers still read.
    max_buffered_bytes: int = 1024 * MiB
    max_channels: int = 1024
    # Open HTTP connections (each long-poll and preconnect holds one); more are answered 429.
    max_connections: int = 512
    # Seconds a connection has to send a complete request head, from when it connects or from the
    # end of its previous request (so also the idle time of a kept-alive connection).
    header_timeout: float = 30.0
    # Seconds a POST may wait for its first body byte (a preconnect waits a segment's length).
    first_byte_timeout: float = 60.0

    def __post_init__(self) -> None:
        for name in ("max_segment_bytes", "max_buffered_bytes", "max_channels", "max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("header_timeout", "first_byte_timeout"):
            if not 0 < getattr(self, name) < float("inf"):  # also rejects NaN
                raise ValueError(
                    f"{name} must be a finite number of seconds above 0, got {getattr(self, name)}"
                )


class BufferBudget:
    """The segment bytes the server holds, against `limit`. Segments take bytes as they are written
    and give them back when nothing can read them any more."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    @property
    def exhausted(self) -> bool:
        return self.used >= self.limit

    def take(self, size: int) -> None:
        if self.used + size > self.limit:
            raise BuffersFull(f"{self.used} of {self.limit} buffered bytes in use, {size} more asked")
        self.used += size

    def give_back(self, size: int) -> None:
        self.used -= size
