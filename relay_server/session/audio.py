"""AudioCarrier: the input's audio carried into the output on the session timeline, in sync with the video.

The video comes back from the processor stamped with the media time of the input frame it was
made from plus the session's output offset (media/timeline.py); the audio never leaves the relay
and keeps its own input timestamps on the same offset, so the two stay as in sync as the input
was, from the first frame to the last, whatever the round trip does. Until the output has begun
(the first returned frame sets the offset), and while a packet is ahead of all the input's video
(the video that comes next decides its epoch), packets wait here: at most HOLD of them, the
oldest dropped beyond that, counted. Nothing depends on pacing: a catch-up session carries audio too.
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

    async def run(self) -> None:
        """Carry packets until cancelled."""
        timeline = self._timeline
        while True:
            await self._arrived.wait()
            self._arrived.clear()
            # A packet's end is where the next begins (a muxer's audio PES holds several frames
            # and its duration says one): it waits for the next packet.
            while len(self._held) > 1 and timeline.output_started:
                packet, following = self._held[0], self._held[1]
                assert packet.pts is not None and packet.time_base is not None
                assert following.pts is not None
                base = packet.time_base * TICKS
                start = round(packet.pts * base)
                pts = timeline.audio_pts(start, max(0, round(following.pts * base) - start))
                if pts is None:
                    break  # ahead of the video: the next returned frame says where it goes
                self._held.popleft()
                if pts < 0:
                    self.dropped += 1  # before the output's clock began
                    continue
                await self._pipeline.submit_audio(packet, pts)
                self.carried += 1
