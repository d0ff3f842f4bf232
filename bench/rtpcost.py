"""What aiortc's per-packet RTP path costs the relay: thread CPU time spent inside its entry points.

    cost = RtpCost()
    cost.start()                  # wraps the entry points (class attributes)
    ...                           # run a window
    cost.stop()                   # and puts them back
    cost.by_part(), cost.calls    # seconds and calls, by part

Each entry point runs once per RTP packet (or per frame, for packetising) and never waits in
practice: its sends and receives go straight to the socket. So the thread CPU time between
entering and leaving it (time.thread_time_ns, the kernel's share included) is that packet's work.
The wrappers cost about half a microsecond each, counted in: an upper bound. The UDP sends are
told apart: they are the kernel's work (loopback delivery included), which no RTP stack avoids.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pylibsrtp
from aioice import ice
from aiortc import rtcdtlstransport
from aiortc.codecs import h264

KERNEL = "send: UDP send (the kernel)"
# (part, class, method); a part inside another (the UDP send inside the SRTP send) is taken out
# of it by `NESTED`.
ENTRY_POINTS: list[tuple[str, type, str]] = [
    ("receive: aioice's STUN check and queueing", ice.StunProtocol, "datagram_received"),
    ("receive: SRTP unprotect", pylibsrtp.Session, "unprotect"),
    (
        "receive: RTP parse, aiortc's receiver, jitter buffer, tap",
        rtcdtlstransport.RTCDtlsTransport,
        "_handle_rtp_data",
    ),
    ("send: H.264 packetising", h264.H264Encoder, "pack"),
    ("send: SRTP protect, DTLS and ICE layers", rtcdtlstransport.RTCDtlsTransport, "_send_rtp"),
    (KERNEL, ice.StunProtocol, "send_data"),
]
NESTED = {"send: SRTP protect, DTLS and ICE layers": KERNEL}


class RtpCost:
    def __init__(self) -> None:
        self.seconds: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()
        self._originals: list[tuple[type, str, Any]] = []

    def start(self) -> None:
        for part, cls, name in ENTRY_POINTS:
            original = cls.__dict__[name]
            self._originals.append((cls, name, original))
            setattr(cls, name, self._timed(part, original))

    def stop(self) -> None:
        for cls, name, original in reversed(self._originals):
            setattr(cls, name, original)
        self._originals.clear()

    def _timed(self, part: str, function: Callable[..., Any]) -> Callable[..., Any]:
        seconds, calls = self.seconds, self.calls
        if inspect.iscoroutinefunction(function):

            @functools.wraps(function)
            async def timed_coroutine(*args: Any, **kwargs: Any) -> Any:
                start = time.thread_time_ns()
                try:
                    return await function(*args, **kwargs)
                finally:
                    seconds[part] += (time.thread_time_ns() - start) / 1e9
                    calls[part] += 1

            return timed_coroutine

        @functools.wraps(function)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.thread_time_ns()
            try:
                return function(*args, **kwargs)
            finally:
                seconds[part] += (time.thread_time_ns() - start) / 1e9
                calls[part] += 1

        return timed

    def by_part(self) -> dict[str, float]:
        """Seconds by part, each without the parts nested in it."""
        own = dict(self.seconds)
        for outer, inner in NESTED.items():
            if outer in own:
                own[outer] -= self.seconds.get(inner, 0.0)
        return own

    def removable(self) -> float:
        """Seconds of it all that are Python's (and a C stack's would not be): all but the kernel's."""
        return sum(spent for part, spent in self.by_part().items() if part != KERNEL)
