"""`trickle-relay demo`: the whole job end to end on embedded defaults, driven through the gRPC API.

    live test source ─▶ trickle server ─▶ relay (gRPC: StartSession, WatchSession) ⇄ processor
                        (embedded)            │                                    (embedded,
                             ▲                └─▶ output channel ─▶ output.ts       WebRTC)
                             └─ input channel ─▶ input.ts

An embedded trickle server; a live source publishing a 1280×720 H.264 test pattern (each 1 s
segment streamed while its frames are encoded, in real time); the embedded processor running an
"invert" prompt; the relay's gRPC server, asked to start a session exactly as any client would,
and watched live. The output channel is written to output.ts; compare.png puts an input frame
beside the processed frame made from it; the summary says what arrived and how fast.
"""

from __future__ import annotations

import asyncio
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import grpc
import numpy as np
from google.protobuf.struct_pb2 import Struct

from relay_server.api.relay.v1 import relay_service_pb2 as pb
from relay_server.api.relay.v1 import relay_service_pb2_grpc as pb_grpc
from relay_server.media.testsource import publish_pattern
from relay_server.processor import ProcessorServer
from relay_server.service.server import RelayServer
from relay_server.session.manager import SessionManager
from relay_server.trickle import Publisher, Subscriber
from relay_server.trickle.server import TrickleServer

SOURCE_SIZE = (1280, 720)
OUTPUT_SIZE = (512, 512)
PROMPT: dict[str, Any] = {"1": {"class_type": "Invert", "inputs": {}}}


async def run_demo(output_dir: Path, seconds: float = 10.0, fps: int = 30) -> int:
    frames = round(seconds * fps)
    async with TrickleServer() as trickle, ProcessorServer() as processor:
        relay = RelayServer(SessionManager())
        await relay.start()
        try:
            result = await _run(trickle, processor.url, relay.address, output_dir, frames, fps)
        finally:
            await relay.drain()
    return _summarise(output_dir, frames, *result)


async def _run(
    trickle: TrickleServer, processor_url: str, address: str, output_dir: Path, frames: int, fps: int
) -> tuple[pb.Session, float]:
    input_url, output_url = trickle.channel_url("demo"), trickle.channel_url("demo-out")
    print(f"trickle {trickle.url}  processor {processor_url}  relay gRPC {address}")
    # The channels exist before anyone reads them, as a gateway's would.
    source = Publisher(input_url)
    await source.create_channel()
    creator = Publisher(output_url)
    try:
        await creator.create_channel()
    finally:
        await creator.close(delete_channel=False)  # the session publishes there
    first_output = asyncio.get_running_loop().create_future()
    recording = [
        asyncio.create_task(_record(input_url, output_dir / "input.ts")),
        asyncio.create_task(_record(output_url, output_dir / "output.ts", first_output)),
    ]

    async def publish() -> None:
        async with source as publisher:  # closing it DELETEs the input channel: the input ends
            await publish_pattern(publisher, *SOURCE_SIZE, fps=fps, frames=frames)

    publishing = asyncio.create_task(publish())
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.RelayServiceStub(channel)
            prompt = Struct()
            prompt.update(PROMPT)
            asked = time.monotonic()
            started = await stub.StartSession(
                pb.StartSessionRequest(
                    session_id="demo",
                    subscribe_url=input_url,
                    publish_url=output_url,
                    processor_url=processor_url,
                    prompts=[prompt],
                    width=OUTPUT_SIZE[0],
                    height=OUTPUT_SIZE[1],
                )
            )
            print(f"StartSession → {pb.SessionState.Name(started.session.state)}")
            final = started.session
            async for update in stub.WatchSession(pb.WatchSessionRequest(session_id="demo")):
                final = update.session
                print(_status_line(final, time.monotonic() - asked), flush=True)
        startup = (await first_output) - asked if first_output.done() else float("nan")
        await asyncio.gather(publishing, *recording)
    finally:
        for task in (publishing, *recording):
            task.cancel()
        await asyncio.gather(publishing, *recording, return_exceptions=True)
    return final, startup


async def _record(url: str, path: Path, first_byte: asyncio.Future[float] | None = None) -> None:
    """Write a channel to a file from its first segment until it ends."""
    async with Subscriber(url, start_seq=0, startup_grace=30) as subscriber:
        with path.open("wb") as sink:
            async for segment in subscriber:
                async for chunk in segment:
                    if first_byte is not None and not first_byte.done():
                        first_byte.set_result(time.monotonic())
                    sink.write(chunk)


def _status_line(session: pb.Session, elapsed: float) -> str:
    stats = session.stats
    latency = stats.latency
    p50 = f"{latency.p50.ToMilliseconds()} ms" if latency.HasField("p50") else "-"
    return (
        f"  t={elapsed:5.1f}s {pb.SessionState.Name(session.state).removeprefix('SESSION_STATE_'):<9}"
        f" fps decoded {stats.decoded_fps:4.1f} returned {stats.returned_fps:4.1f}"
        f" encoded {stats.encoded_fps:4.1f} published {stats.published_fps:4.1f}"
        f"  frames {stats.frames_returned:4d}/{stats.frames_decoded:4d} published {stats.frames_published:4d}"
        f"  round trip p50 {p50}  segments out {stats.segments_out:3d}  {stats.webrtc_state}"
        f"  paths {stats.send_path or '-'}/{stats.output_path or '-'}  hot path {stats.fast_path}"
    )


def _summarise(output_dir: Path, published: int, session: pb.Session, startup: float) -> int:
    output, inputs = output_dir / "output.ts", output_dir / "input.ts"
    with av.open(str(output)) as container:
        processed = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    with av.open(str(inputs)) as container:
        originals = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    picture = output_dir / "compare.png"
    if processed and originals:
        _write_png(picture, _side_by_side(originals, processed[len(processed) // 2]))
    stats = session.stats
    print(
        f"\n{output}: {len(processed)} frames ({published} published to the input,"
        f" {stats.frames_returned} came back from the processor, {stats.frames_published} published by"
        f" the relay; {SOURCE_SIZE[0]}x{SOURCE_SIZE[1]} in, {OUTPUT_SIZE[0]}x{OUTPUT_SIZE[1]} out)\n"
        f"{picture}: an input frame beside the processed frame made from it\n"
        f"session {pb.SessionState.Name(session.state)} ({session.reason}); start-up (StartSession → first"
        f" output byte) {startup * 1000:.0f} ms; round trip p50 {stats.latency.p50.ToMilliseconds()} ms,"
        f" p99 {stats.latency.p99.ToMilliseconds()} ms; drops {dict(stats.drops)}\n"
        f"paths: input {stats.send_path} ({stats.send_path_reason}); output {stats.output_path}"
        f" ({stats.output_path_reason})"
    )
    # Every frame is in the output or counted where it went (a loaded machine makes latest-wins
    # hand-offs let some go); the processor's jitter buffer may keep the very last one or two.
    accounted = sum(count for reason, count in stats.drops.items() if reason != "audio_not_carried")
    return 0 if published // 2 < len(processed) and len(processed) >= published - accounted - 3 else 1


def _side_by_side(originals: list[np.ndarray], processed: np.ndarray) -> np.ndarray:
    """The input frame `processed` was made from (the closest one, allowing for an inversion)
    scaled to the output's height, beside it."""
    height, width = processed.shape[:2]
    scaled_width = round(SOURCE_SIZE[0] * height / SOURCE_SIZE[1])
    scaled = [_scale(original, scaled_width, height) for original in originals]
    # The output is letterboxed: compare the band the picture occupies.
    band = slice((height - round(width * SOURCE_SIZE[1] / SOURCE_SIZE[0])) // 2, None)
    target = _scale(processed[band][: height - 2 * band.start], scaled_width, height).astype(np.int16)

    def distance(candidate: np.ndarray) -> float:
        pixels = candidate.astype(np.int16)
        return min(float(np.abs(pixels - target).mean()), float(np.abs(255 - pixels - target).mean()))

    best = min(scaled, key=distance)
    gap = np.full((height, 8, 3), 255, np.uint8)
    return np.concatenate([best, gap, processed], axis=1)


def _scale(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgb24")
    return frame.reformat(width, height).to_ndarray()


def _write_png(path: Path, pixels: np.ndarray) -> None:
    codec = av.CodecContext.create("png", "w")
    codec.height, codec.width = pixels.shape[:2]
    codec.pix_fmt, codec.time_base = "rgb24", Fraction(1, 1)
    packets = codec.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24"))
    path.write_bytes(b"".join(bytes(packet) for packet in packets))
