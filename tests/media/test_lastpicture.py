"""LastPicture: the last GOP of a remuxed stream kept, and decoded to its last picture on demand."""

from __future__ import annotations

import av
import numpy as np

from relay_server.media.h264 import is_idr
from relay_server.media.lastpicture import LastPicture
from tests.media.clips import pattern, read_index


def encoded(frames: int, gop: int) -> list[bytes]:
    """Access units of a real x264 stream (zerolatency, Annex B) of the index pattern."""
    codec = av.CodecContext.create("libx264", "w")
    codec.width, codec.height, codec.pix_fmt = 256, 256, "yuv420p"
    codec.time_base = av.time_base  # type: ignore[assignment]
    codec.gop_size = gop
    codec.options = {"preset": "ultrafast", "tune": "zerolatency", "threads": "1", "sc_threshold": "0"}
    units: list[bytes] = []
    for index in range(frames):
        frame = pattern(256, 256, index)
        frame.pts = index
        units += [bytes(packet) for packet in codec.encode(frame)]
    units += [bytes(packet) for packet in codec.encode(None)]
    return units


def test_the_last_picture_is_decoded_from_the_last_gop() -> None:
    units = encoded(25, gop=10)
    pictures = LastPicture()
    for unit in units:
        pictures.add(unit, is_idr(unit))
    assert pictures.kept == 5  # frames 20..24: the GOP that began at 20
    picture = pictures.picture()
    assert picture is not None and read_index(picture) == 24
    # The same pixels a decoder of the whole stream ends with.
    whole = av.CodecContext.create("h264", "r")
    last = [f for unit in [*units, None] for f in whole.decode(av.Packet(unit) if unit else None)][-1]
    assert np.array_equal(picture.to_ndarray(), last.to_ndarray())


def test_each_unit_is_decoded_once_as_pictures_are_asked_for() -> None:
    """The output decodes returned units one by one while it waits for a keyframe: each call
    goes through the units added since the last, not the whole GOP again."""
    units = encoded(30, gop=30)
    pictures = LastPicture()
    decoded = []
    for unit in units:
        pictures.add(unit, is_idr(unit))
        picture = pictures.picture()
        assert picture is not None
        decoded.append(read_index(picture))
    assert decoded == list(range(30))
    gop = pictures._gop
    assert gop is not None and gop.fed == len(gop.units) == 30


def test_nothing_is_kept_before_a_keyframe_or_past_the_limit() -> None:
    units = encoded(30, gop=30)
    pictures = LastPicture(max_units=8)
    for unit in units[1:5]:  # no keyframe yet
        pictures.add(unit, is_idr(unit))
    assert pictures.kept == 0 and pictures.picture() is None
    for unit in units:
        pictures.add(unit, is_idr(unit))
    assert pictures.kept == 0  # a 30-frame GOP is longer than 8 units: let go
    pictures.add(units[0], True)
    assert pictures.kept == 1


def test_units_the_output_let_go_are_decoded_but_not_shown() -> None:
    """A repeat of the last keyframe comes back, is let go by the output, and the units after it
    refer to it: it is decoded with them, but the picture stays the last one shown, also while
    the repeat begins a GOP of its own."""
    units = encoded(20, gop=10)
    pictures = LastPicture()
    for unit in units[:15]:
        pictures.add(unit, is_idr(unit))
    pictures.add(units[10], True, shown=False)  # frame 10's keyframe again, not shown
    picture = pictures.picture()
    assert picture is not None and read_index(picture) == 14
    for unit in units[:5]:  # a GOP whose keyframe was let go, then shown frames
        pictures.add(unit, is_idr(unit), shown=unit is not units[0])
    picture = pictures.picture()
    assert picture is not None and read_index(picture) == 4
