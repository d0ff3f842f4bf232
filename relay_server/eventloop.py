"""The event loop every command runs on: uvloop's, unless RELAY_EVENT_LOOP=asyncio (or uvloop is
not installed, as on Windows).

Most of the relay's event-loop time is per-packet work: RTP in and out over UDP, SRTP, the
trickle HTTP legs. uvloop's libuv loop and sockets do it more cheaply than asyncio's selector
loop. Measured with bench.passthrough's per-frame windows (512×512 30 fps, one input, three
interleaved pairs of runs, medians): relay CPU per frame 5.97 → 4.84 ms transcoding and
1.56 → 1.25 ms in passthrough, about a fifth less either way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from relay_server import settings

_T = TypeVar("_T")


def run(main: Coroutine[Any, Any, _T]) -> _T:
    """asyncio.run(main) on the configured loop."""
    if settings.event_loop() == "uvloop":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            result: _T = uvloop.run(main)
            return result
    return asyncio.run(main)
