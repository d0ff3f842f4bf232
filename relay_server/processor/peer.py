"""One client's peer connection: the offer/answer, the returned track and the data channels.

The processed video goes back on the transceiver the video arrived on (sendrecv), with H.264 as
its only codec (with the loopback knob, the video that came, undecoded: loopback.py).
Audio, if offered, is echoed back with Opus first: echoing consumes the incoming
track, which otherwise would queue its decoded frames without bound.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from aiortc import (
    RTCConfiguration,
    RTCDataChannel,
    RTCPeerConnection,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamTrack
from aiortc.sdp import SessionDescription

from relay_server.processor.control import ControlChannel
from relay_server.processor.loopback import LoopbackTrack
from relay_server.processor.lossy import LossyLink
from relay_server.processor.pipeline import Pipeline
from relay_server.processor.track import ProcessingTrack

log = logging.getLogger(__name__)


class OfferError(ValueError):
    """An offer this processor cannot answer (no H.264 video, malformed SDP)."""


def _codecs(kind: str, mime_type: str) -> list[Any]:
    capabilities = RTCRtpSender.getCapabilities(kind)
    return [codec for codec in capabilities.codecs if codec.mimeType.lower() == mime_type.lower()]


def check_offer(offered: SessionDescription) -> None:
    """Raise OfferError unless every video section of the offer (parsed) offers H.264."""
    for media in offered.media:
        if media.kind == "video" and not any(c.mimeType.lower() == "video/h264" for c in media.rtp.codecs):
            codecs = sorted({codec.mimeType for codec in media.rtp.codecs})
            raise OfferError(f"video must offer H.264 (this processor only does H.264); offered {codecs}")


class Peer:
    """A peer connection served until it fails, closes or close() is called."""

    def __init__(self, pipeline: Pipeline, *, with_prompts: bool, on_closed: Callable[[Peer], None]) -> None:
        self.pipeline = pipeline
        self.with_prompts = with_prompts
        # No ICE servers: aiortc would otherwise query a public STUN server for every connection.
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.tracks: list[ProcessingTrack | LoopbackTrack] = []
        loss = pipeline.knobs.loss
        self.lossy = LossyLink(loss) if loss else None  # the `loss` knob: media packets dropped
        self.closed = asyncio.Event()
        self._controls: list[ControlChannel] = []
        self._on_closed = on_closed
        self._closing: asyncio.Task[None] | None = None
        self.pc.on("track", self._on_track)
        self.pc.on("datachannel", self._on_datachannel)
        self.pc.on("connectionstatechange", self._on_state)

    async def answer(self, sdp: str, kind: str, offered: SessionDescription) -> RTCSessionDescription:
        """The answer to the offer `sdp` (`offered`, as parsed)."""
        check_offer(offered)
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type=kind))
        for transceiver in self.pc.getTransceivers():
            if transceiver.kind == "video":
                transceiver.setCodecPreferences(_codecs("video", "video/H264"))
            elif transceiver.kind == "audio":
                transceiver.setCodecPreferences(_codecs("audio", "audio/opus"))
        # setLocalDescription gathers every ICE candidate: the answer carries them (no trickle ICE).
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        if self.lossy is not None:
            for transceiver in self.pc.getTransceivers():
                self.lossy.install(transceiver.sender.transport)
        return self.pc.localDescription

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "video":
            knobs = self.pipeline.knobs
            if knobs.loopback:
                transceiver = next(t for t in self.pc.getTransceivers() if t.receiver.track is track)
                loopback = LoopbackTrack(track, transceiver.receiver, input_timeout=knobs.input_timeout)
                # An RTCP PLI from the relay goes on to the relay: only its sender makes keyframes.
                transceiver.sender._send_keyframe = loopback.request_keyframe  # type: ignore[method-assign]
                processed: ProcessingTrack | LoopbackTrack = loopback
            else:
                processed = ProcessingTrack(track, self.pipeline, with_prompts=self.with_prompts)
            self.tracks.append(processed)
            self.pc.addTrack(processed)  # takes the sender of the transceiver the track came on
        else:
            self.pc.addTrack(track)

    def _on_datachannel(self, channel: RTCDataChannel) -> None:
        if channel.label == "control":
            self._controls.append(ControlChannel(channel, self.pipeline))
        # The `data` channel carries text outputs only, and no effect produces text.

    def _on_state(self) -> None:
        state = self.pc.connectionState
        log.info("peer connection %s", state)
        if state in ("failed", "closed") and self._closing is None:
            if self.with_prompts:
                # ComfyStream's behaviour: a failed/closed connection stops the prompts for everyone.
                self.pipeline.stop_prompts()
            self._closing = asyncio.create_task(self._close(), name="processor-peer-close")

    async def close(self) -> None:
        """Close the connection and wait until every task it owns has finished."""
        if self._closing is None:
            self._closing = asyncio.create_task(self._close(), name="processor-peer-close")
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        try:
            for track in self.tracks:
                await track.aclose()
            for control in self._controls:
                await control.close()
            await self.pc.close()
        finally:
            self.closed.set()
            self._on_closed(self)

    def stats(self) -> dict[str, Any]:
        return {track.id: track.stats() for track in self.tracks}
