"""AudioCarrier: the input's audio laid on the relay's output clock, in sync with the video.

The video comes back from the processor stamped on arrival; the audio never leaves the relay. An
audio packet at media time m goes where the video of m goes: at the clock time the pacer sent
(or would have sent) a frame of media time m, plus the round trip through the processor,
measured on the first returned frames and then held fixed so that audio timestamps run on
smoothly (the video's own arrival jitter is a few milliseconds). Until both are known, packets
wait here: at most HOLD of them, the oldest dropped beyond that, counted.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

import av

from relay_server.media.encoder import CLOCK
from relay_server.media.output import OutputPipeline
from relay_server.media.pacer import Pacer
from relay_server.media.segmenter import AudioInfo
from relay_server.webrtc.roundtrip import LatencyWindow

log = logging.getLogger(__name__)

HOLD = 256  # packets: over 5 s of AAC or Opus


class AudioCarrier:
    """Called on the event loop: add_stream() once, put() per packet; run() is its task."""

    def __init__(self, pipeline: OutputPipeline, pacer: Pacer, latencies: LatencyWindow) -> None:
        self.carried = 0  # packets handed to the output
        self.dropped = 0  # packets let go: held too long, no timestamp, or no stream to put them in
        self.reason = ""  # why the audio is not carried, when it is not
        self._pipeline = pipeline
        self._pacer = pacer
        self._latencies = latencies
        self._held: deque[av.Packet] = deque()
        self._arrived = asyncio.Event()
        self._delay: float | None = None  # the round trip, once measured
        self._carrying = False

    def add_stream(self, info: AudioInfo) -> None:
        try:
            self._pipeline.add_audio_stream(info)
        except RuntimeError as error:
            # The first returned frame beat the audio's first packet: the output began without it.
            self.reason = f"the audio started after the output: {error}"
            log.warning("the input's audio is not carried: %s", self.reason)
            return
        self._carrying = True

    def put(self, packet: av.Packet) -> None:
        if not self._carrying or packet.pts is None or packet.time_base is None:
            self.dropped += 1
            return
        if len(self._held) == HOLD:
            self._held.popleft()
            self.dropped += 1
        self._held.append(packet)
        self._arrived.set()

    def frame_returned(self) -> None:
        """A processed frame came back: the round trip may now be known."""
        if self._delay is None and self._latencies.values:
            self._delay = self._latencies.percentile(0.5)
            self._arrived.set()

    async def run(self, origin: float) -> None:
        """Carry packets until cancelled; `origin` is the clock time of output pts 0."""
        while True:
            await self._arrived.wait()
            self._arrived.clear()
            while self._held and self._delay is not None:
                packet = self._held[0]
                assert packet.pts is not None and packet.time_base is not None
                sent = self._pacer.clock_time(float(packet.pts * packet.time_base))
                if sent is None:
                    break  # no frame paced yet
                self._held.popleft()
                pts = round((sent + self._delay - origin) / CLOCK)
                if pts < 0:
                    self.dropped += 1  # before the output's clock began
                    continue
                await self._pipeline.submit_audio(packet, pts)
                self.carried += 1
