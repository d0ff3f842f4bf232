"""The frame-index code survives what the relay does to a frame, and refuses what it cannot read."""

from __future__ import annotations

import av
import numpy as np
import pytest

from bench.frameindex import (
    BLACK,
    CHECK_BITS,
    INDEX_BITS,
    INDEX_MODULO,
    WHITE,
    IndexCode,
    bits_of,
    index_of,
)
from bench.media import source_frames
from relay_server.media.encoder import VideoEncoder
from relay_server.media.scaler import ScaleMode, Scaler

SOURCE = (1280, 720)
INDICES = [0, 1, 2, 1000, 0x5555, 0xAAAA, INDEX_MODULO - 1, 12345]


def _coded(code: IndexCode, pictures: list[av.VideoFrame], index: int) -> av.VideoFrame:
    return code.draw(pictures[index % len(pictures)], index)


def _luma(frame: av.VideoFrame) -> np.ndarray:
    plane = frame.planes[0]
    return np.frombuffer(memoryview(plane), np.uint8).reshape(-1, plane.line_size)[
        : frame.height, : frame.width
    ]


def _through_relay(mode: ScaleMode) -> list[av.VideoFrame]:
    """INDICES drawn on 1280×720 camera-like frames → x264 at 1.5 Mbit/s → decode → scaled to
    512×512 by the relay's Scaler → x264 at 1.5 Mbit/s again (the WebRTC and output legs) → decode."""
    code = IndexCode(*SOURCE)
    pictures = source_frames(*SOURCE)
    source = VideoEncoder(*SOURCE, bitrate=1_500_000, threads=1)
    leg = VideoEncoder(512, 512, bitrate=1_500_000, threads=1)
    first, second = av.CodecContext.create("h264", "r"), av.CodecContext.create("h264", "r")
    scaler = Scaler(512, 512, mode)
    out = []
    for number, index in enumerate(INDICES):
        pts = number * 3000
        for packet in source.encode(_coded(code, pictures, index), pts):
            for frame in first.decode(packet):
                for again in leg.encode(scaler(frame), pts):
                    out += second.decode(again)
    assert len(out) == len(INDICES)
    return out


@pytest.mark.parametrize("mode", list(ScaleMode))
def test_the_index_survives_scaling_and_lossy_coding(mode: ScaleMode) -> None:
    code = IndexCode(*SOURCE)
    assert [code.read(frame, mode) for frame in _through_relay(mode)] == INDICES


def test_read_at_the_source_size() -> None:
    code = IndexCode(*SOURCE)
    pictures = source_frames(*SOURCE)
    for index in INDICES:
        assert code.read(_coded(code, pictures, index)) == index


def test_a_corrupted_code_reads_none_never_another_index() -> None:
    code = IndexCode(*SOURCE)
    frame = _coded(code, source_frames(*SOURCE), 4321)
    cells = code.cells()
    pristine = _luma(frame).copy()
    for cell in (0, 7, 15, 16, 23):  # index bits and check bits
        box = cells[cell]
        top, left = int(box.top), int(box.left)
        region = _luma(frame)[top : top + code.cell_h, left : left + code.cell_w]
        # Inverted: a wrong bit, which the check bits catch.
        region[:] = BLACK + WHITE - region
        assert code.read(frame) is None
        # Grey: neither black nor white.
        region[:] = 128
        assert code.read(frame) is None
        _luma(frame)[:] = pristine
        assert code.read(frame) == 4321


@pytest.mark.parametrize("luma", [BLACK, WHITE, 128])
def test_a_flat_band_is_no_index(luma: int) -> None:
    code = IndexCode(*SOURCE)
    assert code.read_luma(np.full((SOURCE[1], SOURCE[0]), luma, np.uint8)) is None


def test_a_frame_without_the_code_is_no_index() -> None:
    code = IndexCode(*SOURCE)
    for picture in source_frames(*SOURCE)[:5]:
        assert code.read(picture) is None


def test_every_single_bit_error_is_detected() -> None:
    for index in [0, 1, 0x00FF, 0xFFFF, 4321, 0x8000]:
        bits = bits_of(index)
        assert len(bits) == INDEX_BITS + CHECK_BITS
        assert index_of(bits) == index
        for flipped in range(len(bits)):
            wrong = list(bits)
            wrong[flipped] ^= 1
            assert index_of(wrong) is None


def test_indices_wrap_at_the_modulo() -> None:
    assert bits_of(INDEX_MODULO + 5) == bits_of(5)


def test_the_code_fits_inside_the_centre_square() -> None:
    """A crop to a square keeps the centre square of a wide source: the code lies inside it."""
    code = IndexCode(*SOURCE)
    width, height = SOURCE
    left = min(cell.left for cell in code.cells())
    right = max(cell.left + cell.width for cell in code.cells())
    assert (width - height) / 2 <= left and right <= (width + height) / 2
