"""`trickle-relay demo`: the relay's parts built so far, end to end on embedded defaults.

An embedded trickle server; a live source publishing a 1280×720 H.264 test pattern as 2 s
MPEG-TS segments in real time on an input channel; the media pipeline (progressive decode,
letterbox to 512×512, one long-lived x264, one output segment per GOP) publishing to an output
channel; a subscriber writing the output channel to a file. A status line shows the pipeline
live; the summary decodes the output file to show every frame arrived.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import av

from relay_server.media.output import Policy
from relay_server.media.testsource import pattern_segments
from relay_server.media.transcoder import Transcoder
from relay_server.trickle import Publisher, Subscriber
from relay_server.trickle.server import TrickleServer

SEGMENT_SECONDS = 2.0
SOURCE_SIZE = (1280, 720)
OUTPUT_SIZE = (512, 512)


async def run_demo(output_dir: Path, seconds: float = 10.0, fps: int = 30) -> int:
    output = output_dir / "output.ts"
    frames = round(seconds * fps)
    async with TrickleServer() as server:
        source_url, output_url = server.channel_url("demo"), server.channel_url("demo-out")
        print(f"trickle server {server.url}: {source_url} → relay → {output_url}")
        # Both channels exist before anyone reads them, as a gateway's would: readers wait on
        # them from the start and cannot miss a first segment.
        source = Publisher(source_url)
        await source.create_channel()
        # Closing this publisher DELETEs the output channel: the end of stream for its readers.
        output_publisher = Publisher(output_url)
        await output_publisher.create_channel()
        # The source delivers whole segments at once: the encoder takes every frame of the burst
        # (BLOCK) instead of keeping only the newest, as a live processor hand-off would.
        transcoder = Transcoder(
            source_url, output_publisher, width=OUTPUT_SIZE[0], height=OUTPUT_SIZE[1], policy=Policy.BLOCK
        )
        status_done = asyncio.Event()

        async def relay() -> None:
            try:
                await transcoder.run()  # until the source ends, then the last segment is flushed
            finally:
                await output_publisher.close()

        async def publish_source() -> None:
            loop = asyncio.get_running_loop()
            segments = pattern_segments(*SOURCE_SIZE, fps, SEGMENT_SECONDS, frames=frames)
            start = loop.time()
            async with source as publisher:
                index = 0
                while (data := await loop.run_in_executor(None, next, segments, None)) is not None:
                    # Live pacing: a segment goes out once its media time has passed.
                    index += 1
                    await asyncio.sleep(max(0.0, start + index * SEGMENT_SECONDS - loop.time()))
                    async with await publisher.segment() as segment:
                        await segment.write(data)

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
                stats = transcoder.stats
                print(
                    f"  t={time.monotonic() - started:5.1f}s  decoded {stats.frames_in:4d}  encoded "
                    f"{stats.frames_out:4d}  segments out {stats.segmenter.segments:3d}  "
                    f"input {stats.decoder.bytes_read / 1e6:6.2f} MB  hot path {stats.implementation}",
                    flush=True,
                )
                try:
                    async with asyncio.timeout(1.0):  # a status line a second
                        await status_done.wait()
                except TimeoutError:
                    pass

        try:
            _, _, received, _ = await asyncio.gather(publish_source(), relay(), save_output(), show_status())
        finally:
            await transcoder.stop()

    with av.open(str(output)) as container:
        decoded = sum(1 for _ in container.decode(video=0))
    print(
        f"wrote {output}: {received} segments, {decoded} of {frames} frames decode "
        f"({SOURCE_SIZE[0]}x{SOURCE_SIZE[1]} in, {OUTPUT_SIZE[0]}x{OUTPUT_SIZE[1]} out)"
    )
    return 0 if decoded == frames else 1
