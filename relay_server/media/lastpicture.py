"""LastPicture: the picture a remuxed H.264 stream shows last, decoded only when it is needed.

A remuxed output (zero-transcode) never decodes the processor's frames, so when they stop coming
(the processor is reconnecting, the input stalled) there is no picture to repeat, and when they
come back after the output filled the gap with frames of its own, the output cannot take them
as they are until the next keyframe. Decoding every frame just in case would cost what remuxing
saves; instead the access units since the last keyframe are kept (a GOP: the output asks the
processor for a keyframe every gop) and decoded on demand, each unit at most once: picture() runs
the units added since it last ran through one decoder per GOP. Past MAX_UNITS the GOP is too long
to keep: nothing is kept until the next keyframe (and the output holds instead of repeating, if
a gap comes then).

Units the output let go (the processor's frames made from repeats of the last keyframe, sent to
keep it fed) are kept too, since the units after them refer to them, but their pictures are not
the output's: the picture is that of the last unit shown, from the GOP before if the current
one has shown none yet.
"""

from __future__ import annotations

import threading
from typing import cast

import av
from av.error import InvalidDataError
from av.video.codeccontext import VideoCodecContext

# Access units kept since the last keyframe: 5 s at 30 fps, ~1 MB at 2 Mbit/s.
MAX_UNITS = 150


class _Gop:
    """The units of one GOP, and the decoder that has been through the first `fed` of them."""

    def __init__(self, keyframe: bytes, shown: bool) -> None:
        self.units = [(keyframe, shown)]  # appended on the loop; read up to a length taken first
        self.lock = threading.Lock()  # one decoding thread at a time
        self.codec: VideoCodecContext | None = None
        self.fed = 0
        self.picture: av.VideoFrame | None = None

    def decode(self) -> av.VideoFrame | None:
        with self.lock:
            count = len(self.units)
            if self.codec is None:
                self.codec = cast(VideoCodecContext, av.CodecContext.create("h264", "r"))
            for unit, shown in self.units[self.fed : count]:
                try:
                    frames = self.codec.decode(av.Packet(unit))
                except InvalidDataError:
                    continue
                if frames and shown:
                    self.picture = frames[-1]
            self.fed = count
            return self.picture


class LastPicture:
    """add() each access unit as it is remuxed (on the loop); picture() gives the newest picture
    of those added so far (on any one thread at a time: it decodes)."""

    def __init__(self, max_units: int = MAX_UNITS) -> None:
        self.max_units = max_units
        self._gop: _Gop | None = None  # None while waiting for a keyframe
        self._shown: _Gop | None = None  # the GOP of the last unit shown

    @property
    def kept(self) -> int:
        """Units kept: the GOP so far."""
        gop = self._gop
        return len(gop.units) if gop is not None else 0

    def add(self, unit: bytes, keyframe: bool, shown: bool = True) -> None:
        """An access unit came back; `shown`: the output has it (False: let go, a repeat)."""
        gop = self._gop
        if keyframe:
            self._gop = _Gop(unit, shown)
        elif gop is not None and len(gop.units) < self.max_units:
            gop.units.append((unit, shown))
        else:
            self._gop = None  # no keyframe yet, or the GOP is too long to keep
        if shown:
            self._shown = self._gop

    def picture(self) -> av.VideoFrame | None:
        """The picture of the last unit shown (None: none decodes, or none is kept)."""
        shown = self._shown
        return shown.decode() if shown is not None else None
