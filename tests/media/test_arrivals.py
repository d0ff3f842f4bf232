"""VideoArrivals: every video frame's PTS, read off an MPEG-TS byte stream as it comes in."""

from __future__ import annotations

import pytest

from relay_server.media.arrivals import TS_PACKET, VideoArrivals
from tests.media.clips import ClipSpec, make_clip

B_FRAMES_WITH_AUDIO = ClipSpec(frames=45, gop=15, b_frames=2, audio="aac")


def scan(data: bytes, chunk: int) -> tuple[list[tuple[int, float]], VideoArrivals]:
    seen: list[tuple[int, float]] = []
    arrivals = VideoArrivals(lambda pts, at: seen.append((pts, at)))
    for index, start in enumerate(range(0, len(data), chunk)):
        arrivals.feed(data[start : start + chunk], float(index))
    return seen, arrivals


@pytest.mark.parametrize("chunk", [1, 7, 188, 1000, 64 * 1024])
def test_every_frame_is_seen_once_in_stream_order_whatever_the_chunks(chunk: int) -> None:
    clip = make_clip(B_FRAMES_WITH_AUDIO)
    seen, arrivals = scan(clip.data, chunk)
    # Every frame, by its PTS, in the order the muxer wrote them (decode order: B-frames after
    # the frame they refer forward to), and no audio PES taken for video.
    assert sorted(pts for pts, _ in seen) == sorted(clip.video_pts)
    assert len(seen) == len(clip.video_pts) and arrivals.resyncs == 0
    # Each stamped with the chunk that completed the TS packet its header is in.
    first = clip.data.find(b"\x00\x00\x01\xe0")
    assert seen[0][1] == (first // TS_PACKET * TS_PACKET + TS_PACKET - 1) // chunk
    assert [at for _, at in seen] == sorted(at for _, at in seen)


def test_a_stream_off_its_packet_boundaries_is_found_again() -> None:
    clip = make_clip(ClipSpec(frames=30, gop=15))
    data = clip.data
    cut = 40 * TS_PACKET + 50  # a partial packet: the stream resumes on the next boundary after it
    broken = data[: 40 * TS_PACKET] + data[cut : cut + 100] + data[41 * TS_PACKET :]
    seen, arrivals = scan(broken, 4096)
    assert arrivals.resyncs >= 1
    assert len(seen) >= 28  # at most the frames whose headers were in the damaged stretch are missed
    assert {pts for pts, _ in seen} <= set(clip.video_pts)


def test_garbage_reports_nothing() -> None:
    seen, _ = scan(bytes(range(256)) * 400, 1000)
    assert seen == []
