"""Which way the video crosses the relay: transcoded, or forwarded as it is (zero-transcode).

Decoding H.264 only to encode it again for WebRTC, and decoding the processor's H.264 only to
encode it again for MPEG-TS, is most of a relay's CPU. When the input already suits the
processor, the relay can forward its access units into RTP (send leg: "forward") and mux the
processor's returned access units into the output (output leg: "remux").

- VideoMode.TRANSCODE: decode and encode on both legs, whatever the input.
- VideoMode.PASSTHROUGH: forward and remux; an input that does not qualify fails the session.
- VideoMode.AUTO: forward while the input qualifies, encode while it does not, switching at
  the input's keyframes; the output is remuxed either way (the processor's H.264 does not depend
  on what it was sent).

InputRoute runs on the decode thread and decides, access unit by access unit, with the
Qualifier (media/h264.py): a unit it forwards goes to AccessUnits and is not decoded. A GOP that
arrived as a backlog (a session joining mid-segment; `backlog` says, from the session timeline)
is decoded instead: forwarded, the processor would have to decode all of it to reach the live
edge, while decoded, its stale frames are skipped here and only the newest is sent. Forwarding
begins at the next keyframe that is on time. What the bitstream cannot say is whether the
processor takes it: a processor that returns nothing of the forwarded input (while it did answer
the offer) gets the input decoded and encoded from then on; so, in AUTO, does a processor too
slow for it (the sender let a GOP's tail go late): a forwarded stream can only be thinned by
whole GOPs, a decoded one frame by frame, each frame sent the newest.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

import av

from relay_server.media.h264 import ParameterSets, Qualifier, Verdict
from relay_server.media.units import AccessUnits

BACKLOG = "joined mid-GOP: the backlog is decoded to reach the live edge; forwarding from the next keyframe"
TOO_SLOW = (
    "the processor takes the input more slowly than it comes (forwarded units fell more than the"
    " latency budget behind): decoded, it is sent the newest frame each time it takes one"
)


class VideoMode(enum.Enum):
    TRANSCODE = "transcode"
    PASSTHROUGH = "passthrough"
    AUTO = "auto"


class NotQualified(RuntimeError):
    """A passthrough session's input cannot be forwarded as it is."""


@dataclass(frozen=True)
class PathStats:
    send: str  # "forward": the input's access units as they are; "encode": decoded, encoded again
    send_reason: str
    output: str  # "remux": the processor's access units as they are; "encode"
    output_reason: str
    switches: int  # times the send leg switched between forward and encode
    units_skipped: int  # input units neither forwarded nor decoded: waiting for a keyframe


class InputRoute:
    """on_video_packet for a Decoder: forwards the units the Qualifier lets through (True: not
    decoded), hands the rest to the decoder. `on_verdict` is called, on the decode thread, with
    each new decision."""

    def __init__(
        self,
        width: int,
        height: int,
        units: AccessUnits,
        on_verdict: Callable[[Verdict], None],
        *,
        backlog: Callable[[int], bool] | None = None,
        decode_when_late: bool = False,
    ) -> None:
        self.units = units
        self.skipped = 0
        self._qualifier = Qualifier(width, height)
        self._parameter_sets = ParameterSets()
        self._on_verdict = on_verdict
        self._backlog = backlog
        self._decode_when_late = decode_when_late
        self._forwarding = False  # the qualifier's decision, or the refusal
        self._behind = False  # a backlog GOP qualifies but is decoded
        self._resized: tuple[int, int] | None = None  # the session's new size, from a keyframe on
        self._await_keyframe = False  # decoding resumed mid-GOP: its references were forwarded
        self._refused: str | None = None  # forwarding is off for good, and why

    def resize(self, width: int, height: int) -> None:
        """The session's size is width×height (any thread): the input qualifies only at the
        session's size, so forwarding is decided anew at the next keyframe, where decoding can
        take over without losing a frame (units forwarded until then are the old size's)."""
        self._resized = (width, height)

    def refuse(self, reason: str) -> None:
        """Forward nothing from now on (any thread): the processor does not take the input as
        it is. Decoding resumes at the next keyframe."""
        self._refused = reason

    def __call__(self, packet: av.Packet) -> bool:
        if packet.is_keyframe and self._decode_when_late and self.units.late_gops and self._refused is None:
            self._refused = TOO_SLOW  # the late GOP's tail went to the sender, which let it go
        resized = self._resized
        if resized is not None and (packet.is_keyframe or not self._forwarding):
            self._resized = None
            self._qualifier.width, self._qualifier.height = resized
        data = bytes(packet)
        verdict = self._qualifier.check(data, packet.pts, packet.dts)
        if self._refused is not None and (verdict is not None or self._forwarding):
            verdict = Verdict(False, self._refused)
        if verdict is not None:
            if self._forwarding and not verdict.passthrough and not packet.is_keyframe:
                self._await_keyframe = True
            self._forwarding = verdict.passthrough
        if self._forwarding and packet.is_keyframe:
            behind = self._backlog is not None and packet.pts is not None and self._backlog(packet.pts)
            if behind != self._behind or verdict is not None:
                self._behind = behind
                verdict = Verdict(False, BACKLOG) if behind else self._qualifier.verdict
        if verdict is not None:
            self._on_verdict(verdict)
        if not self._forwarding or self._behind:
            if self._await_keyframe and not packet.is_keyframe:
                self.skipped += 1
                return True  # the decoder would only conceal errors until the next keyframe
            self._await_keyframe = False
            return False
        complete = self._parameter_sets.complete(data)
        if complete is not data:  # an IDR without SPS and PPS: the processor needs them
            unit = av.Packet(complete)
            unit.pts, unit.dts, unit.time_base = packet.pts, packet.dts, packet.time_base
            unit.is_keyframe = True
            packet = unit
        self.units.put(packet)
        return True
