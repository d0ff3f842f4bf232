"""LastPicture: the last GOP of a remuxed stream kept, and decoded to its last picture on demand."""

from __future__ import annotations

import av
import numpy as np

from relay_server.media.h264 import is_idr
from relay_server.media.lastpicture import LastPicture, decode_last
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
    kept = pictures.units()
    assert len(kept) == 5 and is_idr(kept[0])  # frames 20..24: the GOP that began at 20
    picture = decode_last(kept)
    assert picture is not None and read_index(picture) == 24
    # The same pixels a decoder of the whole stream ends with.
    whole = av.CodecContext.create("h264", "r")
    last = [f for unit in [*units, None] for f in whole.decode(av.Packet(unit) if unit else None)][-1]
    assert np.array_equal(picture.to_ndarray(), last.to_ndarray())


def test_nothing_is_kept_before_a_keyframe_or_past_the_limit() -> None:
    units = encoded(30, gop=30)
    pictures = LastPicture(max_units=8)
    for unit in units[1:5]:  # no keyframe yet
        pictures.add(unit, is_idr(unit))
    assert pictures.units() == []
    for unit in units:
        pictures.add(unit, is_idr(unit))
    assert pictures.units() == []  # a 30-frame GOP is longer than 8 units: let go
    assert decode_last([]) is None
    pictures.add(units[0], True)
    assert len(pictures.units()) == 1
    pictures.clear()
    assert pictures.units() == []
