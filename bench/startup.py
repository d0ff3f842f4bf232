"""Start-up: StartSession → first output byte, through the gRPC API, with a live input and a warm
processor. `python -m bench startup [--quick]`.

A live 512×512 30 fps source publishes on the input channel the whole time; the processor
(passthrough, a process of its own) is warm: each run is a new session on it. A run is
StartSession → the first byte published on a fresh output channel (read by a subscriber waiting
on it from before the call), then StopSession. Also reported: StartSession → the first input
frame ready (decoded, or forwarded as it is), which splits the time into "getting the input" and
"the round trip and the first output segment". Median of 10 runs (3 quick) in each mode: the
default (auto, which forwards this input as it is) and transcode, interleaved.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import grpc

from bench import report
from bench.webrtc import Processor
from relay_server import eventloop
from relay_server.api.relay.v1 import relay_service_pb2 as pb
from relay_server.api.relay.v1 import relay_service_pb2_grpc as pb_grpc
from relay_server.media.testsource import publish_pattern
from relay_server.service.server import RelayServer
from relay_server.session.manager import SessionManager
from relay_server.trickle import Publisher, Subscriber
from relay_server.trickle.server import TrickleServer

SIZE = 512
RUN_TIMEOUT = 20.0
MODES = {"auto (default)": pb.SESSION_MODE_UNSPECIFIED, "transcode": pb.SESSION_MODE_TRANSCODE}


async def _first_byte(url: str, ready: asyncio.Event) -> float:
    async with Subscriber(url, start_seq=0, startup_grace=RUN_TIMEOUT) as subscriber:
        ready.set()
        async for segment in subscriber:
            async for _ in segment:
                return time.monotonic()
    raise RuntimeError(f"{url} ended without a byte")


async def _measure(runs: int) -> list[dict[str, Any]]:
    async with TrickleServer() as trickle, Processor() as processor:
        manager = SessionManager()
        relay = RelayServer(manager)
        await relay.start()
        source = Publisher(trickle.channel_url("live"))
        await source.create_channel()
        publishing = asyncio.create_task(publish_pattern(source, SIZE, SIZE))
        results = []
        try:
            async with grpc.aio.insecure_channel(relay.address) as channel:
                stub = pb_grpc.RelayServiceStub(channel)
                for run, (mode, value) in enumerate(
                    (mode, value) for _ in range(runs) for mode, value in MODES.items()
                ):
                    output = trickle.channel_url(f"out-{run}")
                    creator = Publisher(output)
                    await creator.create_channel()
                    await creator.close(delete_channel=False)
                    ready = asyncio.Event()
                    first = asyncio.create_task(_first_byte(output, ready))
                    await ready.wait()
                    asked = time.monotonic()
                    await stub.StartSession(
                        pb.StartSessionRequest(
                            session_id=f"run-{run}",
                            subscribe_url=trickle.channel_url("live"),
                            publish_url=output,
                            processor_url=processor.url,
                            width=SIZE,
                            height=SIZE,
                            mode=value,
                        )
                    )
                    published = await asyncio.wait_for(first, RUN_TIMEOUT)
                    stats = manager.get(f"run-{run}").relay.stats
                    ready_at = stats.decoder.first_frame_time
                    await stub.StopSession(pb.StopSessionRequest(session_id=f"run-{run}"))
                    if ready_at is None:
                        raise RuntimeError(f"run {run}: an output byte came before any input frame")
                    results.append(
                        {
                            "mode": mode,
                            "send path": stats.paths.send,
                            "first_output_byte_ms": (published - asked) * 1000,
                            "first_frame_ready_ms": (ready_at - asked) * 1000,
                        }
                    )
                    print(f"  run {run} ({mode}): {results[-1]['first_output_byte_ms']:.0f} ms", flush=True)
        finally:
            publishing.cancel()
            await asyncio.gather(publishing, return_exceptions=True)
            await source.close()
            await relay.drain()
    return results


def main(quick: bool = False) -> Path:
    runs = 3 if quick else 10
    results = eventloop.run(_measure(runs))
    rows = []
    for mode in MODES:
        ran = [result for result in results if result["mode"] == mode]
        paths = "/".join(sorted({result["send path"] for result in ran}))
        for key, label in (
            ("first_output_byte_ms", "StartSession → first output byte"),
            ("first_frame_ready_ms", "StartSession → first input frame ready (decoded or forwarded)"),
        ):
            values = [result[key] for result in ran]
            rows.append(
                {
                    "mode": f"{mode}: input {paths}",
                    "interval": label,
                    "median ms": report.median(values),
                    "p90 ms": report.percentile(values, 90),
                    "min ms": min(values),
                    "max ms": max(values),
                }
            )
    notes = (
        f"{runs} runs per mode, interleaved, each a new session on a warm passthrough processor (its"
        f" own process), input live at {SIZE}×{SIZE} 30 fps (H.264, no B-frames: auto forwards it as"
        " it is). Target (issue 6): ≤ 1 s."
    )
    return report.write("startup", "Start-up through the gRPC API", {"runs": results}, rows, notes)
