"""LastPicture: the picture a remuxed H.264 stream shows last, decoded only when it is needed.

A remuxed output (zero-transcode) never decodes the processor's frames, so when they stop coming
(the processor is reconnecting) there is no picture to repeat. Decoding every frame just in case
would cost what remuxing saves; instead the access units since the last keyframe are kept (a GOP:
the output asks the processor for a keyframe every gop) and decoded once, when the output begins
to fill a gap. Past MAX_UNITS the GOP is too long to keep: nothing is kept until the next keyframe
(and the output holds instead of repeating, if the gap comes then).
"""

from __future__ import annotations

import av
from av.error import InvalidDataError

# Access units kept since the last keyframe: 5 s at 30 fps, ~1 MB at 2 Mbit/s.
MAX_UNITS = 150


class LastPicture:
    """add() each access unit as it is remuxed (on the loop); units() takes a snapshot there,
    and decode() turns it into the last picture on any thread."""

    def __init__(self, max_units: int = MAX_UNITS) -> None:
        self.max_units = max_units
        self._units: list[bytes] = []  # from a keyframe on; empty while waiting for one

    def add(self, unit: bytes, keyframe: bool) -> None:
        if keyframe:
            self._units = [unit]
        elif self._units and len(self._units) < self.max_units:
            self._units.append(unit)
        else:
            self._units = []  # no keyframe yet, or the GOP is too long to keep

    def units(self) -> list[bytes]:
        return list(self._units)

    def clear(self) -> None:
        self._units = []


def decode_last(units: list[bytes]) -> av.VideoFrame | None:
    """The picture after the last of `units` (a keyframe first), or None if none decodes."""
    codec = av.CodecContext.create("h264", "r")
    last: av.VideoFrame | None = None
    for unit in [*units, None]:  # None: flush what the decoder still holds
        try:
            frames = codec.decode(av.Packet(unit) if unit is not None else None)
        except InvalidDataError:
            continue
        if frames:
            last = frames[-1]
    return last
