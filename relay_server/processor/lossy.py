"""A lossy link for the embedded processor: a share of the RTP packets it sends and receives is
dropped, as a network between it and the relay would (the `loss` knob).

Processors often run on another machine, and a relay must recover what such a link loses
(retransmission on NACK, keyframes on PLI). Loopback loses nothing, so the processor loses packets
itself: its DTLS transport's RTP send and receive paths drop each packet with probability
`loss`, from a seeded generator (a test run is the same every time). RTCP (NACK, PLI, receiver
reports) and the data channels go through untouched: what is lost is media.
"""

from __future__ import annotations

import random
from typing import Any

from aiortc.rtp import is_rtcp

SEED = 1234


class LossyLink:
    """Counts what it dropped; install() it on each DTLS transport of a peer connection."""

    def __init__(self, loss: float, seed: int = SEED) -> None:
        if not 0 <= loss < 1:
            raise ValueError(f"loss must be 0 (none) to below 1, got {loss:g}")
        self.loss = loss
        self.dropped_sent = 0
        self.dropped_received = 0
        self._random = random.Random(seed)

    def install(self, transport: Any) -> None:
        """Wrap an aiortc RTCDtlsTransport's RTP send and receive paths (its private methods:
        aiortc offers no hook), once."""
        if getattr(transport, "_lossy", None) is not None:
            return
        transport._lossy = self
        send, handle = transport._send_rtp, transport._handle_rtp_data

        async def send_rtp(data: bytes) -> None:
            if not is_rtcp(data) and self._random.random() < self.loss:
                self.dropped_sent += 1
                return
            await send(data)

        async def handle_rtp_data(data: bytes, arrival_time_ms: int) -> None:
            if self._random.random() < self.loss:
                self.dropped_received += 1
                return
            await handle(data, arrival_time_ms)

        transport._send_rtp = send_rtp
        transport._handle_rtp_data = handle_rtp_data
