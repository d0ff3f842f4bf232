"""A frame index drawn into a picture's pixels, read back after scaling and lossy coding.

    code = IndexCode(1280, 720)              # the source's size
    code.draw(frame, 1234)                   # a yuv420p frame of that size, in place
    code.read(output_frame, ScaleMode.CROP)  # 1234, or None when the code cannot be trusted

The code is 24 big cells, 2 rows of 12, black (luma 16) or white (235), centred in the picture:
16 bits of index and a CRC-8 over them. It spans 90% of the picture's shorter side, so a crop to
any aspect between the source's and a square keeps all of it, and each cell is 54×64 source
pixels at 1280×720: about 22×26 after a letterbox to 512×512, 38×46 after a crop. The reader
maps the cells to the output frame by the same geometry as the relay's Scaler (centred, scaled
by the shorter fit for a letterbox, the longer one for a crop), averages the inner half of each
cell and gives up (None) when any cell is neither clearly dark nor clearly light, or the check
bits disagree: a frame it cannot read is never taken for another one. The CRC has a non-zero
final XOR, so neither an all-black nor an all-white band reads as an index.
"""

from __future__ import annotations

from dataclasses import dataclass

import av
import numpy as np

from relay_server.media.scaler import ScaleMode

INDEX_BITS = 16
CHECK_BITS = 8
ROWS, COLUMNS = 2, 12  # ROWS × COLUMNS = INDEX_BITS + CHECK_BITS cells
BLACK, WHITE = 16, 235  # limited-range luma
THRESHOLD = (BLACK + WHITE) / 2
# A cell whose mean luma is closer than this to THRESHOLD is unreadable (luma 76..175).
MARGIN = 50
SPAN = 0.9  # of the picture's shorter side: what the code spans horizontally
ASPECT = 64 / 54  # cell height / cell width
INDEX_MODULO = 1 << INDEX_BITS

assert ROWS * COLUMNS == INDEX_BITS + CHECK_BITS


def crc8(value: int) -> int:
    """CRC-8/ITU (poly 0x07, init 0, xorout 0x55) of `value`'s INDEX_BITS bits, big-endian bytes."""
    crc = 0
    for byte in value.to_bytes(INDEX_BITS // 8, "big"):
        crc ^= byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x07) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc ^ 0x55


def bits_of(index: int) -> list[int]:
    """The cells' bits, row by row: the index (least significant first), then its CRC."""
    value = index % INDEX_MODULO
    check = crc8(value)
    return [(value >> bit) & 1 for bit in range(INDEX_BITS)] + [
        (check >> bit) & 1 for bit in range(CHECK_BITS)
    ]


def index_of(bits: list[int]) -> int | None:
    """The index the cells' bits carry, or None when the check bits disagree."""
    value = sum(bit << position for position, bit in enumerate(bits[:INDEX_BITS]))
    check = sum(bit << position for position, bit in enumerate(bits[INDEX_BITS:]))
    return value if crc8(value) == check else None


@dataclass(frozen=True)
class Box:
    left: float
    top: float
    width: float
    height: float


class IndexCode:
    """The index code of a width×height source."""

    def __init__(self, width: int, height: int) -> None:
        self.width = width
        self.height = height
        cell_w = SPAN * min(width, height) / COLUMNS
        cell_w = 2 * int(cell_w // 2)  # even: the chroma under a cell is whole samples
        cell_h = 2 * round(cell_w * ASPECT / 2)
        if cell_w < 4 or ROWS * cell_h > height:
            raise ValueError(f"{width}x{height} is too small for the index code")
        self.cell_w, self.cell_h = cell_w, cell_h
        self.left = 2 * ((width - COLUMNS * cell_w) // 4)
        self.top = 2 * ((height - ROWS * cell_h) // 4)

    def cells(self) -> list[Box]:
        """Each cell's box in source pixels, in bit order."""
        return [
            Box(self.left + column * self.cell_w, self.top + row * self.cell_h, self.cell_w, self.cell_h)
            for row in range(ROWS)
            for column in range(COLUMNS)
        ]

    # -- drawing ----------------------------------------------------------------------------------

    def draw_luma(self, luma: np.ndarray, index: int) -> None:
        """Draw into a height×width (or wider: a plane with padding) luma array, in place."""
        for bit, box in zip(bits_of(index), self.cells(), strict=True):
            top, left = int(box.top), int(box.left)
            luma[top : top + self.cell_h, left : left + self.cell_w] = WHITE if bit else BLACK

    def draw(self, frame: av.VideoFrame, index: int) -> av.VideoFrame:
        """Draw into a yuv420p frame of the source's size, in place (chroma neutral under the code)."""
        if (frame.width, frame.height) != (self.width, self.height) or frame.format.name != "yuv420p":
            raise ValueError(
                f"expected a {self.width}x{self.height} yuv420p frame, got"
                f" {frame.width}x{frame.height} {frame.format.name}"
            )
        planes = [_view(plane) for plane in frame.planes]
        self.draw_luma(planes[0], index)
        top, left = self.top // 2, self.left // 2
        bottom, right = top + ROWS * self.cell_h // 2, left + COLUMNS * self.cell_w // 2
        for chroma in planes[1:]:
            chroma[top:bottom, left:right] = 128
        return frame

    # -- reading ----------------------------------------------------------------------------------

    def read(self, frame: av.VideoFrame, mode: ScaleMode = ScaleMode.LETTERBOX) -> int | None:
        """The index in `frame` (the source scaled to any size by `mode`), or None if unreadable."""
        if frame.format.name not in ("yuv420p", "yuvj420p", "yuv422p", "yuv444p", "gray"):
            frame = frame.reformat(format="yuv420p")  # 10-bit and others: 8-bit luma to read
        luma = _view(frame.planes[0])[: frame.height, : frame.width]
        return self.read_luma(luma, mode)

    def read_luma(self, luma: np.ndarray, mode: ScaleMode = ScaleMode.LETTERBOX) -> int | None:
        means = self.cell_means(luma, mode)
        if means is None or np.any(np.abs(means - THRESHOLD) < MARGIN):
            return None
        return index_of([int(mean > THRESHOLD) for mean in means])

    def cell_means(self, luma: np.ndarray, mode: ScaleMode = ScaleMode.LETTERBOX) -> np.ndarray | None:
        """Mean luma of the inner half of each cell in a scaled picture (None: a cell is off it)."""
        out_h, out_w = luma.shape
        fit = min if mode is ScaleMode.LETTERBOX else max
        scale = fit(out_w / self.width, out_h / self.height)
        offset_x = (out_w - self.width * scale) / 2
        offset_y = (out_h - self.height * scale) / 2
        means = []
        for box in self.cells():
            x0 = offset_x + (box.left + box.width / 4) * scale
            y0 = offset_y + (box.top + box.height / 4) * scale
            x1 = x0 + box.width * scale / 2
            y1 = y0 + box.height * scale / 2
            left, top, right, bottom = (
                round(x0),
                round(y0),
                max(round(x1), round(x0) + 1),
                max(round(y1), round(y0) + 1),
            )
            if left < 0 or top < 0 or right > out_w or bottom > out_h:
                return None
            means.append(float(luma[top:bottom, left:right].mean()))
        return np.array(means)


def _view(plane: av.video.plane.VideoPlane) -> np.ndarray:
    """A plane's pixels as a writable (rows, line_size) array: no copy."""
    return np.frombuffer(memoryview(plane), np.uint8).reshape(-1, plane.line_size)
