"""`trickle-relay demo`: the relay end to end on embedded defaults.

An embedded trickle server; a live source publishing a 1280×720 H.264 test pattern on an input
channel (each 1 s segment streamed while its frames are encoded, in real time); the embedded
processor (WebRTC, ComfyStream's contract) running an "invert" prompt; the relay between them
(progressive decode, letterbox to 512×512, paced send over WebRTC, returned frames re-encoded
into one output segment per GOP) publishing to an output channel; a subscriber writing the output
channel to a file. A status line shows the relay live; the summary decodes the output file.
"""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path

import av

from relay_server.media.testsource import publish_pattern
from relay_server.processor import ProcessorServer
from relay_server.session.relay import Relay
from relay_server.trickle import Publisher, Subscriber
from relay_server.trickle.server import TrickleServer

SOURCE_SIZE = (1280, 720)
OUTPUT_SIZE = (512, 512)
PROMPT = [{"1": {"class_type": "Invert", "inputs": {}}}]


async def run_demo(output_dir: Path, seconds: float = 10.0, fps: int = 30) -> int:
    output = output_dir / "output.ts"
    frames = round(seconds * fps)
    async with TrickleServer() as server, ProcessorServer() as processor:
        source_url, output_url = server.channel_url("demo"), server.channel_url("demo-out")
        print(f"trickle server {server.url}: {source_url} → relay ⇄ processor {processor.url} → {output_url}")
        # Both channels exist before anyone reads them, as a gateway's would: readers wait on
        # them from the start and cannot miss a first segment.
        source = Publisher(source_url)
        await source.create_channel()
        # Closing this publisher DELETEs the output channel: the end of stream for its readers.
        output_publisher = Publisher(output_url)
        await output_publisher.create_channel()
        width, height = OUTPUT_SIZE
        relay = Relay(source_url, output_publisher, processor.url, width=width, height=height, prompts=PROMPT)
        status_done = asyncio.Event()

        async def run_relay() -> None:
            try:
                await relay.run()  # until the source ends, then the last segment is flushed
            finally:
                await output_publisher.close()

        async def publish_source() -> None:
            async with source as publisher:
                await publish_pattern(publisher, *SOURCE_SIZE, fps=fps, frames=frames)

        async def save_output() -> int:
            received = 0
            async with Subscriber(output_url, start_seq=0, startup_grace=30) as subscriber:
                with output.open("wb") as sink:
                    async for segment in subscriber:
                        async for chunk in segment:
                            sink.write(chunk)
                        received += 1
            status_done.set()
            return received

        async def show_status() -> None:
            started = time.monotonic()
            while not status_done.is_set():
                stats = relay.stats
                latency = stats.link.latency_p50
                print(
                    f"  t={time.monotonic() - started:5.1f}s  {stats.link.state.value:<12}"
                    f" decoded {stats.frames_decoded:4d}  sent {stats.link.send.frames:4d}"
                    f"  returned {stats.frames_returned:4d}  encoded {stats.frames_encoded:4d}"
                    f"  segments out {stats.segmenter.segments:3d}"
                    f"  round trip p50 {'-' if math.isnan(latency) else f'{latency * 1000:.0f} ms'}"
                    f"  hot path {stats.implementation}",
                    flush=True,
                )
                try:
                    async with asyncio.timeout(1.0):  # a status line a second
                        await status_done.wait()
                except TimeoutError:
                    pass

        try:
            jobs = publish_source(), run_relay(), save_output(), show_status()
            _, _, received, _ = await asyncio.gather(*jobs)
        finally:
            await relay.stop()
        stats = relay.stats

    with av.open(str(output)) as container:
        decoded = sum(1 for _ in container.decode(video=0))
    print(
        f"wrote {output}: {received} segments, {decoded} frames decode ({frames} published,"
        f" {stats.frames_returned} came back from the processor; {SOURCE_SIZE[0]}x{SOURCE_SIZE[1]} in,"
        f" {OUTPUT_SIZE[0]}x{OUTPUT_SIZE[1]} out); round trip p50"
        f" {stats.link.latency_p50 * 1000:.0f} ms, p99 {stats.link.latency_p99 * 1000:.0f} ms"
    )
    # aiortc's jitter buffers may keep the very last frame: all but a couple must come through.
    return 0 if decoded >= frames - 3 else 1
