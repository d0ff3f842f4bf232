"""The loopback processor's returned track: the H.264 that came in, sent back as it is.

With the `loopback` knob the processor neither decodes nor encodes, so it costs almost nothing
and a capacity bench measures the relay, not its processors. The receiver's jitter buffer
(webrtc/jitter.py, tapped) hands every complete access unit to this track, which returns it on
the same transceiver with its own RTP timestamp; aiortc only packetises it. A keyframe request
from the relay (RTCP PLI) goes on to the relay's sender: only the stream's source can make one.

The units wait in a bounded queue; when it is full (nothing is sending them: the connection is
stuck), what is queued goes, counted in `dropped`, and so does everything up to the next
keyframe: a P-frame without the frames before it is a broken picture. Like ComfyStream's track,
this one ends for good after `input_timeout` seconds without an input unit.
"""

from __future__ import annotations

import asyncio
import collections
from fractions import Fraction
from typing import Any

import av
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from relay_server.media.h264 import is_idr
from relay_server.processor.track import ReturnedTrack
from relay_server.webrtc import jitter

CAPACITY = 32  # units waiting to go back: a second at 30 fps
CLOCK = Fraction(1, 90_000)  # H.264's RTP clock
_WRAP = 1 << 32  # RTP timestamps are 32 bits


class LoopbackTrack(ReturnedTrack):
    """Returns what `receiver` gets (its video, `source`), unit by unit, undecoded."""

    def __init__(self, source: MediaStreamTrack, receiver: Any, *, input_timeout: float) -> None:
        super().__init__(source)
        buffer = jitter.install(receiver)
        if buffer is None:
            raise RuntimeError("aiortc's receiver has no jitter buffer to tap: loopback is not possible")
        self.dropped = 0  # units let go: the queue was full, and those up to the next keyframe
        self._receiver = receiver
        self._buffer = buffer
        self._input_timeout = input_timeout or None
        self._units: collections.deque[tuple[bytes, int]] = collections.deque()
        self._skipping = False  # until the next keyframe
        self._last_timestamp: int | None = None
        self._pts = 0  # the RTP timestamp, unwrapped, from 0 at the first unit
        self._requests: set[asyncio.Task[None]] = set()  # RTCP sent on the relay's behalf
        buffer.tap = self._unit
        buffer.on_missing = self._ask_again
        # Nothing ever reaches aiortc's decoder (the tap takes every unit): the source's recv()
        # returns only when the receiver stops.
        self._watch = asyncio.create_task(self._watch_source(), name=f"loopback-source-{self.id}")

    def request_keyframe(self) -> None:
        """The relay asked this track for a keyframe (RTCP PLI): ask the relay's sender."""
        self._send(jitter.keyframe_request(self._receiver))

    def _ask_again(self, media_ssrc: int, lost: list[int]) -> None:
        self._send(jitter.nack_request(self._receiver, media_ssrc, lost))

    def _send(self, request: Any) -> None:
        if request is None:
            return
        task = asyncio.create_task(request, name=f"loopback-rtcp-{self.id}")
        self._requests.add(task)
        task.add_done_callback(self._requests.discard)

    def _unit(self, access_unit: bytes, timestamp: int) -> None:
        self.frames_in += 1
        if self._skipping and not is_idr(access_unit):
            self.dropped += 1
            return
        self._skipping = False
        if len(self._units) >= CAPACITY:
            self.dropped += len(self._units) + 1
            self._units.clear()
            self._skipping = True
            self.request_keyframe()
            return
        self._units.append((access_unit, timestamp))
        self.arrived.set()

    async def _watch_source(self) -> None:
        try:
            while True:
                await self.source.recv()
        except MediaStreamError:
            pass
        finally:
            self.source_ended = True
            self.arrived.set()

    async def recv(self) -> av.Packet:
        if self.readyState != "live":
            raise MediaStreamError
        try:
            access_unit, timestamp = await self._next_in(self._units, self._input_timeout)
        except MediaStreamError:
            self.stop()
            raise
        if self._last_timestamp is not None:
            step = (timestamp - self._last_timestamp) % _WRAP
            self._pts += step - _WRAP if step >= _WRAP // 2 else step
        self._last_timestamp = timestamp
        packet = av.Packet(access_unit)
        packet.pts = packet.dts = self._pts
        packet.time_base = CLOCK
        self.frames_out += 1
        self.rate.tick()
        return packet

    def stop(self) -> None:
        super().stop()
        self._buffer.tap = None
        self._buffer.stop()
        self._watch.cancel()

    async def aclose(self) -> None:
        """Stop and wait for the tasks this track started."""
        self.stop()
        await asyncio.gather(self._watch, *self._requests, return_exceptions=True)

    def stats(self) -> dict[str, float | int | str]:
        return {**super().stats(), "dropped": self.dropped}
