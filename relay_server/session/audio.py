"""AudioCarrier: the input's audio carried into the output on the session timeline, in sync with the video.

The video comes back from the processor stamped with the media time of the input frame it was
made from plus the session's output offset (media/timeline.py); the audio never leaves the relay
and keeps its own input timestamps on the same offset, so the two stay as in sync as the input
was, from the first frame to the last, whatever the round trip does. Until the output has begun
(the first returned frame sets the offset), and while a packet is ahead of all the input's video
(the video that comes next decides its epoch), packets wait here: at most HOLD of them, the
oldest dropped beyond that, counted. Nothing depends on pacing: a catch-up session carries audio too.

A packet goes once the video reaches its end, so its length matters. An AAC (ADTS), Opus, MPEG
audio or AC-3 PES is cut into its frames, each with its own timestamp and length
(media/audioframes.py): each goes as soon as the video reaches it, not when the PES's last frame
does. Other packets (of a codec not cut, or a damaged PES, whose duration may say one frame of
several) end where the next begins, so each waits for the next; the input's last, for the
input's end: then no video will come to decide where audio goes, and what reaches the last
pictures goes with them.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import NamedTuple

import av

from relay_server.media.audioframes import audio_frames
from relay_server.media.output import OutputPipeline
from relay_server.media.segmenter import AudioInfo
from relay_server.media.timeline import TICKS, SessionTimeline

log = logging.getLogger(__name__)

HOLD = 256  # packets: over 5 s of AAC frames or of Opus


class _Held(NamedTuple):
    packet: av.Packet
    start: int  # input media time (90 kHz)
    duration: int | None  # 90 kHz; None: until the next packet begins


class AudioCarrier:
    """Called on the event loop: add_stream() once, put() per packet; run() is its task."""

    def __init__(self, pipeline: OutputPipeline, timeline: SessionTimeline) -> None:
        self.carried = 0  # packets handed to the output
        self.dropped = 0  # packets let go: held too long, no timestamp, or no stream to put them in
        self._pipeline = pipeline
        self._timeline = timeline
        self._held: deque[_Held] = deque()
        self._arrived = asyncio.Event()
        self._carrying = False
        self._codec = ""  # the stream's: its PES are cut into their frames where it can be
        self._ended = False
        self._duration = 0  # of the packet carried last (90 kHz)

    def add_stream(self, info: AudioInfo) -> None:
        self._pipeline.add_audio_stream(info)
        self._carrying = True
        self._codec = info.codec

    def put(self, packet: av.Packet) -> None:
        if not self._carrying or packet.pts is None or packet.time_base is None:
            self.dropped += 1
            return
        start = round(packet.pts * packet.time_base * TICKS)
        data = bytes(packet)
        frames = audio_frames(self._codec, data)
        if frames is None:
            self._hold(_Held(packet, start, None))
        else:
            elapsed = 0.0
            for frame in frames:
                part = av.Packet(data[frame.offset : frame.offset + frame.length])
                part.time_base = packet.time_base
                part.pts = part.dts = packet.pts + round(elapsed / packet.time_base)
                part.duration = round(frame.seconds / packet.time_base)
                duration = round((elapsed + frame.seconds) * TICKS) - round(elapsed * TICKS)
                self._hold(_Held(part, start + round(elapsed * TICKS), duration))
                elapsed += frame.seconds
        self._arrived.set()

    def _hold(self, held: _Held) -> None:
        if len(self._held) == HOLD:
            self._held.popleft()
            self.dropped += 1
        self._held.append(held)

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
                packet, start, duration = self._held[0]
                if duration is None:
                    if len(self._held) > 1:
                        duration = max(0, self._held[1].start - start)
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
