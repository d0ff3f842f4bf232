"""AudioCarrier: the input's audio carried into the output on the session timeline, in sync with the video.

The video comes back from the processor stamped with the media time of the input frame it was
made from plus the session's output offset (media/timeline.py); the audio never leaves the relay
and keeps its own input timestamps on the same offset, so the two stay as in sync as the input
was, from the first frame to the last, whatever the round trip does. Until the output has begun
(the first returned frame sets the offset), and while a packet is ahead of all the input's video
(the video that comes next decides its epoch), packets wait here: at most HOLD of them, the
oldest dropped beyond that, counted. Nothing depends on pacing: a catch-up session carries audio too.
A packet's end is known only once the next begins (a muxer's audio PES holds up to ~0.7 s of
frames, and its duration says one), so the input's last packet waits for the input's end; then
no video will come to decide where audio goes, and what reaches the last pictures goes with them.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

import av

from relay_server.media.output import OutputPipeline
from relay_server.media.segmenter import AudioInfo
from relay_server.media.timeline import TICKS, SessionTimeline

log = logging.getLogger(__name__)

HOLD = 256  # packets: over 5 s of AAC or Opus


class AudioCarrier:
    """Called on the event loop: add_stream() once, put() per packet; run() is its task."""

    def __init__(self, pipeline: OutputPipeline, timeline: SessionTimeline) -> None:
        self.carried = 0  # packets handed to the output
        self.dropped = 0  # packets let go: held too long, no timestamp, or no stream to put them in
        self._pipeline = pipeline
        self._timeline = timeline
        self._held: deque[av.Packet] = deque()
        self._arrived = asyncio.Event()
        self._carrying = False
        self._ended = False
        self._duration = 0  # of the packet carried last (90 kHz)

    def add_stream(self, info: AudioInfo) -> None:
        self._pipeline.add_audio_stream(info)
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
        """A processed frame came back: the output, and with it the offset, may have begun, and
        held audio's video may have come."""
        if self._held:
            self._arrived.set()

    def end(self) -> None:
        """The input has ended, and what the processor was sending back has come: run() carries
        what it can and returns."""
        self._ended = True
        self._arrived.set()

    async def run(self) -> None:
        """Carry packets until cancelled, or until the input has ended and they are carried."""
        timeline = self._timeline
        while True:
            await self._arrived.wait()
            self._arrived.clear()
            while self._held and timeline.output_started:
                packet = self._held[0]
                assert packet.pts is not None and packet.time_base is not None
                base = packet.time_base * TICKS
                start = round(packet.pts * base)
                if len(self._held) > 1:
                    following = self._held[1].pts
                    assert following is not None
                    duration = max(0, round(following * base) - start)
                elif self._ended:
                    duration = self._duration  # the input's last: as long as the one before, say
                else:
                    break  # its end is where the next packet begins
                pts = timeline.audio_pts(start, duration, final=self._ended)
                if pts is None and not self._ended:
                    break  # ahead of the video: the next returned frame says where it goes
                self._held.popleft()
                self._duration = duration
                if pts is None or pts < 0:
                    self.dropped += 1  # after every picture, or before the output's clock began
                    continue
                await self._pipeline.submit_audio(packet, pts)
                self.carried += 1
            if self._ended:
                self.dropped += len(self._held)  # the output never began
                self._held.clear()
                return
