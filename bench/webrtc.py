"""The WebRTC leg: our ProcessorLink against a stock aiortc client, through the same processor.

- relay: ProcessorLink (our x264, ultrafast/zerolatency/baseline, packets handed to aiortc), fed
  by a producer thread putting frames into a FrameQueue at 30 fps, as the decode thread does;
- aiortc default: an RTCPeerConnection with a sendrecv H.264 transceiver whose track returns the
  same av.VideoFrames paced at 30 fps, encoded by aiortc's stock H264Encoder.
The processor (`python -m relay_server processor`, passthrough: no prompts) runs in a process of
its own, so its CPU (decode, and aiortc's stock encoder for the return leg) is not counted; it
is reported apart. CPU is this process's CPU (time.process_time: every thread, so x264's, the
decoder's of the return leg and the producer's count) over the measured window, after a
warm-up. Latency is send → return, both sides stamped when the encoded frame goes to aiortc's
RTP sender (the link stamps after its encode; the baseline's encoder is wrapped to do the
same), matched by pts with the link's RoundTrip. Content: bench.media's test pattern with
moving noise. Medians of interleaved repeats. `python -m bench webrtc [--quick]`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import av
from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpSender
from aiortc.codecs.h264 import H264Encoder
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av.frame import Frame

from bench import report
from bench.child import process_cpu_seconds
from bench.media import FPS, SIZES, source_frames
from relay_server.media.encoder import CLOCK
from relay_server.media.handoff import FrameQueue
from relay_server.webrtc import ProcessorLink
from relay_server.webrtc.roundtrip import LatencyWindow, RoundTrip
from relay_server.webrtc.signaling import negotiate

WARMUP = 2.0  # seconds after the first returned frame, not measured
CONNECT_TIMEOUT = 20.0  # seconds for the first frame to come back
EVERY_LATENCY = 10**7  # a LatencyWindow that keeps every value: the window's are sliced out


class Processor:
    """The embedded processor in a process of its own, with `args` (the processor command's
    options: ["--loopback"], say); GET /health before use, terminated on exit."""

    def __init__(self, args: Sequence[str] = ()) -> None:
        self.args = list(args)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: asyncio.subprocess.Process | None = None
        self.http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Processor:
        command = [sys.executable, "-m", "relay_server", "--log-level", "WARNING", "processor", *self.args]
        self.process = await asyncio.create_subprocess_exec(*command, "--listen", f"127.0.0.1:{self.port}")
        self.http = aiohttp.ClientSession()
        try:
            deadline = time.monotonic() + CONNECT_TIMEOUT
            while True:
                if self.process.returncode is not None:
                    raise RuntimeError(f"the processor exited with {self.process.returncode}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with self.http.get(f"{self.url}/health") as response:
                        if response.status == 200:
                            return self
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the processor did not answer {self.url}/health")
                await asyncio.sleep(0.1)
        except BaseException:
            await self.__aexit__()
            raise

    async def __aexit__(self, *exc_info: object) -> None:
        if self.http is not None:
            await self.http.close()
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), 10)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()

    def cpu_seconds(self) -> float:
        """The processor's CPU time so far (Linux /proc; NaN elsewhere)."""
        assert self.process is not None
        return process_cpu_seconds(self.process.pid)

    async def frames(self) -> tuple[int, int, int]:
        """Frames in, out and dropped (newer input arrived first) over its current tracks."""
        assert self.http is not None
        async with self.http.get(f"{self.url}/streams/stats") as response:
            tracks = (await response.json()).values()
        counts = [
            sum(track[key] for track in tracks) for key in ("frames_in", "frames_out", "dropped_latest")
        ]
        return counts[0], counts[1], counts[2]


Counters = Callable[[], tuple[int, int, int]]  # frames sent, frames returned, bytes sent


async def measure(
    processor: Processor, latencies: LatencyWindow, counters: Counters, seconds: float
) -> dict[str, Any]:
    """Wait for the first returned frame and the warm-up, then measure `seconds`: every figure is
    the difference of snapshots at the window's ends."""
    deadline = time.monotonic() + CONNECT_TIMEOUT
    while counters()[1] == 0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"no frame came back within {CONNECT_TIMEOUT:g} s")
        await asyncio.sleep(0.05)
    await asyncio.sleep(WARMUP)

    async def snapshot() -> tuple[float, ...]:
        in_out_dropped = await processor.frames()
        clocks = (time.monotonic(), time.process_time(), processor.cpu_seconds())
        return (*clocks, *counters(), len(latencies.values), *in_out_dropped)

    start = await snapshot()
    await asyncio.sleep(seconds)
    end = await snapshot()
    wall, cpu, processor_cpu, sent, returned, sent_bytes, _, p_in, p_out, p_dropped = (
        b - a for a, b in zip(start, end, strict=True)
    )
    window = list(latencies.values)[int(start[6]) : int(end[6])]
    return {
        "seconds": round(wall, 2),
        "sent": sent,
        "returned": returned,
        "matched": len(window),
        "cpu ms/returned": 1000 * cpu / returned if returned else math.nan,
        "cpu ms/sent": 1000 * cpu / sent if sent else math.nan,
        "sent fps": sent / wall,
        "returned fps": returned / wall,
        "send Mbit/s": 8 * sent_bytes / wall / 1e6,
        "p50 ms": 1000 * report.percentile(window, 50),
        "p95 ms": 1000 * report.percentile(window, 95),
        "p99 ms": 1000 * report.percentile(window, 99),
        "processor in": p_in,
        "processor out": p_out,
        "processor dropped": p_dropped,
        "processor cpu %": 100 * processor_cpu / wall,
    }


def _produce(frames: list[av.VideoFrame], hand_off: FrameQueue, stop: threading.Event) -> None:
    """The decode thread's part: a frame into the hand-off every 1/FPS s, media time running on."""
    started = time.monotonic()
    index = 0
    while not stop.is_set():
        delay = started + index / FPS - time.monotonic()
        if delay > 0 and stop.wait(delay):
            return
        frame = frames[index % len(frames)]
        frame.pts, frame.time_base = index * 90_000 // FPS, CLOCK
        hand_off.put(frame)  # copies pixels, pts and time base
        index += 1


async def run_relay(processor: Processor, frames: list[av.VideoFrame], seconds: float) -> dict[str, Any]:
    hand_off = FrameQueue(frames[0].width, frames[0].height)

    async def on_frame(frame: av.VideoFrame, arrival: float, media: int | None) -> None:
        pass

    link = ProcessorLink(processor.url, hand_off, on_frame, name="bench")
    link.latencies = LatencyWindow(EVERY_LATENCY)  # before run(): its connections add to it
    stop = threading.Event()
    producer = threading.Thread(target=_produce, args=(frames, hand_off, stop), name="bench-producer")
    producer.start()
    task = asyncio.create_task(link.run())
    try:

        def counters() -> tuple[int, int, int]:
            stats = link.stats
            return stats.send.frames, stats.frames_returned, stats.send.bytes

        result = await measure(processor, link.latencies, counters, seconds)
        stats = link.stats
        result.update(losses=stats.losses, input_dropped=stats.frames_dropped)
        result["send encode ms"] = 1000 * stats.encoder.encode_wall_seconds / max(1, stats.encoder.frames)
        return result
    finally:
        await link.stop()
        await task
        stop.set()
        producer.join()
        hand_off.close()


class StampedH264Encoder(H264Encoder):
    """aiortc's stock encoder, stamping each frame as its payloads go to the RTP sender."""

    def __init__(self, roundtrip: RoundTrip, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.roundtrip = roundtrip
        self.loop = loop
        self.frames = 0
        self.bytes = 0
        self.wall_seconds = 0.0

    def encode(self, frame: Frame, force_keyframe: bool = False) -> tuple[list[bytes], int]:
        started = time.perf_counter()
        payloads, timestamp = super().encode(frame, force_keyframe)  # on aiortc's executor thread
        self.wall_seconds += time.perf_counter() - started
        if payloads:
            self.frames += 1
            self.bytes += sum(len(payload) for payload in payloads)
            # On the loop, before aiortc sends them (timestamp: the pts on the 90 kHz clock).
            self.loop.call_soon_threadsafe(self.roundtrip.sent, timestamp, time.monotonic())
        return payloads, timestamp


class PacedTrack(MediaStreamTrack):
    """The frames in a loop at FPS, pts from the monotonic clock (90 kHz), like a camera track."""

    kind = "video"

    def __init__(self, frames: list[av.VideoFrame]) -> None:
        super().__init__()
        self.frames = frames
        self.index = 0
        self.origin = time.monotonic()

    async def recv(self) -> av.VideoFrame:
        delay = self.origin + self.index / FPS - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        frame = self.frames[self.index % len(self.frames)]
        self.index += 1
        frame.pts, frame.time_base = round((time.monotonic() - self.origin) / CLOCK), CLOCK
        return frame


async def run_default(processor: Processor, frames: list[av.VideoFrame], seconds: float) -> dict[str, Any]:
    assert processor.http is not None
    roundtrip = RoundTrip(LatencyWindow(EVERY_LATENCY))
    encoder = StampedH264Encoder(roundtrip, asyncio.get_running_loop())
    returned = 0

    async def receive(track: MediaStreamTrack) -> None:
        nonlocal returned
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                arrival = time.monotonic()
                returned += 1
                if frame.pts is not None:
                    roundtrip.returned(frame.pts, arrival)

    receiving: list[asyncio.Task[None]] = []
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        transceiver = pc.addTransceiver(PacedTrack(frames), direction="sendrecv")
        codecs = RTCRtpSender.getCapabilities("video").codecs
        transceiver.setCodecPreferences(
            [c for c in codecs if c.mimeType.lower() in ("video/h264", "video/rtx")]
        )
        transceiver.sender._RTCRtpSender__encoder = encoder  # type: ignore[attr-defined]  # instead of get_encoder()'s
        pc.on("track", lambda track: receiving.append(asyncio.create_task(receive(track))))
        width, height = frames[0].width, frames[0].height
        await negotiate(
            pc, processor.http, processor.url, prompts=None, width=width, height=height, within=30
        )

        def counters() -> tuple[int, int, int]:
            return encoder.frames, returned, encoder.bytes

        result = await measure(processor, roundtrip.latencies, counters, seconds)
        result["send encode ms"] = 1000 * encoder.wall_seconds / max(1, encoder.frames)
        return result
    finally:
        await pc.close()
        for task in receiving:
            task.cancel()
        await asyncio.gather(*receiving, return_exceptions=True)


async def run(quick: bool) -> dict[str, Any]:
    seconds, repeats = (5, 1) if quick else (20, 3)
    results: dict[str, Any] = {
        "quick": quick,
        "repeats": repeats,
        "seconds": seconds,
        "warmup": WARMUP,
        "runs": {},
    }
    clients = {"relay": run_relay, "aiortc default": run_default}
    async with Processor() as processor:
        for width, height in SIZES:
            frames = source_frames(width, height)  # before any timing
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in clients}
            for _ in range(repeats):  # interleaved: drift in the machine's speed hits both alike
                for name, client in clients.items():
                    runs[name].append(await client(processor, frames, seconds))
            results["runs"][f"{width}x{height}"] = runs
    return results


FIGURES = ["cpu ms/returned", "cpu ms/sent", "p50 ms", "p95 ms", "p99 ms", "returned fps", "sent fps"]


def main(quick: bool = False) -> Path:
    results = report.timed_run(run, quick)
    rows = []
    medians: dict[str, dict[str, dict[str, float]]] = {}
    for size, runs in results["runs"].items():
        figures = {
            name: {
                key: report.median([run[key] for run in values])
                for key in [*FIGURES, "processor cpu %", "send encode ms", "send Mbit/s"]
            }
            for name, values in runs.items()
        }
        medians[size] = figures
        baseline = figures["aiortc default"]["cpu ms/returned"]
        for name, median in figures.items():
            rows.append(
                {
                    "size": size,
                    "client": name,
                    "CPU ms/returned": round(median["cpu ms/returned"], 2),
                    "CPU ms/sent": round(median["cpu ms/sent"], 2),
                    "vs default": round(median["cpu ms/returned"] / baseline, 2),
                    "p50 ms": round(median["p50 ms"], 1),
                    "p95 ms": round(median["p95 ms"], 1),
                    "p99 ms": round(median["p99 ms"], 1),
                    "returned fps": round(median["returned fps"], 1),
                    "sent fps": round(median["sent fps"], 1),
                    "send Mbit/s": round(median["send Mbit/s"], 2),
                    "send encode ms": round(median["send encode ms"], 1),
                    "processor CPU %": round(median["processor cpu %"]),
                }
            )
    results["medians"] = medians
    notes = f"""
Medians of {results["repeats"]} interleaved repeats of {results["seconds"]} s at {FPS} fps (after a
{WARMUP:g} s warm-up) per client and size; {results["total seconds"]:g} s in all. CPU: this process
(time.process_time, every thread) per frame returned / sent; `vs default` = relay ÷ aiortc default
per returned frame. Latency: send → return over the window, stamped when the encoded frame goes to
aiortc's RTP sender on both sides, so it excludes the send-side encode (`send encode ms`, wall time
in the encoder per frame; aiortc's stock encoder runs x264 at its default preset) and includes the
processor's decode and stock-aiortc re-encode plus our decode. The processor (passthrough) runs in
its own process; `processor CPU %` is its CPU over the window (100 = one core of {os.cpu_count()}).
`send Mbit/s`: the send leg's bitrate (relay: 2 Mbit/s target; aiortc:
1 Mbit/s, moved by REMB between 0.5 and 3). aiortc's stock receive jitter buffer releases a video
frame only when the next frame's first packet arrives, holding each frame one frame interval
({1000 / FPS:.0f} ms): the processor's receiver does so for both clients, the stock client's own receiver
too, while the link's releases a frame on its RTP marker bit (relay_server/webrtc/jitter.py).
"""
    return report.write("webrtc", "WebRTC leg: ProcessorLink vs stock aiortc client", results, rows, notes)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs, one repeat")
    print(main(parser.parse_args().quick).read_text())
