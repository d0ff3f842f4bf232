"""Whole-session scenarios: input as it really arrives, every figure from StartSession.
`python -m bench scenarios [--quick]`.

Each scenario publishes an input the ffmpeg CLI made (bench.liveinput: each frame's index in its
pixels, a flash and a beep every second) live at its decode times on an embedded trickle server,
and starts a session on it with StartSession on an in-process RelayServer, through the embedded
processor (passthrough, a process of its own); a reader takes the output channel from its first
segment as it arrives. Nothing is left out for warming up or settling. Figures per scenario:
- frames lost: input frames written after StartSession that no output frame shows;
- latency p50/p99: input frame written → the output frame showing it arrived (its first showing),
  over every frame of the session; first output: the first output frame's arrival after the
  first input frame was written (after StartSession, for a session joining a live input);
- A/V: the largest offset between a flash and its beep in the output; the output as readers
  see it: DTS strictly increasing, and the lines `ffmpeg -v error -i out.ts -f null -` prints;
- audio behind: the most the output's audio is written after video of later times (a reader
  waits that long for the sound to a picture it has), and the same of the input as published.

The scenarios: a session started 5 s before its input exists (how Livepeer starts jobs), a
session joining a live input 1 s into a 2 s GOP, inputs as encoders make them (720p60 Main with
3 B-frames and AAC, which auto sends on the encode path; 1080p High with B-frames and Opus), and
bytes delivered in bursts of 3 frames.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from bench import report
from bench.e2e import serve_relay
from bench.liveinput import InputSpec, LiveInput, Probe, make_input
from bench.webrtc import Processor
from relay_server.api.relay.v1 import relay_service_pb2 as pb
from relay_server.api.relay.v1 import relay_service_pb2_grpc as pb_grpc
from relay_server.session.manager import SessionManager
from relay_server.trickle import Publisher
from relay_server.trickle.server import TrickleServer

SIZE = 512
MODES = {"transcode": pb.SESSION_MODE_TRANSCODE, "auto": pb.SESSION_MODE_AUTO}
END_TIMEOUT = 30.0  # seconds for a session to end once its input has


@dataclass(frozen=True)
class Scenario:
    spec: InputSpec
    mode: str
    before: float = 0.0  # seconds the session starts before its input exists
    join_at: float = 0.0  # seconds into the input the session starts (a live channel)
    burst: int = 1  # frames written at once


def scenarios(quick: bool) -> dict[str, Scenario]:
    seconds = 8.0 if quick else 20.0
    plain = InputSpec(seconds=seconds, gop=2.0)
    b_frames = InputSpec(1280, 720, Fraction(60), seconds, 2.0, 3, "main", "aac")
    opus = InputSpec(1920, 1080, Fraction(30), seconds, 2.0, 3, "high", "opus")
    return {
        "cold start, transcode": Scenario(plain, "transcode", before=5.0),
        "cold start, auto": Scenario(plain, "auto", before=5.0),
        "join 1 s into a 2 s GOP, transcode": Scenario(plain, "transcode", join_at=3.0),
        "join 1 s into a 2 s GOP, auto": Scenario(plain, "auto", join_at=3.0),
        "720p60 Main, 3 B-frames, AAC (auto: encode path)": Scenario(b_frames, "auto"),
        "1080p High, B-frames, Opus (auto: encode path)": Scenario(opus, "auto"),
        "bursts of 3 frames, transcode": Scenario(plain, "transcode", burst=3),
    }


async def run_scenario(
    session_id: str,
    name: str,
    scenario: Scenario,
    live: LiveInput,
    stub: pb_grpc.RelayServiceStub,
    server: TrickleServer,
    processor_url: str,
) -> dict[str, Any]:
    in_url, out_url = server.channel_url(f"{session_id}-in"), server.channel_url(f"{session_id}-out")
    output = Publisher(out_url)
    await output.create_channel()
    await output.close(delete_channel=False)  # the session publishes; it was only created
    source = Publisher(in_url)
    probe = Probe(out_url, live.code)
    publishing: asyncio.Task[None] | None = None
    if scenario.join_at:
        publishing = asyncio.create_task(live.publish(source))
        await live.until_sent(round(scenario.join_at * live.spec.rate))
    request = pb.StartSessionRequest(
        session_id=session_id,
        subscribe_url=in_url,
        publish_url=out_url,
        processor_url=processor_url,
        width=SIZE,
        height=SIZE,
        mode=MODES[scenario.mode],
    )
    started = time.monotonic()
    await stub.StartSession(request)
    try:
        if publishing is None:
            await asyncio.sleep(scenario.before)  # the scenario: the input appears this much later
            publishing = asyncio.create_task(live.publish(source, burst=scenario.burst))
        await publishing
        await source.close()  # the input ends: so does the session, once its last frames are back
        await until_ended(stub, session_id)
        await probe.ended(END_TIMEOUT)
    finally:
        if publishing is not None:
            publishing.cancel()
            await asyncio.gather(publishing, return_exceptions=True)
        with contextlib.suppress(Exception):
            await stub.StopSession(pb.StopSessionRequest(session_id=session_id))
        await probe.close()
    got = (await stub.GetSession(pb.GetSessionRequest(session_id=session_id))).session
    return figures(name, scenario, live, probe, started, dict(got.stats.drops))


async def until_ended(stub: pb_grpc.RelayServiceStub, session_id: str) -> None:
    ended = (pb.SESSION_STATE_STOPPED, pb.SESSION_STATE_FAILED)
    request = pb.WatchSessionRequest(session_id=session_id)
    async with asyncio.timeout(END_TIMEOUT):
        async for response in stub.WatchSession(request):
            if response.session.state in ended:
                return


def figures(
    name: str,
    scenario: Scenario,
    live: LiveInput,
    probe: Probe,
    started: float,
    drops: dict[str, int],
) -> dict[str, Any]:
    out = probe.figures
    published = sorted(index for index, at in live.sent.items() if at >= started)
    lost = out.lost(published)
    first: dict[int, float] = {}
    for index, arrival in zip(out.indices, out.arrivals, strict=True):
        if index in live.sent and arrival == arrival:
            first.setdefault(index, arrival - live.sent[index])
    latencies = [1000 * value for value in first.values()]
    offsets = [abs(offset) * 1000 for offset in out.av_offsets]
    # From the first input frame written, or from StartSession when the input was live before.
    first_output = min(out.arrivals, default=float("nan")) - max(started, min(live.sent.values()))
    return {
        "scenario": name,
        "input": live.spec.name,
        "mode": scenario.mode,
        "frames published": len(published),
        "frames lost": len(lost),
        "lost %": round(100 * len(lost) / len(published), 2) if published else float("nan"),
        "latency p50 ms": report.rounded(report.percentile(latencies, 50), 1),
        "latency p99 ms": report.rounded(report.percentile(latencies, 99), 1),
        "first output s": report.rounded(first_output, 3),
        "A/V max ms": report.rounded(max(offsets, default=float("nan")), 1),
        "audio behind ms": report.rounded(1000 * out.audio_behind, 1),
        "input audio behind ms": report.rounded(1000 * live.audio_behind, 1),
        "markers": len(out.markers),
        "DTS increasing": out.dts_increasing,
        "ffmpeg error lines": len(out.ffmpeg_errors.splitlines()),
        "drops": {reason: count for reason, count in drops.items() if count},
        "lost indices": lost[:20],
    }


async def run(quick: bool) -> dict[str, Any]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="scenarios-") as directory:
        async with contextlib.AsyncExitStack() as stack:
            server = await stack.enter_async_context(TrickleServer(autocreate=True))
            processor = await stack.enter_async_context(Processor())
            _, stub = await serve_relay(stack, SessionManager())
            for number, (name, scenario) in enumerate(scenarios(quick).items()):
                live = LiveInput(make_input(scenario.spec, Path(directory)), scenario.spec)
                session_id = f"scenario-{number}"
                rows.append(await run_scenario(session_id, name, scenario, live, stub, server, processor.url))
    return {"quick": quick, "scenarios": rows}


TABLE = (
    "scenario",
    "frames published",
    "frames lost",
    "latency p50 ms",
    "latency p99 ms",
    "first output s",
    "A/V max ms",
    "audio behind ms",
    "input audio behind ms",
    "ffmpeg error lines",
)
NOTES = """
Every figure covers the whole session, from StartSession to the end of its input (see
bench/scenarios.py). The processor (the embedded one, passthrough) runs in a process of its own;
the inputs are made by the ffmpeg CLI and published live from this process, which also runs the
relay and reads the output: latencies include this process's contention.
"""


def write(results: dict[str, Any]) -> Path:
    rows = [{column: row[column] for column in TABLE} for row in results["scenarios"]]
    return report.write("scenarios", "Whole-session scenarios, from StartSession", results, rows, NOTES)


def main(quick: bool = False) -> Path:
    return write(report.timed_run(run, quick))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    print(main(parser.parse_args().quick).read_text())
