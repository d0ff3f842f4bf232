"""`trickle-relay demo`: the parts built so far, end to end on embedded defaults.

An embedded trickle server; a live source publishing an H.264 test pattern as 2 s MPEG-TS
segments in real time; a subscriber at the live edge writing what it receives to a file. The
summary decodes that file to show the video arrived whole.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import av

from relay_server.media.testsource import pattern_segments
from relay_server.trickle import Publisher, Subscriber
from relay_server.trickle.server import TrickleServer

SEGMENT_SECONDS = 2.0


async def run_demo(
    output_dir: Path, seconds: float = 10.0, width: int = 512, height: int = 512, fps: int = 30
) -> int:
    output = output_dir / "received.ts"
    frames = round(seconds * fps)
    async with TrickleServer() as server:
        url = server.channel_url("demo")
        print(f"trickle server at {server.url}; publishing {seconds:g} s of {width}x{height}@{fps} to {url}")

        async def publish() -> None:
            loop = asyncio.get_running_loop()
            segments = pattern_segments(width, height, fps, SEGMENT_SECONDS, frames=frames)
            start = loop.time()
            async with Publisher(url) as publisher:
                index = 0
                while (data := await loop.run_in_executor(None, next, segments, None)) is not None:
                    # Live pacing: a segment goes out once its media time has passed.
                    index += 1
                    await asyncio.sleep(max(0.0, start + index * SEGMENT_SECONDS - loop.time()))
                    async with await publisher.segment() as segment:
                        await segment.write(data)

        async def receive() -> None:
            started = time.monotonic()
            async with Subscriber(url, start_seq=0, startup_grace=30) as subscriber:
                with output.open("wb") as sink:
                    async for segment in subscriber:
                        async for chunk in segment:
                            sink.write(chunk)
                        stats = subscriber.stats
                        print(
                            f"  t={time.monotonic() - started:5.1f}s  segment {segment.seq:3d}  "
                            f"{segment.offset:8d} B  total {stats.bytes:9d} B  retries {stats.retries}",
                            flush=True,
                        )

        await asyncio.gather(publish(), receive())

    with av.open(str(output)) as container:
        decoded = sum(1 for _ in container.decode(video=0))
    print(f"wrote {output} ({output.stat().st_size} bytes): {decoded} of {frames} frames decode")
    return 0 if decoded == frames else 1
