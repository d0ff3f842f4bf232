"""Zero-transcode: the input's H.264 forwarded to a real processor, its H.264 remuxed to the output.

The processor is the embedded one in passthrough: it decodes what it is sent and encodes what it
returns (aiortc's stock H.264), so output frames match their input frames up to that lossy
re-encode. It queues its input as ComfyStream does (by default it keeps only the newest of
frames that arrive together, which a busy test machine makes happen). Frames are matched by the
index drawn in their pixels (tests/media/clips.py).
"""

from __future__ import annotations

import asyncio
import io
import itertools
import threading
from collections.abc import Callable

import av
import numpy as np
import pytest

from relay_server.backoff import Backoff
from relay_server.media.encoder import EncoderSettings
from relay_server.processor import Knobs, ProcessorServer
from relay_server.session.paths import NotQualified, VideoMode
from relay_server.session.relay import Relay, RelayStats
from relay_server.trickle import Publisher
from relay_server.trickle.server import TrickleServer
from relay_server.webrtc import LinkSettings
from tests.media.clips import Clip, ClipSpec, make_clip, read_index
from tests.session.test_relay import OUR_THREADS, SIZE, publish_live, session

FIFO = Knobs(queue=16)
PSNR_MIN = 35.0  # dB, as the processor's own re-encode allows
QUALIFIES = ClipSpec(width=SIZE, height=SIZE, frames=90, gop=15)
SMALLER = ClipSpec(width=640, height=360, frames=30, gop=15)
B_FRAMES = ClipSpec(width=SIZE, height=SIZE, frames=60, gop=15, b_frames=2)


def decoded(data: bytes) -> list[av.VideoFrame]:
    with av.open(io.BytesIO(data), format="mpegts") as container:
        return list(container.decode(video=0))


def psnr(a: av.VideoFrame, b: av.VideoFrame) -> float:
    x = a.to_ndarray(format="gray").astype(np.float64)
    y = b.to_ndarray(format="gray").astype(np.float64)
    mse = float(np.mean((x - y) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def by_index(frames: list[av.VideoFrame]) -> dict[int, av.VideoFrame]:
    return {read_index(frame): frame for frame in frames}


def accounted(drops: dict[str, int]) -> int:
    """Frames the relay let go, for latency or to resume at a keyframe (never bad input here)."""
    assert drops["input_corrupt"] == 0
    return sum(count for reason, count in drops.items() if reason != "audio_not_carried")


def check_output(segments: list[bytes]) -> list[av.VideoFrame]:
    """Every segment starts on a keyframe and, but the last, spans about a gop at most (the
    processor is asked for a keyframe when one runs past it); the whole output decodes with
    increasing timestamps."""
    gop = EncoderSettings().gop
    for data in segments:
        with av.open(io.BytesIO(data), format="mpegts") as container:
            packets = [p for p in container.demux(video=0) if p.size]
        assert packets and packets[0].is_keyframe
        span = (packets[-1].pts - packets[0].pts) / 90_000
        assert span < gop + 0.5, f"a {span:.2f} s segment"
    frames = decoded(b"".join(segments))
    assert all(b.pts > a.pts for a, b in itertools.pairwise(frames))
    return frames


async def relayed(
    server: TrickleServer,
    clips: list[Clip],
    *,
    knobs: Knobs = FIFO,
    after_each: Callable[[Relay], None] = lambda relay: None,
    behind: float = 0.0,
    **options: object,
) -> tuple[RelayStats, list[bytes]]:
    """`clips` published live one after the other on a relay's input (the first `behind` seconds
    at once), through the embedded processor: the relay's stats and its output segments once the
    input has ended."""
    async with ProcessorServer(knobs=knobs) as processor, session(server, processor.url, **options) as s:
        for index, clip in enumerate(clips):
            await publish_live(s.source, clip, behind if index == 0 else 0.0)
            after_each(s.relay)
        await s.source.close()
    return s.relay.stats, s.output.segments


async def test_passthrough_forwards_and_remuxes_without_decoding_or_encoding(
    trickle_server: TrickleServer,
) -> None:
    clip = make_clip(QUALIFIES)
    stats, segments = await relayed(trickle_server, [clip], video_mode=VideoMode.PASSTHROUGH)
    assert (stats.paths.send, stats.paths.output) == ("forward", "remux")
    assert "512x512" in stats.paths.send_reason and stats.paths.switches == 0
    # Nothing decoded or encoded by the relay: every input unit went out as it was.
    assert stats.decoder.frames == 0 and stats.decoder.forwarded == QUALIFIES.frames
    assert stats.encoder.frames == 0 and stats.link.encoder.frames == 0
    assert stats.link.send.forwarded >= QUALIFIES.frames - stats.units_dropped
    frames = check_output(segments)
    inputs = by_index(decoded(clip.data))
    outputs = by_index(frames)
    assert len(outputs) >= QUALIFIES.frames - 2  # the processor's jitter buffer may keep the last
    scores = [psnr(outputs[index], inputs[index]) for index in outputs]
    assert min(scores) >= PSNR_MIN, f"PSNR {min(scores):.1f} dB"


@pytest.mark.parametrize("mode", [VideoMode.PASSTHROUGH, VideoMode.TRANSCODE], ids=lambda mode: mode.value)
async def test_a_loopback_processor_returns_the_video_it_is_sent_undecoded(
    trickle_server: TrickleServer, mode: VideoMode
) -> None:
    """The loopback processor (a capacity bench's: it costs almost nothing) sends back the H.264 it
    gets, so forwarded and remuxed the output is the input picture for picture, with no
    re-encode anywhere; transcoded, it is the relay's own encode of it."""
    clip = make_clip(QUALIFIES)
    stats, segments = await relayed(trickle_server, [clip], knobs=Knobs(loopback=True), video_mode=mode)
    frames = check_output(segments)
    inputs = by_index(decoded(clip.data))
    outputs = by_index(frames)
    # Every frame, the last ones too: the relay ends once they were sent and came back.
    assert sorted(outputs) == list(range(QUALIFIES.frames))
    scores = [psnr(outputs[index], inputs[index]) for index in outputs]
    if mode is VideoMode.PASSTHROUGH:
        assert (stats.paths.send, stats.paths.output) == ("forward", "remux")
        assert scores == [float("inf")] * len(scores)
    else:
        assert min(scores) >= PSNR_MIN, f"PSNR {min(scores):.1f} dB"


async def test_the_processor_returns_at_the_bitrate_it_is_asked_for(trickle_server: TrickleServer) -> None:
    """No bandwidth estimate runs (it would ramp the processor's encoder from aiortc's 1 Mbit/s
    whatever the session's bitrate): the processor is asked for the bitrate, and the remuxed
    output, the processor's own video, has it."""
    clip = make_clip(QUALIFIES)
    seconds = QUALIFIES.frames / QUALIFIES.fps
    rates = {}
    for bitrate in (700_000, 2_800_000):
        link = LinkSettings(return_bitrate=bitrate)
        stats, segments = await relayed(trickle_server, [clip], video_mode=VideoMode.PASSTHROUGH, link=link)
        assert stats.paths.output == "remux"
        rates[bitrate] = 8 * sum(len(segment) for segment in segments) / seconds
    low, high = rates[700_000], rates[2_800_000]
    assert high > 2.5 * low, rates  # 4× asked for; the start, before the first request, is alike
    assert 0.5 * 700_000 < low < 1.5 * 700_000, rates


async def test_auto_falls_back_to_transcode_for_an_input_that_does_not_qualify(
    trickle_server: TrickleServer,
) -> None:
    stats, segments = await relayed(trickle_server, [make_clip(B_FRAMES)], video_mode=VideoMode.AUTO)
    assert stats.paths.send == "encode" and "B-frames" in stats.paths.send_reason
    assert stats.paths.output == "remux"  # the processor's H.264 is remuxed all the same
    assert stats.decoder.frames == B_FRAMES.frames and stats.decoder.forwarded == 0
    frames = check_output(segments)
    # Decoded B-frames come out of the decoder in bursts, and latest-wins lets some go (counted).
    assert len(by_index(frames)) + accounted(stats.drops) >= B_FRAMES.frames - 2


async def test_passthrough_fails_a_session_whose_input_does_not_qualify(
    trickle_server: TrickleServer,
) -> None:
    clip = make_clip(SMALLER)
    source = Publisher(trickle_server.channel_url("in"))
    await source.create_channel()
    async with ProcessorServer(knobs=FIFO) as processor:
        relay = Relay(
            trickle_server.channel_url("in"),
            trickle_server.channel_url("out"),
            processor.url,
            width=SIZE,
            height=SIZE,
            video_mode=VideoMode.PASSTHROUGH,
        )
        publishing = asyncio.create_task(publish_live(source, clip))
        try:
            with pytest.raises(NotQualified, match="640x360"):
                await asyncio.wait_for(relay.run(), 20)
        finally:
            publishing.cancel()
            await asyncio.gather(publishing, return_exceptions=True)
            await source.close()
    assert not [t.name for t in threading.enumerate() if t.name.startswith(OUR_THREADS)]


async def test_auto_switches_mid_stream_and_the_output_stays_valid(trickle_server: TrickleServer) -> None:
    """Qualifying, then another size, qualifying again, then B-frames, on one channel: forward →
    encode → forward → encode, switching at keyframes; the output decodes throughout."""
    parts: list[Clip] = [make_clip(QUALIFIES), make_clip(SMALLER), make_clip(QUALIFIES), make_clip(B_FRAMES)]
    reasons: list[str] = []
    stats, segments = await relayed(
        trickle_server,
        parts,
        video_mode=VideoMode.AUTO,
        after_each=lambda relay: reasons.append(relay.stats.paths.send_reason),
    )
    assert stats.paths.switches == 3 and stats.paths.send == "encode"
    assert "640x360" in reasons[1] and "B-frames" in stats.paths.send_reason
    assert stats.decoder.frames == SMALLER.frames + B_FRAMES.frames
    assert stats.decoder.forwarded == 2 * QUALIFIES.frames
    frames = check_output(segments)
    assert {(f.width, f.height) for f in frames} == {(SIZE, SIZE)}
    total = sum(clip.spec.frames for clip in parts)
    # Every input frame was sent or counted where it went; every frame that came back is in the
    # output (remuxed: nothing replaced), decodable.
    send = stats.link.send
    assert send.frames - send.repeated + accounted(stats.drops) == total
    # Every input frame came back: the last one too, let out by a repeat sent after it.
    assert len(frames) == total <= stats.frames_returned
    assert stats.decoder.corrupt_packets == stats.decoder.damaged_frames == 0


async def test_a_processor_that_returns_nothing_of_the_forwarded_input_gets_it_transcoded(
    trickle_server: TrickleServer,
) -> None:
    """The bitstream qualifies, but the processor (here one that drops every frame) returns
    nothing of it: the connection is lost, and from then on the input is decoded and encoded."""
    clip = make_clip(ClipSpec(width=SIZE, height=SIZE, frames=120, gop=15))
    impatient = LinkSettings(return_timeout=1.0, reconnect=Backoff(initial=0.1, attempts=100, jitter=0.0))
    silent = Knobs(drop_every=1)
    stats, _ = await relayed(trickle_server, [clip], knobs=silent, video_mode=VideoMode.AUTO, link=impatient)
    assert stats.paths.send == "encode" and stats.paths.switches == 1
    assert "returned nothing of the input sent as it is" in stats.paths.send_reason
    assert stats.link.losses >= 1 and stats.decoder.forwarded > 0 and stats.decoder.frames > 0


async def test_auto_with_a_frame_rate_cap_encodes_the_input(trickle_server: TrickleServer) -> None:
    clip = make_clip(QUALIFIES)
    capped = LinkSettings(max_fps=15)
    stats, _ = await relayed(trickle_server, [clip], video_mode=VideoMode.AUTO, link=capped)
    assert (stats.paths.send, stats.paths.output) == ("encode", "remux")
    assert "max_fps" in stats.paths.send_reason and stats.decoder.forwarded == 0
    assert stats.link.send.frames <= QUALIFIES.frames // 2 + 2  # 15 of the input's 30 fps


async def test_a_session_joining_mid_segment_catches_up_instead_of_lagging(
    trickle_server: TrickleServer,
) -> None:
    """The input is 0.7 s into its first segment when the relay reads it: 21 access units at once.
    None may be lost (they cannot be replaced by newer ones), and replaying them at media time
    would hold every later frame back by up to 0.7 s: the sender catches up instead."""
    clip = make_clip(ClipSpec(width=SIZE, height=SIZE, frames=90, gop=30))
    stats, segments = await relayed(trickle_server, [clip], video_mode=VideoMode.PASSTHROUGH, behind=0.7)
    assert stats.paths.send == "forward"
    # Every unit forwarded (and the last keyframe once more, at the end: it lets the last out).
    assert stats.units_dropped == 0
    assert stats.link.send.forwarded == clip.spec.frames + stats.link.send.repeated
    # Held back in all: each live frame by the input's own jitter at most (its bytes come in
    # pieces of a segment, not frame by frame), not the ~14 s a replay adds up to.
    assert stats.link.send.paced_seconds < 3.0, stats.link.send.paced_seconds
    assert len(check_output(segments)) >= clip.spec.frames - 1
