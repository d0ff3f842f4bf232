"""frames_published: the video frames the output holds, whichever path made them."""

from __future__ import annotations

import io

import av
import pytest

from relay_server.session.paths import VideoMode
from relay_server.trickle.server import TrickleServer
from tests.media.clips import ClipSpec, make_clip
from tests.session.test_passthrough import relayed
from tests.session.test_relay import SIZE

CLIP = ClipSpec(width=SIZE, height=SIZE, frames=45, gop=15)


def frames_in(segments: list[bytes]) -> int:
    """The video packets the output's segments hold, each segment demuxed on its own."""
    count = 0
    for data in segments:
        with av.open(io.BytesIO(data), format="mpegts") as container:
            count += sum(1 for packet in container.demux(video=0) if packet.size)
    return count


@pytest.mark.parametrize("mode", [VideoMode.PASSTHROUGH, VideoMode.TRANSCODE])
async def test_frames_published_are_the_frames_in_the_output(
    trickle_server: TrickleServer, mode: VideoMode
) -> None:
    stats, segments = await relayed(trickle_server, [make_clip(CLIP)], video_mode=mode)
    published = frames_in(segments)
    assert published > CLIP.frames // 2
    assert stats.frames_published == published
    if mode is VideoMode.PASSTHROUGH:  # remuxed: what the relay encoded is at most the fill
        assert stats.paths.output == "remux"
        assert stats.frames_encoded <= stats.frames_filled < published
    else:
        assert stats.frames_encoded == published
