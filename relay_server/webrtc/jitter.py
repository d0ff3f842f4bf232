"""A video jitter buffer that releases a frame as soon as its last packet is in.

aiortc's JitterBuffer knows a frame is complete only when a packet of the next frame arrives,
so every received frame waits one frame interval (33 ms at 30 fps) for no reason: the sender
marks the last packet of each frame (RTP marker bit, RFC 6184 for H.264). This one releases a
frame when its packets from the first to the marked one are all in; a frame whose marked packet
was lost is still released, the old way, when the next frame starts.
"""

from __future__ import annotations

import logging
from typing import Any

from aiortc.jitterbuffer import JitterBuffer, JitterFrame

log = logging.getLogger(__name__)

CAPACITY = 512  # packets, as aiortc's video receiver has


class MarkerJitterBuffer(JitterBuffer):
    def __init__(self) -> None:
        super().__init__(capacity=CAPACITY, is_video=True)

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


def install(receiver: Any) -> bool:
    """Give an aiortc video RTCRtpReceiver a MarkerJitterBuffer (before its first packet). Its
    buffer is private: if a future aiortc moves it, the stock one stays and this says so."""
    name = "_RTCRtpReceiver__jitter_buffer"
    if not isinstance(getattr(receiver, name, None), JitterBuffer):
        log.warning("aiortc's receiver has no jitter buffer where expected: frames wait one interval")
        return False
    setattr(receiver, name, MarkerJitterBuffer())
    return True
