"""A video jitter buffer that releases a frame as soon as its last packet is in.

aiortc's JitterBuffer knows a frame is complete only when a packet of the next frame arrives,
so every received frame waits one frame interval (33 ms at 30 fps) for no reason: the sender
marks the last packet of each frame (RTP marker bit, RFC 6184 for H.264). This one releases a
frame when its packets from the first to the marked one are all in; a frame whose last packet is
not marked is still released, the old way, when the next frame starts.

Nothing is released before a keyframe that carries SPS and PPS: the stream's first packets may
be the lost ones, and the buffer starts at the first packet that came.

Passthrough: with a `tap` set, complete frames (Annex B access units, as aiortc's depayloader
leaves them) go to the tap instead of to aiortc's decoder thread, so the returned video costs
no decoding. The receiver calls add() on the event loop for every RTP packet, so the tap runs
there, synchronously, before the next packet is handled. When the tap is cleared, aiortc's
decoder resumes on a stream it missed part of: what it would make of the frames before the next
keyframe is smeared pictures, so those are withheld (counted) and keyframe_request() asks the
sender for a keyframe (RTCP PLI) so that the wait is one round trip.

A lost packet holds the frames behind it until it comes again: aiortc's receiver asks for it once
(RTCP NACK) when it sees the gap; while the gap lasts, `on_missing` is told the missing sequence
numbers again every `nack_interval` (a retransmission can be lost too), and once it has lasted
`max_wait` the frames it breaks are given up: dropped (counted in `given_up`), every frame before
the next keyframe withheld (their references are gone), and a keyframe asked for (RTCP PLI).

bitrate_request() asks the sender for a bitrate (RTCP REMB): the relay offers no bandwidth
estimation (signaling.py), so this is the only bitrate an aiortc processor is told.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.rtp import RTCP_PSFB_APP, RtcpPsfbPacket, RtpPacket, pack_remb_fci
from aiortc.utils import uint16_add, uint16_gt

from relay_server.media.h264 import has_parameter_sets, is_idr

log = logging.getLogger(__name__)

CAPACITY = 512  # packets, as aiortc's video receiver has
MAX_WAIT = 0.125  # seconds a gap may hold the frames behind it, by default
NACK_INTERVAL = 0.02  # seconds between two asks for the same missing packets
_BUFFER = "_RTCRtpReceiver__jitter_buffer"  # where aiortc's receiver keeps it (name-mangled)
_RTCP_SSRC = "_RTCRtpReceiver__rtcp_ssrc"  # the SSRC its RTCP goes out with (name-mangled)

Tap = Callable[[bytes, int], None]  # (Annex B access unit, RTP timestamp on the 90 kHz clock)


class MarkerJitterBuffer(JitterBuffer):
    def __init__(self, max_wait: float = MAX_WAIT) -> None:
        super().__init__(capacity=CAPACITY, is_video=True)
        self.max_wait = max_wait
        self.nack_interval = NACK_INTERVAL
        self.on_missing: Callable[[int, list[int]], object] | None = None  # (media SSRC, sequence numbers)
        self.ssrc: int | None = None  # media SSRC of the last packet: where a PLI must go
        self.started = asyncio.Event()  # the first packet is in: the sender can be asked things
        self.tapped = 0  # frames that went to the tap
        self.withheld = 0  # frames kept from the decoder or the tap, waiting for a keyframe
        self.given_up = 0  # frames a lost packet broke, dropped after max_wait
        self._tap: Tap | None = None
        self._resync = False  # the decoder missed frames: nothing for it before a keyframe
        # Nothing for anyone before a keyframe: at the start (the stream's first packets may be
        # the lost ones) and once frames were dropped.
        self._broken = True
        self._asked = False  # for that keyframe (RTCP PLI)
        self._parameter_sets = False  # a keyframe with SPS and PPS came: later ones may omit them
        self._gap: int | None = None  # the first missing sequence number, while packets wait behind it
        self._gap_since = 0.0  # when it was seen
        self._asked_at = 0.0  # when the missing packets were last asked for
        self._newest = 0  # the newest sequence number in
        self._timer: asyncio.TimerHandle | None = None  # the next ask, while a gap lasts

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
        if self._origin is None or uint16_gt(packet.sequence_number, self._newest):
            self._newest = packet.sequence_number
        pli_flag, frame = super().add(packet)
        if frame is None and self._gap is not None and self._gap_waits():
            pli_flag = True  # given up: ask for a keyframe
            frame = self._remove_frame(packet.sequence_number)  # what is whole behind the gap
        if pli_flag:  # frames were dropped (here or by aiortc: too far behind): their
            self._broken = self._asked = True  # references are gone until a keyframe
        # Every whole frame goes now, to the tap or withheld; the decoder takes one per packet
        # (aiortc's receiver takes one), the rest with the next packets.
        while frame is not None:
            if self._broken and not self._resumes(frame.data):
                self.withheld += 1
                if not self._asked:
                    self._asked = pli_flag = True
            else:
                self._broken = self._asked = False
                if self._tap is not None:
                    self._to_tap(frame)
                elif self._resync and not is_idr(frame.data):
                    self.withheld += 1
                else:
                    self._resync = False
                    return pli_flag, frame
            frame = self._remove_frame(packet.sequence_number)
        return pli_flag, None

    def _to_tap(self, frame: JitterFrame) -> None:
        assert self._tap is not None
        self.tapped += 1
        try:
            self._tap(frame.data, frame.timestamp)
        except Exception:
            # Raised into aiortc, it would end the DTLS transport's receive loop: the whole
            # connection would die for one frame.
            log.exception("jitter buffer tap failed: frame at %d lost", frame.timestamp)

    def _resumes(self, access_unit: bytes) -> bool:
        """A keyframe, with SPS and PPS unless an earlier one had them: the stream can be
        decoded from it."""
        if not is_idr(access_unit):
            return False
        if not self._parameter_sets:
            self._parameter_sets = has_parameter_sets(access_unit)
        return self._parameter_sets

    def ask_past_newest(self, count: int) -> None:
        """Ask for the `count` packets after the newest in (RTCP NACK): the sender's last ones may
        have been lost, with nothing after them to show the gap. Those it has not sent, it
        ignores."""
        if self.on_missing is not None and self.ssrc is not None:
            self.on_missing(self.ssrc, [uint16_add(self._newest, count) for count in range(1, count + 1)])

    def stop(self) -> None:
        """No more asks for missing packets (the connection is closing)."""
        self.on_missing = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _gap_waits(self) -> bool:
        """A gap holds frames: ask for its packets again, or give them up (True: ask for a
        keyframe)."""
        if time.monotonic() - self._gap_since < self.max_wait:
            self._ask_again()
            return False
        self._give_up()
        return True

    def _ask_again(self) -> None:
        """Ask for the missing packets if nack_interval has passed, and again after it while the
        gap lasts: the sender may send nothing more until they come (its frames wait on them)."""
        if self.on_missing is None or self._gap is None or self.ssrc is None:
            return
        now = time.monotonic()
        if now - self._gap_since >= self.max_wait:
            return  # given up with the next packet
        if now - self._asked_at >= self.nack_interval:
            self._asked_at = now
            missing = [
                seq
                for seq in self._sequence(self._gap, self._newest)
                if self._packets[seq % self.capacity] is None
            ]
            self.on_missing(self.ssrc, missing)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.nack_interval, self._timer_fired)

    def _timer_fired(self) -> None:
        self._timer = None
        self._ask_again()

    def _give_up(self) -> None:
        """Drop what is before the first packet of a frame after the gap (the broken frame)."""
        assert self._origin is not None and self._gap is not None
        first = None
        for count in range(self.capacity):
            packet = self._packets[(self._gap + count) % self.capacity]
            if packet is not None:
                first = packet
                break
        if first is None:
            return
        # The first packet's frame goes too (the gap may hold its start), up to its last packet.
        drop = uint16_add(first.sequence_number, -self._origin)
        for count in range(drop, self.capacity):
            packet = self._packets[(self._origin + count) % self.capacity]
            if packet is None or packet.timestamp != first.timestamp:
                drop = count
                break
        self.remove(drop)
        self.given_up += 1
        self._broken = True
        self._gap = None

    def _sequence(self, start: int, end: int) -> list[int]:
        seqs: list[int] = []
        seq = start
        while uint16_gt(end, seq) and len(seqs) < self.capacity:
            seqs.append(seq)
            seq = uint16_add(seq, 1)
        return seqs

    def _remove_frame(self, sequence_number: int) -> JitterFrame | None:
        assert self._origin is not None
        packets: list[Any] = []
        for count in range(self.capacity):
            seq = uint16_add(self._origin, count)
            packet = self._packets[seq % self.capacity]
            if packet is None:
                # A gap, if newer packets are in: they wait for the missing one.
                if uint16_gt(sequence_number, seq) and self._gap != seq:
                    self._gap, self._gap_since, self._asked_at = seq, time.monotonic(), time.monotonic()
                elif not uint16_gt(sequence_number, seq):
                    self._gap = None
                return None
            if packets and packet.timestamp != packets[0].timestamp:
                return self._release(packets, count)  # the marked packet was lost
            packets.append(packet)
            if packet.marker:
                return self._release(packets, count + 1)
        return None

    def _release(self, packets: list[Any], count: int) -> JitterFrame:
        frame = JitterFrame(data=b"".join(packet._data for packet in packets), timestamp=packets[0].timestamp)
        self.remove(count)
        self._gap = None
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


def nack_request(receiver: Any, media_ssrc: int, lost: list[int]) -> Coroutine[Any, Any, None]:
    """A request to the sender of `receiver`'s video for the packets `lost` again (RTCP NACK),
    for the caller to run."""
    request: Coroutine[Any, Any, None] = receiver._send_rtcp_nack(media_ssrc, lost)
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
