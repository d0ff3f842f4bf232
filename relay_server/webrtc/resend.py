"""The video sent to the processor, sent again where the processor may be stuck on it.

The processor's receiver (aiortc's, as ComfyStream runs it) holds every frame behind a missing
packet until that packet comes. It asks for it (RTCP NACK) only when a later packet shows the
gap, and only once. When the retransmission is lost too, or the lost packet was the last one sent
(the relay sends nothing more while MAX_IN_FLIGHT frames are out, so nothing shows the gap), the
receiver waits for 512 more packets, seconds of video, and then for a keyframe. So when the oldest
frame out has not come back within `after`, the packets of the frames out are sent again, as
answers to a NACK are (RTX); copies the processor already has, its jitter buffer drops.

Answering a NACK, the newest packet sent goes again too, once per frame sent after the lost
packet's. aiortc's jitter buffer lets out at most one complete frame per packet it gets, so when
a retransmission fills a gap, the frames held behind it would each leave one packet later: with
frames of one packet each (a forwarded input's P-frames often are), the processor would stay as
many frames behind (measured: +33 ms on every frame, until the next keyframe's many packets).
Each copy of a packet it already has lets one more frame out, and is dropped.

The same stall has a twin on the way back: the last packets the processor returned were lost, and
nothing after them shows the relay's receiver the gap (the processor returns nothing more until
the relay sends more, which waits on those returns). So `on_stall` is called as well: the link
asks the processor for the packets after the newest it got.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from aiortc.utils import uint16_add, uint16_gt

from relay_server.webrtc.roundtrip import RoundTrip
from relay_server.webrtc.sendtrack import SendStats

log = logging.getLogger(__name__)

MAX_PUSHES = 8  # copies of the newest packet after answering a NACK, at most
RESEND_AFTER = 0.1  # seconds the oldest frame out may take, at least, before its packets go again
SLOWER = 2.0  # ... or this many round trips (recent median): a slow processor is not a stuck one
# aiortc's receiver starts again, asking for a keyframe, on a packet 100 or more behind its newest.
MAX_PACKETS = 96
_HISTORY = "_RTCRtpSender__rtp_history"  # aiortc's sender keeps its last 128 packets here (name-mangled)


class Resender:
    """Watches one peer connection's frames out; start() once, stop() when it closes."""

    def __init__(
        self,
        sender: Any,
        roundtrip: RoundTrip,
        stats: SendStats,
        on_stall: Callable[[], None] | None = None,
        after: float = RESEND_AFTER,
    ) -> None:
        self.after = after
        self._on_stall = on_stall
        self._sender = sender
        self._roundtrip = roundtrip
        self._stats = stats
        self._last = 0.0  # when packets were last sent again
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._retransmit = sender._retransmit
        sender._retransmit = self._answer_nack  # aiortc calls it per sequence number a NACK names

    def start(self) -> None:
        self._schedule(self.after)

    async def _answer_nack(self, sequence_number: int) -> None:
        await self._retransmit(sequence_number)
        history = getattr(self._sender, _HISTORY, None)
        newest, frames = frames_after(history, sequence_number) if isinstance(history, dict) else (None, 0)
        for _ in range(min(frames, MAX_PUSHES)):
            assert newest is not None
            await self._retransmit(newest)
            self._stats.pushed += 1

    async def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _schedule(self, delay: float) -> None:
        self._timer = asyncio.get_running_loop().call_later(delay, self._check)

    def _check(self) -> None:
        """One timer per `after` while frames come back in time; no per-frame timers."""
        after = max(self.after, SLOWER * self._roundtrip.latencies.recent())
        out, oldest = self._roundtrip.waiting()
        now = time.monotonic()
        if oldest is None:
            self._schedule(after)
            return
        due = max(oldest, self._last) + after
        if now < due:
            self._schedule(due - now)
            return
        self._last = now
        if self._on_stall is not None:
            self._on_stall()
        history = getattr(self._sender, _HISTORY, None)
        lost = packets_of_last_frames(history, out) if isinstance(history, dict) else []
        if lost and (self._task is None or self._task.done()):
            self._task = asyncio.create_task(self._resend(lost), name="resend")
        self._schedule(after)

    async def _resend(self, sequence_numbers: list[int]) -> None:
        try:
            for sequence_number in sequence_numbers:
                await self._retransmit(sequence_number)
                self._stats.resent += 1
        except ConnectionError as error:  # closing: the connection's end says why
            log.debug("resend stopped: %r", error)


def frames_after(history: dict[int, Any], sequence_number: int) -> tuple[int | None, int]:
    """The newest sequence number in `history` (aiortc's RtpPackets), and how many frames were
    sent after the one `sequence_number` is part of (counted by the newer packets' timestamps)."""
    lost = next((packet for packet in history.values() if packet.sequence_number == sequence_number), None)
    if lost is None:
        return None, 0
    newest = sequence_number
    timestamps = set()
    for packet in history.values():
        if uint16_gt(packet.sequence_number, sequence_number) and packet.timestamp != lost.timestamp:
            timestamps.add(packet.timestamp)
            if uint16_gt(packet.sequence_number, newest):
                newest = packet.sequence_number
    return newest, len(timestamps)


def packets_of_last_frames(history: dict[int, Any], frames: int) -> list[int]:
    """The sequence numbers of the packets of the last `frames` frames in `history` (aiortc's
    RtpPackets), oldest first: the gap a receiver waits on is the oldest, filled first. At most
    MAX_PACKETS, the newest."""
    packets = list(history.values())
    if not packets or frames <= 0:
        return []
    newest = packets[0].sequence_number
    for packet in packets:
        if uint16_gt(packet.sequence_number, newest):
            newest = packet.sequence_number
    by_age = sorted(
        (uint16_add(newest, -packet.sequence_number), packet.sequence_number, packet.timestamp)
        for packet in packets
    )
    chosen: list[int] = []
    timestamps: list[int] = []
    for age, sequence_number, timestamp in by_age:
        if age >= MAX_PACKETS:
            break
        if timestamp not in timestamps:
            if len(timestamps) == frames:
                break
            timestamps.append(timestamp)
        chosen.append(sequence_number)
    return chosen[::-1]
