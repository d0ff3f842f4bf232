"""Environment settings shared by every layer, each with its documented meaning.

TRICKLE_CHUNK_SIZE   largest piece, in bytes, a subscriber hands out per read of a segment
                     (default 65536; at least 1024).
TRICKLE_BUFFER_SIZE  bytes a session buffers between the subscriber and the decoder before
                     the subscriber waits (default 4194304).
TRICKLE_TIMEOUT      seconds a trickle request may go without progress (connecting, waiting
                     for a segment to start, or mid-body) before it is re-issued (default 20).
TRICKLE_WORKERS      threads each of a session's codecs (the input decoder, the output encoder)
                     may use; slice threads, which add no latency (default 2).
"""

from __future__ import annotations

import os


def env_int(name: str, default: int, *, minimum: int = 1) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return value


def env_float(name: str, default: float, *, minimum: float = 0.0) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None
    if not value >= minimum:  # also rejects NaN
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return value


def chunk_size() -> int:
    return env_int("TRICKLE_CHUNK_SIZE", 64 * 1024, minimum=1024)


def buffer_size() -> int:
    return env_int("TRICKLE_BUFFER_SIZE", 4 * 1024 * 1024, minimum=64 * 1024)


def request_timeout() -> float:
    return env_float("TRICKLE_TIMEOUT", 20.0, minimum=0.1)


def workers() -> int:
    return env_int("TRICKLE_WORKERS", 2, minimum=1)
