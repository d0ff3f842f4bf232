"""Transcoder end to end: clips published live on the embedded trickle server, the output read back
with a real Subscriber and decoded."""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import pairwise

import av
import pytest

from relay_server.media.encoder import EncoderSettings
from relay_server.media.output import Policy
from relay_server.media.scaler import ScaleMode
from relay_server.media.transcoder import Transcoder
from relay_server.trickle import Publisher, Subscriber
from relay_server.trickle.server import TrickleServer
from tests.media.clips import Clip, ClipSpec, make_clip, publish_segments, read_index, take
from tests.media.test_decoder import damaged_payload
from tests.media.test_output import read_segments
from tests.media.test_segmenter import decode

TIMEOUT = 20.0
GOP = 1.0  # output seconds per segment: 2–3 s clips fit the server's ring of 5 segments
OURS = ("decoder transcoder", "output-encode")  # thread names
OUR_TASKS = ("feed transcoder", "segment-sink", "segment-close")


@pytest.fixture(autouse=True)
def nothing_left() -> Iterator[None]:
    yield
    assert not [t.name for t in threading.enumerate() if t.name.startswith(OURS)]


def assert_no_tasks_left() -> None:
    assert not [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith(OUR_TASKS)]


@dataclass
class Output:
    segments: list[bytes]
    pts: list[int]  # video, all segments decoded as one stream
    indices: list[int]  # the frame index each output picture shows
    sizes: set[tuple[int, int]]
    audio_pts: list[int]


def read_output(segments: list[bytes], content: tuple[int, int] | None = None) -> Output:
    pts, indices, sizes = [], [], set()
    with av.open(io.BytesIO(b"".join(segments)), "r", format="mpegts") as container:
        for frame in container.decode(video=0):
            assert frame.pts is not None
            pts.append(frame.pts)
            indices.append(read_index(frame, *content) if content else read_index(frame))
            sizes.add((frame.width, frame.height))
    audio_pts = [pts for data in segments for pts in decode(data).audio_pts]
    return Output(segments, pts, indices, sizes, audio_pts)


def input_audio_pts(clip: Clip) -> list[int]:
    with av.open(io.BytesIO(clip.data), "r", format="mpegts") as container:
        return [p.pts for p in container.demux(audio=0) if p.size and p.pts is not None]


async def transcode(
    server: TrickleServer,
    segments: tuple[bytes, ...],
    *,
    width: int = 512,
    height: int = 512,
    mode: ScaleMode = ScaleMode.LETTERBOX,
    drop_audio: bool = False,
) -> tuple[Transcoder, list[bytes]]:
    """Publish `segments` live on an input channel while a Transcoder (Policy.BLOCK) runs to the
    input's end; return it and the output channel's segments."""
    in_url, out_url = server.channel_url("in"), server.channel_url("out")
    async with Publisher(in_url) as source, Publisher(out_url) as output:
        writer = await source.segment()
        await server.wait_until(lambda: server.snapshot("in") is not None)
        async with Subscriber(in_url, start_seq=0) as subscriber:
            transcoder = Transcoder(
                take(subscriber, len(segments)),
                output,
                width=width,
                height=height,
                mode=mode,
                encoder=EncoderSettings(gop=GOP),
                drop_audio=drop_audio,
                policy=Policy.BLOCK,
            )
            running = asyncio.create_task(transcoder.run())
            await publish_segments(source, writer, segments)
            await asyncio.wait_for(running, TIMEOUT)
        received = await asyncio.wait_for(read_segments(out_url, transcoder.stats.sink.segments), TIMEOUT)
    assert_no_tasks_left()
    return transcoder, received


def describe(spec: ClipSpec) -> str:
    return f"{spec.fps}fps-bf{spec.b_frames}-{spec.audio or 'silent'}"


@pytest.mark.parametrize(
    "spec",
    [
        ClipSpec(512, 512, fps=30, frames=90, gop=30, audio="aac"),
        ClipSpec(512, 512, fps=25, frames=75, gop=25, b_frames=2, audio="aac"),
        ClipSpec(512, 512, fps=30, frames=60, gop=15, b_frames=3),
    ],
    ids=describe,
)
async def test_every_frame_and_audio_packet_comes_through(
    trickle_server: TrickleServer, spec: ClipSpec
) -> None:
    clip = make_clip(spec)
    transcoder, segments = await transcode(trickle_server, clip.segments)
    out = read_output(segments)
    stats = transcoder.stats

    # Frames in = frames out, each with its input timestamp, in order, with no gap.
    assert stats.frames_in == stats.frames_out == spec.frames
    assert out.pts == list(clip.video_pts)
    assert out.indices == list(range(spec.frames))
    assert {b - a for a, b in pairwise(out.pts)} == {90_000 // spec.fps}
    # One segment per GOP of media time, each starting on a keyframe and decoding alone.
    assert len(segments) == round(spec.frames / spec.fps / GOP)
    for data in segments:
        alone = decode(data)
        assert alone.keyframes[0] and alone.video_pts
    # Audio: every packet, at its input timestamp, so drift against the video is nil.
    if spec.audio is None:
        assert out.audio_pts == []
    else:
        audio_in = input_audio_pts(clip)
        assert len(audio_in) == clip.audio_packets == stats.decoder.audio_packets
        # AAC's priming packet plays before the first video frame, where there is no segment
        # yet: the segmenter drops that (by design, counted); every later packet comes through.
        expected = [pts for pts in audio_in if pts >= clip.video_pts[0]]
        assert stats.segmenter.audio_dropped == len(audio_in) - len(expected) <= 1
        assert out.audio_pts == expected and stats.segmenter.audio_packets == len(expected)
        frame = 90_000 // spec.fps
        assert abs((out.audio_pts[0] - out.pts[0]) - (expected[0] - clip.video_pts[0])) < frame
        assert abs((out.audio_pts[-1] - out.pts[-1]) - (expected[-1] - clip.video_pts[-1])) < frame
    assert stats.audio_skipped == 0
    assert stats.decoder.corrupt_packets == stats.decoder.damaged_frames == 0
    assert stats.pipeline.frames_dropped == 0 and stats.sink.failed == 0
    assert stats.implementation in ("cython", "python") and stats.elapsed > 0


async def test_audio_can_be_dropped(trickle_server: TrickleServer) -> None:
    clip = make_clip(ClipSpec(512, 512, fps=30, frames=60, gop=30, audio="aac"))
    transcoder, segments = await transcode(trickle_server, clip.segments, drop_audio=True)
    assert {decode(data).audio_streams for data in segments} == {0}
    assert transcoder.stats.frames_out == 60
    assert transcoder.stats.decoder.audio_packets == 0  # not even demuxed


async def test_720p_is_letterboxed_into_512(trickle_server: TrickleServer) -> None:
    clip = make_clip(ClipSpec(1280, 720, fps=30, frames=60, gop=15, audio="aac"))
    transcoder, segments = await transcode(trickle_server, clip.segments, width=512, height=512)
    out = read_output(segments, content=(112, 288))  # 16:9 inside 512×512: bars above and below
    assert out.sizes == {(512, 512)}
    assert out.pts == list(clip.video_pts)
    assert out.indices == list(range(60))
    assert (transcoder.stats.decoder.width, transcoder.stats.decoder.height) == (1280, 720)


async def test_a_corrupt_segment_is_counted_and_the_session_goes_on(trickle_server: TrickleServer) -> None:
    clip = make_clip(ClipSpec(512, 512, fps=30, frames=60, gop=15, b_frames=2, audio="aac"))
    segments = list(clip.segments)
    assert len(segments) == 4
    segments[1] = damaged_payload(segments[1], seed=1)
    transcoder, received = await transcode(trickle_server, tuple(segments))
    out = read_output(received)
    stats = transcoder.stats

    assert stats.decoder.corrupt_packets + stats.decoder.damaged_frames > 0
    assert stats.frames_out == stats.frames_in
    assert all(b > a for a, b in pairwise(out.pts))
    shown = dict(zip(out.pts, out.indices, strict=True))
    for index in [*range(15), *range(30, 60)]:  # every frame outside the damaged segment
        assert shown.get(clip.video_pts[index]) == index, f"frame {index}"


async def test_stop_mid_stream_leaves_nothing_behind(trickle_server: TrickleServer) -> None:
    clip = make_clip(ClipSpec(512, 512, fps=30, frames=60, gop=15, audio="aac"))
    in_url, out_url = trickle_server.channel_url("in"), trickle_server.channel_url("out")
    threads_before = set(threading.enumerate())
    async with Publisher(in_url) as source:
        writer = await source.segment()
        await trickle_server.wait_until(lambda: trickle_server.snapshot("in") is not None)
        # Both channels by URL: the Transcoder makes (and closes) its Subscriber and Publisher.
        transcoder = Transcoder(in_url, out_url, width=512, height=512, encoder=EncoderSettings(gop=GOP))
        running = asyncio.create_task(transcoder.run())

        def reading() -> bool:
            snapshot = trickle_server.snapshot("in")
            return snapshot is not None and any(s.readers for s in snapshot.segments.values())

        await trickle_server.wait_until(reading, TIMEOUT)
        # Two segments, then the input goes quiet, still open.
        await publish_segments(source, writer, clip.segments[:2])

        def output_started() -> bool:
            snapshot = trickle_server.snapshot("out")
            return snapshot is not None and any(s.size for s in snapshot.segments.values())

        await trickle_server.wait_until(output_started, TIMEOUT)
        await asyncio.wait_for(transcoder.stop(), TIMEOUT)
        assert running.done()
        await running  # no error: stopping is not a failure
        await transcoder.stop()  # again: a no-op

    stats = transcoder.stats
    assert 0 < stats.frames_out <= 30
    assert stats.sink.segments >= 1  # the segment in progress was ended, not dropped
    assert set(threading.enumerate()) <= threads_before
    assert_no_tasks_left()


async def test_stop_before_run() -> None:
    transcoder = Transcoder("http://127.0.0.1:9/in", "http://127.0.0.1:9/out", width=64, height=64)
    await transcoder.stop()
    await transcoder.run()  # returns at once
    assert transcoder.stats.frames_in == 0
    with pytest.raises(RuntimeError, match="runs once"):
        await transcoder.run()
