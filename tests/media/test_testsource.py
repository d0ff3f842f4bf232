"""The synthetic live source produces trickle-style segments: one GOP each, continuous timestamps."""

from __future__ import annotations

import io

import av
import pytest

from relay_server.media.testsource import PatternFrames, pattern_segments


def _decode(data: bytes) -> list[av.VideoFrame]:
    with av.open(io.BytesIO(data), format="mpegts") as container:
        return list(container.decode(video=0))


@pytest.mark.parametrize(("fps", "size"), [(30, (512, 512)), (25, (1280, 720))])
def test_segments_are_self_contained_gops_with_continuous_pts(fps: int, size: tuple[int, int]) -> None:
    width, height = size
    segments = list(pattern_segments(width, height, fps, segment_seconds=1.0, frames=fps * 3))
    assert len(segments) == 3
    step = 90_000 // fps
    expected_pts = 0
    for data in segments:
        frames = _decode(data)  # each segment decodes on its own
        assert len(frames) == fps
        assert frames[0].key_frame
        assert (frames[0].width, frames[0].height) == (width, height)
        assert [f.pts for f in frames] == list(range(expected_pts, expected_pts + fps * step, step))
        expected_pts += fps * step


def test_pattern_moves_and_rejects_odd_sizes() -> None:
    pattern = PatternFrames(64, 32)
    first, second = (pattern.frame(i).to_ndarray() for i in (0, 1))
    assert (first != second).any()
    with pytest.raises(ValueError, match="even sizes"):
        PatternFrames(63, 32)
