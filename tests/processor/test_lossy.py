"""LossyLink: the embedded processor's `loss` knob drops a share of its media packets each way."""

from __future__ import annotations

import pytest
from aiortc.rtp import RTCP_PSFB_PLI, RtcpPsfbPacket, RtpPacket

from relay_server.processor.lossy import LossyLink


class Transport:
    """What LossyLink wraps of aiortc's RTCDtlsTransport: its RTP send and receive paths (a
    stand-in: a real one needs a DTLS handshake, which the link tests have)."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.handled: list[bytes] = []

    async def _send_rtp(self, data: bytes) -> None:
        self.sent.append(data)

    async def _handle_rtp_data(self, data: bytes, arrival_time_ms: int) -> None:
        self.handled.append(data)


async def test_a_share_of_the_media_goes_each_way_and_rtcp_always() -> None:
    link = LossyLink(0.1)
    transport = Transport()
    link.install(transport)
    link.install(transport)  # once only
    media = RtpPacket(payload_type=96, sequence_number=1, timestamp=0, payload=b"x" * 100).serialize()
    rtcp = bytes(RtcpPsfbPacket(fmt=RTCP_PSFB_PLI, ssrc=1, media_ssrc=2))
    for _ in range(2000):
        await transport._send_rtp(media)
        await transport._send_rtp(rtcp)
        await transport._handle_rtp_data(media, 0)
    assert transport.sent.count(rtcp) == 2000  # RTCP (NACK, PLI, reports) is never lost
    assert link.dropped_sent + transport.sent.count(media) == 2000
    assert link.dropped_received + len(transport.handled) == 2000
    for dropped in (link.dropped_sent, link.dropped_received):
        assert 140 < dropped < 260  # 10 % of 2000, give or take


def test_loss_must_be_a_share() -> None:
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="loss"):
            LossyLink(bad)
