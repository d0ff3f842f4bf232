"""The processor against a real aiortc peer on loopback: effects, signaling, control, knobs."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Awaitable, Callable

import aiohttp
import numpy as np
import pytest
from aiortc.mediastreams import MediaStreamError
from aiortc.sdp import SessionDescription

from relay_server.processor import ProcessorServer
from tests.processor.client import BRIGHT, DARK, TICKS, WIDTH, Client, planes

MakeClient = Callable[..., Client]
MakeProcessor = Callable[..., Awaitable[ProcessorServer]]


def graph(class_type: str) -> dict[str, object]:
    return {"1": {"class_type": class_type, "inputs": {"strength": 1.0}}}


def halves(frame: object) -> tuple[float, float, float]:
    """Mean luma of the left and right halves (below the moving box) and mean chroma distance
    from grey: robust to lossy coding."""
    y, u, v = planes(frame)  # type: ignore[arg-type]
    left, right = y[24:, 8 : WIDTH // 2 - 8], y[24:, WIDTH // 2 + 8 : -8]
    chroma = float(np.abs(u.astype(int) - 128).mean() + np.abs(v.astype(int) - 128).mean())
    return float(left.mean()), float(right.mean()), chroma


@pytest.mark.parametrize(
    ("prompts", "left", "right", "colour"),
    [
        (None, DARK, BRIGHT, True),
        ([graph("ImageInvert")], 255 - DARK, 255 - BRIGHT, True),
        ([graph("Grayscale")], DARK, BRIGHT, False),
    ],
)
async def test_effects_come_back(
    processor: ProcessorServer, make_client: MakeClient, prompts: object, left: int, right: int, colour: bool
) -> None:
    client = make_client()
    status, _ = await client.offer(processor.url, prompts)
    assert status == 200
    frames = await client.frames(10)
    measured_left, measured_right, chroma = halves(frames[-1])
    assert abs(measured_left - left) < 12 and abs(measured_right - right) < 12
    assert (chroma > 40) if colour else (chroma < 6)
    # pts kept: the returned frames are spaced by whole 30 fps frames on the 90 kHz clock.
    stamps = [frame.pts or 0 for frame in frames]
    steps = [(b - a) % 2**32 for a, b in itertools.pairwise(stamps)]
    assert all(step > 0 and step % TICKS == 0 for step in steps), steps
    assert (frames[-1].width, frames[-1].height) == (WIDTH, WIDTH)


async def test_control_protocol(processor: ProcessorServer, make_client: MakeClient) -> None:
    client = make_client()
    assert (await client.offer(processor.url, [graph("ImageInvert")]))[0] == 200
    await client.frames(1)
    nodes = await client.request({"type": "get_nodes"})
    assert nodes == {
        "type": "nodes_info",
        "nodes": {
            "1": {"class_type": "ImageInvert", "inputs": {"strength": {"value": 1.0, "type": "float"}}}
        },
    }
    # No reply to an unknown type or invalid JSON: the next request's reply comes first.
    await client.send({"type": "no_such_thing"})
    await client.send("{not json")
    assert (await client.request({"type": "get_nodes"}))["type"] == "nodes_info"
    reply = await client.request({"type": "update_prompts", "prompts": [graph("Grayscale")]})
    assert reply == {"type": "prompts_updated", "success": True}
    assert processor.pipeline.chain.names == ("grayscale",)
    reply = await client.request({"type": "update_prompts", "prompts": [graph("A"), graph("B")]})
    assert reply["type"] == "prompts_updated" and reply["success"] is False and "match" in reply["error"]
    reply = await client.request({"type": "update_prompts", "prompts": [{"text": "a cat"}]})
    assert reply["success"] is False and reply["error"]
    reply = await client.request({"type": "update_resolution", "width": 320, "height": 240})
    assert reply == {"type": "resolution_updated", "success": True}
    for request, answer in [("pause", "paused"), ("resume", "resumed"), ("stop", "stopped")]:
        reply = await client.request({"type": f"{request}_prompts"})
        assert reply == {"type": f"prompts_{answer}", "success": True}
    assert processor.pipeline.prompts == []


@pytest.mark.parametrize(
    ("prompts", "message"),
    [([{"text": "a cat"}], "no class_type"), ([graph("KSampler")], "no known effect")],
)
async def test_invalid_prompt_is_500(
    processor: ProcessorServer, make_client: MakeClient, prompts: object, message: str
) -> None:
    status, text = await make_client().offer(processor.url, prompts)
    assert status == 500 and message in text


async def test_offer_without_h264_is_500(processor: ProcessorServer, make_client: MakeClient) -> None:
    status, text = await make_client(codec="video/VP8").offer(processor.url)
    assert status == 500 and "H.264" in text
    assert processor.peers == []


async def test_health_and_stats(processor: ProcessorServer, make_client: MakeClient) -> None:
    async with aiohttp.ClientSession() as http:
        for path in ("/health", "/live/health"):
            async with http.get(processor.url + path) as response:
                assert response.status == 200 and await response.text() == "OK"
        client = make_client()
        assert (await client.offer(processor.url))[0] == 200
        await client.frames(3)
        async with http.get(processor.url + "/streams/stats") as response:
            stats = await response.json()
    (track,) = stats.values()
    assert track["frames_out"] >= 3 and "fps" in track and "minute_avg_fps" in track


async def test_input_watchdog_ends_the_track(make_processor: MakeProcessor, make_client: MakeClient) -> None:
    processor = await make_processor(input_timeout=0.5)
    client = make_client()
    assert (await client.offer(processor.url))[0] == 200
    await client.frames(5)
    (track,) = processor.peers[0].tracks
    client.source.halt()
    await asyncio.wait_for(track.finished.wait(), 5)
    assert "no input frame" in track.end_reason
    # For good: the track stays ended though the connection is up.
    with pytest.raises(MediaStreamError):
        await track.recv()


async def test_rate_cap_keeps_latency_flat(make_processor: MakeProcessor, make_client: MakeClient) -> None:
    processor = await make_processor(max_fps=10)
    client = make_client()
    assert (await client.offer(processor.url))[0] == 200
    remote = await asyncio.wait_for(client.remote, 10)
    await asyncio.wait_for(remote.recv(), 10)
    lags: list[int] = []
    started = time.monotonic()
    for _ in range(20):
        frame = await asyncio.wait_for(remote.recv(), 5)
        lags.append(client.source.latest_pts - (frame.pts or 0))
    fps = 20 / (time.monotonic() - started)
    assert 8 <= fps <= 12.5, fps
    # The source's pts and the returned pts differ by constant RTP offsets: only changes count.
    drift = (np.median(lags[-5:]) - np.median(lags[:5])) % 2**32
    drift = drift if drift < 2**31 else drift - 2**32
    assert abs(drift) < 0.2 * 90_000, drift
    (track,) = processor.peers[0].tracks
    assert track.dropped_latest > 20


async def test_second_offer_replaces_prompts_and_stop_closes_peers(
    make_processor: MakeProcessor, make_client: MakeClient
) -> None:
    processor = await make_processor()
    first, second = make_client(), make_client()
    assert (await first.offer(processor.url, [graph("ImageInvert")]))[0] == 200
    assert (await second.offer(processor.url, [graph("Grayscale")]))[0] == 200
    assert processor.pipeline.chain.names == ("grayscale",)
    await first.frames(2)
    await second.frames(2)
    peers = list(processor.peers)
    assert len(peers) == 2
    await processor.stop()
    assert processor.peers == [] and all(peer.pc.connectionState == "closed" for peer in peers)


async def test_knobs_drop_and_delay(make_processor: MakeProcessor, make_client: MakeClient) -> None:
    processor = await make_processor(drop_every=2, delay_ms=100)
    client = make_client()
    assert (await client.offer(processor.url, [graph("ImageInvert")]))[0] == 200
    await client.frames(12)
    (track,) = processor.peers[0].tracks
    # Every 2nd frame taken is dropped; 100 ms per frame at 30 fps input keeps only the newest.
    assert track.dropped_nth >= 5 and track.dropped_latest > 0
    assert track.frames_out <= track.frames_in // 2 + 2


async def test_audio_is_echoed_with_opus(processor: ProcessorServer, make_client: MakeClient) -> None:
    client = make_client(audio=True)
    status, text = await client.offer(processor.url)
    assert status == 200
    sdp = SessionDescription.parse(json.loads(text)["sdp"])
    audio = next(media for media in sdp.media if media.kind == "audio")
    assert audio.direction == "sendrecv" and audio.rtp.codecs[0].mimeType == "audio/opus"
    video = next(media for media in sdp.media if media.kind == "video")
    assert {codec.mimeType for codec in video.rtp.codecs} == {"video/H264"}
    await client.frames(3)


async def test_closed_peer_stops_the_prompts(processor: ProcessorServer, make_client: MakeClient) -> None:
    client = make_client()
    assert (await client.offer(processor.url, [graph("ImageInvert")]))[0] == 200
    await client.frames(2)
    (peer,) = processor.peers
    await client.close()
    # ComfyStream's behaviour: a closed connection stops the prompts for everyone.
    await asyncio.wait_for(peer.closed.wait(), 10)
    assert processor.peers == [] and processor.pipeline.prompts == []


async def test_loopback_returns_what_it_gets_and_passes_keyframe_requests_on(
    make_processor: MakeProcessor, make_client: MakeClient
) -> None:
    """Loopback, the processor sends the video back undecoded (prompts change nothing), and a
    keyframe request for it goes on to the video's sender, the only one that can make one."""
    processor = await make_processor(loopback=True)
    client = make_client()
    video = client.pc.getTransceivers()[0]
    asked = asyncio.Event()
    send_keyframe = video.sender._send_keyframe
    video.sender._send_keyframe = lambda: (asked.set(), send_keyframe())
    assert (await client.offer(processor.url, prompts=[graph("ImageInvert")]))[0] == 200
    frames = await client.frames(10)
    left, right, colour = halves(frames[-1])
    assert abs(left - DARK) < 8 and abs(right - BRIGHT) < 8 and colour > 20  # not inverted
    (track,) = processor.peers[0].tracks
    assert track.frames_out >= 10 and track.stats()["dropped"] == 0
    assert not asked.is_set()
    (source,) = video.receiver.getSynchronizationSources()
    await video.receiver._send_rtcp_pli(source.source)  # as a receiver that lost the picture does
    await asyncio.wait_for(asked.wait(), 5)
