"""A video jitter buffer that releases a frame as soon as its last packet is in.

aiortc's JitterBuffer knows a frame is complete only when a packet of the next frame arrives,
so every received frame waits one frame interval (33 ms at 30 fps) for no reason: the sender
marks the last packet of each frame (RTP marker bit, RFC 6184 for H.264). This one releases a
frame when its packets from the first to the marked one are all in; a frame whose marked packet
was lost is still released, the old way, when the next frame starts.

Passthrough: with a `tap` set, complete frames (Annex B access units, as aiortc's depayloader
leaves them) go to the tap instead of to aiortc's decoder thread, so the returned video costs
no decoding. The receiver calls add() on the event loop for every RTP packet, so the tap runs
there, synchronously, before the next packet is handled. When the tap is cleared, aiortc's
decoder resumes on a stream it missed part of: what it would make of the frames before the next
keyframe is smeared pictures, so those are withheld (counted) and keyframe_request() asks the
sender for a keyframe (RTCP PLI) so that the wait is one round trip.

bitrate_request() asks the sender for a bitrate (RTCP REMB): the relay offers no bandwidth
estimation (signaling.py), so this is the only bitrate an aiortc processor is told.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.rtp import RTCP_PSFB_APP, RtcpPsfbPacket, RtpPacket, pack_remb_fci

from relay_server.media.h264 import is_idr

log = logging.getLogger(__name__)

CAPACITY = 512  # packets, as aiortc's video receiver has
_BUFFER = "_RTCRtpReceiver__jitter_buffer"  # where aiortc's receiver keeps it (name-mangled)
_RTCP_SSRC = "_RTCRtpReceiver__rtcp_ssrc"  # the SSRC its RTCP goes out with (name-mangled)

Tap = Callable[[bytes, int], None]  # (Annex B access unit, RTP timestamp on the 90 kHz clock)


class MarkerJitterBuffer(JitterBuffer):
    def __init__(self) -> None:
        super().__init__(capacity=CAPACITY, is_video=True)
        self.ssrc: int | None = None  # media SSRC of the last packet: where a PLI must go
        self.started = asyncio.Event()  # the first packet is in: the sender can be asked things
        self.tapped = 0  # frames that went to the tap
        self.withheld = 0  # frames kept from the decoder after the tap, waiting for a keyframe
        self._tap: Tap | None = None
        self._resync = False  # the decoder missed frames: nothing for it before a keyframe

    @property
    def tap(self) -> Tap | None:
        """Where complete frames go instead of the decoder: `tap(access_unit, rtp_timestamp)`,
        with the RTP timestamp raw (random origin, wraps at 2**32). Set and clear it at any
        time on the event loop; an exception it raises is logged and costs that frame only."""
        return self._tap

    @tap.setter
    def tap(self, tap: Tap | None) -> None:
        if tap is None and self._tap is not None:
            self._resync = True
        self._tap = tap

    def add(self, packet: RtpPacket) -> tuple[bool, JitterFrame | None]:
        if self.ssrc is None:
            self.started.set()
        self.ssrc = packet.ssrc
        pli_flag, frame = super().add(packet)
        if frame is None:
            return pli_flag, None
        if self._tap is not None:
            self.tapped += 1
            try:
                self._tap(frame.data, frame.timestamp)
            except Exception:
                # Raised into aiortc, it would end the DTLS transport's receive loop: the
                # whole connection would die for one frame.
                log.exception("jitter buffer tap failed: frame at %d lost", frame.timestamp)
            return pli_flag, None
        if self._resync:
            if not is_idr(frame.data):
                self.withheld += 1
                return pli_flag, None
            self._resync = False
        return pli_flag, frame

    def _remove_frame(self, sequence_number: int) -> JitterFrame | None:
        assert self._origin is not None
        packets: list[Any] = []
        for count in range(self.capacity):
            packet = self._packets[(self._origin + count) % self.capacity]
            if packet is None:
                return None  # a gap: wait for the missing packet
            if packets and packet.timestamp != packets[0].timestamp:
                return self._release(packets, count)  # the marked packet was lost
            packets.append(packet)
            if packet.marker:
                return self._release(packets, count + 1)
        return None

    def _release(self, packets: list[Any], count: int) -> JitterFrame:
        frame = JitterFrame(data=b"".join(packet._data for packet in packets), timestamp=packets[0].timestamp)
        self.remove(count)
        return frame


def install(receiver: Any) -> MarkerJitterBuffer | None:
    """Give an aiortc video RTCRtpReceiver a MarkerJitterBuffer (before its first packet) and
    return it. Its buffer is private: if a future aiortc moves it, the stock one stays, this
    says so and returns None (no tap either, then)."""
    if not isinstance(getattr(receiver, _BUFFER, None), JitterBuffer):
        log.warning("aiortc's receiver has no jitter buffer where expected: frames wait one interval")
        return None
    buffer = MarkerJitterBuffer()
    setattr(receiver, _BUFFER, buffer)
    return buffer


def keyframe_request(receiver: Any) -> Coroutine[Any, Any, None] | None:
    """A request to the sender of `receiver`'s video for a keyframe (RTCP PLI), for the caller to
    run; None when there is no one to ask yet: no MarkerJitterBuffer installed, or no packet
    received (aiortc itself drops the PLI until the connection has its RTCP SSRC)."""
    media_ssrc = _media_ssrc(receiver)
    if media_ssrc is None:
        return None
    request: Coroutine[Any, Any, None] = receiver._send_rtcp_pli(media_ssrc)
    return request


def bitrate_request(receiver: Any, bitrate: int) -> Coroutine[Any, Any, None] | None:
    """A request to the sender of `receiver`'s video to send at `bitrate` bits per second (RTCP
    REMB), for the caller to run; None when there is no one to ask yet (as keyframe_request)."""
    media_ssrc, rtcp_ssrc = _media_ssrc(receiver), getattr(receiver, _RTCP_SSRC, None)
    if media_ssrc is None or rtcp_ssrc is None:
        return None
    remb = RtcpPsfbPacket(
        fmt=RTCP_PSFB_APP, ssrc=rtcp_ssrc, media_ssrc=0, fci=pack_remb_fci(bitrate, [media_ssrc])
    )
    request: Coroutine[Any, Any, None] = receiver._send_rtcp(remb)
    return request


def _media_ssrc(receiver: Any) -> int | None:
    """The SSRC of the video `receiver` gets, from its MarkerJitterBuffer's packets (None: no
    such buffer, or no packet yet)."""
    buffer = getattr(receiver, _BUFFER, None)
    return buffer.ssrc if isinstance(buffer, MarkerJitterBuffer) else None
