"""Effects on yuv420p frames, and the mapping from ComfyUI-style prompts to them.

Effects work on the three planes with numpy and never convert to RGB (yuv420p→rgb24→yuv420p costs
about 4× the work of the effects themselves).

A prompt is a ComfyUI API-format graph, `{"<node id>": {"class_type": "...", "inputs": {...}}}`.
Each node whose class_type contains a keyword below (case-insensitive) adds its effect; nodes are
applied in node-id order, prompts in list order. Nodes that name nothing are allowed (a graph has
loaders, savers, …) as long as the whole graph names at least one effect.

    keyword                                         effect
    invert                                          invert (255 - x on every plane)
    grayscale, greyscale                            grayscale (chroma set to 128)
    edge, canny                                     edges (luma gradient magnitude, grey chroma)
    passthrough, noop, loadtensor, savetensor       passthrough (ComfyStream's noop workflow)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import av
import numpy as np
from av.video.frame import PictureType

Planes = tuple[np.ndarray, np.ndarray, np.ndarray]
Effect = Callable[[Planes], Planes]


class PromptError(ValueError):
    """A prompt that is not a ComfyUI API graph or that names no known effect."""


def _invert(planes: Planes) -> Planes:
    y, u, v = planes
    return 255 - y, 255 - u, 255 - v


def _grayscale(planes: Planes) -> Planes:
    y, u, _ = planes
    grey = np.full_like(u, 128)
    return y, grey, grey


def _edges(planes: Planes) -> Planes:
    y, u, _ = planes
    luma = y.astype(np.int16)
    gradient = np.zeros_like(luma)
    # |dx| + |dy| with one-pixel differences: cheap, and strong enough to see any contour.
    gradient[:, 1:] += np.abs(np.diff(luma, axis=1))
    gradient[1:, :] += np.abs(np.diff(luma, axis=0))
    np.clip(gradient * 2, 0, 255, out=gradient)
    grey = np.full_like(u, 128)
    return gradient.astype(np.uint8), grey, grey


EFFECTS: dict[str, Effect | None] = {
    "passthrough": None,
    "invert": _invert,
    "grayscale": _grayscale,
    "edges": _edges,
}

# Checked in order; the first keyword found in a class_type wins.
_KEYWORDS: tuple[tuple[str, str], ...] = (
    ("invert", "invert"),
    ("grayscale", "grayscale"),
    ("greyscale", "grayscale"),
    ("edge", "edges"),
    ("canny", "edges"),
    ("passthrough", "passthrough"),
    ("noop", "passthrough"),
    ("loadtensor", "passthrough"),
    ("savetensor", "passthrough"),
)


def effect_of(class_type: str) -> str | None:
    """The effect a node's class_type names, or None."""
    lowered = class_type.lower()
    return next((effect for keyword, effect in _KEYWORDS if keyword in lowered), None)


def _node_order(node_id: str) -> tuple[int, int | str]:
    # ComfyUI ids are numbers as strings: "10" comes after "9".
    return (0, int(node_id)) if node_id.isdigit() else (1, node_id)


def parse_prompt(prompt: Any) -> list[str]:
    """The effect names of one prompt, in node order; raises PromptError if it is not valid."""
    if not isinstance(prompt, dict) or not prompt:
        raise PromptError(f"a prompt must be a non-empty object of ComfyUI nodes, got {_short(prompt)}")
    names: list[str] = []
    for node_id in sorted(prompt, key=_node_order):
        node = prompt[node_id]
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
            raise PromptError(f"node {node_id!r} has no class_type: {_short(node)}")
        if not isinstance(node.get("inputs", {}), dict):
            raise PromptError(f"node {node_id!r}: inputs must be an object")
        name = effect_of(node["class_type"])
        if name is not None:
            names.append(name)
    if not names:
        known = ", ".join(sorted({keyword for keyword, _ in _KEYWORDS}))
        raise PromptError(f"the prompt names no known effect (class_type containing one of: {known})")
    return names


def parse_prompts(prompts: Any) -> list[str]:
    """Effect names of a list of prompts (a single prompt object is accepted as a list of one)."""
    if isinstance(prompts, dict):
        prompts = [prompts]
    if not isinstance(prompts, list) or not prompts:
        raise PromptError(f"prompts must be a non-empty list of prompt objects, got {_short(prompts)}")
    return [name for prompt in prompts for name in parse_prompt(prompt)]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class Chain:
    """Effects applied one after another to yuv420p frames. Stateless: safe on any thread."""

    def __init__(self, names: Sequence[str] = ()) -> None:
        unknown = [name for name in names if name not in EFFECTS]
        if unknown:
            raise PromptError(f"unknown effects: {unknown}")
        self.names = tuple(names)
        self._effects = [effect for name in names if (effect := EFFECTS[name]) is not None]

    @property
    def is_passthrough(self) -> bool:
        return not self._effects

    def __call__(self, frame: av.VideoFrame) -> av.VideoFrame:
        """A processed frame with the same size, pts and time_base (the input frame if passthrough)."""
        if not self._effects:
            frame.pict_type = PictureType.NONE  # encoders obey a decoded frame's I/P/B type
            return frame
        if frame.format.name != "yuv420p":
            frame = frame.reformat(format="yuv420p")
        planes = _read_planes(frame)
        for effect in self._effects:
            planes = effect(planes)
        out = av.VideoFrame(frame.width, frame.height, "yuv420p")
        _write_planes(out, planes)
        out.pts = frame.pts
        if frame.time_base is not None:
            out.time_base = frame.time_base
        return out


def _read_planes(frame: av.VideoFrame) -> Planes:
    views = []
    for plane in frame.planes:
        rows = np.frombuffer(memoryview(plane), np.uint8).reshape(-1, plane.line_size)
        views.append(rows[: plane.height, : plane.width])
    return views[0], views[1], views[2]


def _write_planes(frame: av.VideoFrame, planes: Planes) -> None:
    for plane, pixels in zip(frame.planes, planes, strict=True):
        rows = np.frombuffer(memoryview(plane), np.uint8).reshape(-1, plane.line_size)
        rows[: pixels.shape[0], : pixels.shape[1]] = pixels
