"""Effects and prompt parsing, on frames directly (no WebRTC)."""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest

from relay_server.processor.effects import Chain, PromptError, effect_of, parse_prompts
from tests.processor.client import BRIGHT, DARK, HEIGHT, WIDTH, U, V, pattern, planes


def test_invert_grayscale_edges_keep_size_and_pts() -> None:
    source = pattern(3)
    source.time_base = Fraction(1, 90_000)
    for names in (["invert"], ["grayscale"], ["edges"], ["invert", "grayscale"]):
        out = Chain(names)(source)
        assert (out.width, out.height, out.format.name) == (WIDTH, HEIGHT, "yuv420p")
        assert (out.pts, out.time_base) == (source.pts, source.time_base)
    y, u, v = planes(Chain(["invert"])(source))
    assert y[20:, 0].tolist() == [255 - DARK] * (HEIGHT - 20)
    assert y[20:, -1].tolist() == [255 - BRIGHT] * (HEIGHT - 20)
    assert (int(u.mean()), int(v.mean())) == (255 - U, 255 - V)
    y, u, v = planes(Chain(["grayscale"])(source))
    assert int(y[20:, 0].mean()) == DARK and u.min() == u.max() == v.min() == v.max() == 128
    y, _, _ = planes(Chain(["edges"])(source))
    # The only contour below the moving box is the vertical boundary between the halves.
    assert y[20:, WIDTH // 2].min() > 200 and y[20:, : WIDTH // 2 - 1].max() == 0


def test_passthrough_returns_the_frame() -> None:
    source = pattern(0)
    assert Chain([])(source) is source
    assert Chain(["passthrough"]).is_passthrough


def test_prompt_mapping() -> None:
    assert effect_of("ImageInvert") == "invert"
    assert effect_of("GreyscaleNode") == "grayscale"
    assert effect_of("CannyEdgePreprocessor") == "edges"
    assert effect_of("KSampler") is None
    graph = {
        "2": {"class_type": "ImageInvert", "inputs": {}},
        "1": {"class_type": "LoadTensor", "inputs": {}},
        "10": {"class_type": "SaveTensor", "inputs": {"images": ["2", 0]}},
    }
    assert parse_prompts([graph]) == ["passthrough", "invert", "passthrough"]
    assert parse_prompts(graph) == parse_prompts([graph])


@pytest.mark.parametrize(
    "prompts",
    [[{"text": "a cat"}], [], "invert", [{"1": {"class_type": "KSampler", "inputs": {}}}], [{"1": {}}]],
)
def test_invalid_prompts(prompts: object) -> None:
    with pytest.raises(PromptError):
        parse_prompts(prompts)


def test_odd_sizes_and_other_formats() -> None:
    frame = av.VideoFrame.from_ndarray(np.full((31, 33, 3), 10, np.uint8), format="rgb24")
    out = Chain(["invert"])(frame)
    assert (out.width, out.height, out.format.name) == (33, 31, "yuv420p")
