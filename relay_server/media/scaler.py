"""Scaler: decoded frames to the session's size in yuv420p, keeping their aspect ratio.

One libavfilter graph (buffer → [crop] → scale → format=yuv420p → [pad] → buffersink) lives as long
as the input keeps its size and format. Its output frames come from libavfilter's buffer pools, so
the steady state allocates no frame memory.

Measured against frame.reformat() plus numpy padding/cropping into a fresh frame (bilinear both,
reformat on one thread too; median CPU per frame of 11×200 on the 2-core box):
    1280×720 → 512×512 letterbox   graph 0.40 ms   reformat 0.41 ms
    1280×720 → 512×512 crop        graph 0.25 ms   reformat 0.43 ms   (the graph crops first)
    1920×1080 → 1280×720           graph 1.23 ms   reformat 1.22 ms
    640×480 → 1280×720 letterbox   graph 0.28 ms   reformat 0.32 ms
    640×480 → 1280×720 crop        graph 0.27 ms   reformat 0.39 ms
With its default threads, reformat() takes less wall time on big frames but 5-90% more CPU.
"""

from __future__ import annotations

import enum
import logging
from fractions import Fraction

import av
from av.filter import Graph
from av.video.frame import PictureType

log = logging.getLogger(__name__)

OUTPUT_FORMAT = "yuv420p"
# Bilinear: 25% less CPU than libavfilter's default, bicubic, when shrinking 1280×720 to 512×512
# (0.44-0.50 ms against 0.61-0.66), about the same when enlarging; plenty for frames that go to a
# video model or an encoder.
SCALE_FLAGS = "bilinear"


class ScaleMode(enum.Enum):
    LETTERBOX = "letterbox"  # fit inside, black bars on two sides
    CROP = "crop"  # fill, the centre is kept


class Scaler:
    """Converts frames to width×height yuv420p (0×0: input size), reusing one filter graph.

    Output frames keep pts and time_base; pict_type is reset, because encoders obey the input's
    I/P/B decisions. Not thread-safe: call it from one thread (the decode thread).
    """

    def __init__(self, width: int = 0, height: int = 0, mode: ScaleMode = ScaleMode.LETTERBOX) -> None:
        self.size = _checked(width, height)  # one attribute: resize() may come from another thread
        self.mode = mode
        self.graphs_built = 0  # rebuilt when the input's size or format changes
        self._graph: Graph | None = None
        self._graph_input: tuple[int, int, str, Fraction | None, int, int] | None = None

    @property
    def width(self) -> int:
        return self.size[0]

    @property
    def height(self) -> int:
        return self.size[1]

    def resize(self, width: int, height: int) -> None:
        """Scale to width×height from the next frame on (any thread)."""
        self.size = _checked(width, height)

    def __call__(self, frame: av.VideoFrame) -> av.VideoFrame:
        width, height = self.size
        width, height = width or frame.width, height or frame.height
        if (frame.width, frame.height) == (width, height) and frame.format.name == OUTPUT_FORMAT:
            out = frame
        else:
            key = (frame.width, frame.height, frame.format.name, frame.time_base, width, height)
            if self._graph is None or key != self._graph_input:
                self._graph = self._build(frame, width, height)
                self._graph_input = key
            self._graph.vpush(frame)
            out = self._graph.vpull()
        out.pict_type = PictureType.NONE
        return out

    def _build(self, frame: av.VideoFrame, width: int, height: int) -> Graph:
        log.debug(
            "scaler: %dx%d %s → %dx%d %s (%s)",
            frame.width,
            frame.height,
            frame.format.name,
            width,
            height,
            OUTPUT_FORMAT,
            self.mode.value,
        )
        graph = Graph()
        graph.threads = 1  # the decode thread does the work; no helper threads per session
        chain = [
            graph.add_buffer(
                width=frame.width,
                height=frame.height,
                format=frame.format,
                time_base=frame.time_base or Fraction(1, 90_000),
            )
        ]
        for name, args in _filter_chain(frame.width, frame.height, width, height, self.mode):
            chain.append(graph.add(name, args))
        chain.append(graph.add("buffersink"))
        graph.link_nodes(*chain).configure()
        self.graphs_built += 1
        return graph


def _filter_chain(
    in_width: int, in_height: int, width: int, height: int, mode: ScaleMode
) -> list[tuple[str, str]]:
    """Filters (name, arguments) that take an in_width×in_height frame to width×height yuv420p."""
    if (in_width, in_height) == (width, height):
        return [("format", OUTPUT_FORMAT)]
    scale = f"flags={SCALE_FLAGS}"
    if mode is ScaleMode.CROP:
        # Crop the input to the output's aspect ratio first: scaling fewer pixels is cheaper.
        crop_width = min(in_width, max(2, _even(in_height * width / height)))
        crop_height = min(in_height, max(2, _even(in_width * height / width)))
        chain = []
        if (crop_width, crop_height) != (in_width, in_height):
            x, y = _even((in_width - crop_width) / 2), _even((in_height - crop_height) / 2)
            chain.append(("crop", f"{crop_width}:{crop_height}:{x}:{y}"))
        return [*chain, ("scale", f"{width}:{height}:{scale}"), ("format", OUTPUT_FORMAT)]
    factor = min(width / in_width, height / in_height)
    fitted_width = min(width, max(2, _even(in_width * factor)))
    fitted_height = min(height, max(2, _even(in_height * factor)))
    chain = [("scale", f"{fitted_width}:{fitted_height}:{scale}"), ("format", OUTPUT_FORMAT)]
    if (fitted_width, fitted_height) != (width, height):
        # Even offsets keep the chroma planes aligned with the luma; pad's "black" is Y=16 U=V=128.
        x, y = _even((width - fitted_width) / 2), _even((height - fitted_height) / 2)
        chain.append(("pad", f"{width}:{height}:{x}:{y}:black"))
    return chain


def _checked(width: int, height: int) -> tuple[int, int]:
    if width < 0 or height < 0 or (width == 0) != (height == 0):
        raise ValueError(f"size must be positive or 0x0 (keep), got {width}x{height}")
    if width % 2 or height % 2:
        raise ValueError(f"yuv420p needs even sizes, got {width}x{height}")
    return width, height


def _even(value: float) -> int:
    """The even number nearest to `value` (yuv420p planes need even sizes and offsets)."""
    return round(value / 2) * 2
