"""End to end: input channel → relay → processor → relay → output channel, per frame, through the
gRPC API. `python -m bench e2e [--quick]`.

A live 1280×720 30 fps source publishes frames that carry their index in their pixels
(bench.frameindex) on an input channel; sessions started with StartSession on an in-process
RelayServer take it through the embedded processor (passthrough: no prompts; a process of its
own) to an output channel, where a reader decodes every frame, reads its index and stamps when
its last byte arrived. The source, the reader and the trickle server run in a child process
(bench.livesource), so this process's CPU is the relay's (and its idle gRPC server's).

Per session:
- latency: output receive time − input publish time of the same index, for every frame published
  from StartSession to the end of the window (its first appearance in the output): start-up
  included; lost = published then and never seen (the output is read until the session ends, a
  second after the window); repeated = output frames showing an index already seen (the relay's
  fill repeats, the processor's re-sends);
- CPU, a steady rate: over a window of `seconds` after the first returned frame and a warm-up,
  time.process_time of this process ÷ frames returned by the processor, and per thread
  (/proc/self/task/<tid>/schedstat, ns), grouped by the stage the thread serves.

Whole-session scenarios (a session started before its input, one joining mid-segment, ffmpeg-CLI
inputs with B-frames and audio, bursts) are bench.scenarios, run after this one.

Baselines in the same run, interleaved with the sessions:
- raw codec work: the codec calls the relay cannot avoid, in a tight loop on this process's
  CPU: PyAV decode of the 1280×720 input, scale, x264 ultrafast for the WebRTC leg (the link's
  settings), aiortc's H.264 decode of a return leg encoded as the processor's stock aiortc
  encoder does, and the output's x264 ultrafast encode; the same codec thread counts as the relay;
- stock: the relay with LinkSettings(stock_encoder=True, return_bitrate=None): aiortc's own H.264
  encoder (x264 at its default preset, its bitrate moved by the bandwidth estimate, which runs as
  in a stock aiortc client) on the WebRTC leg.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import itertools
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import grpc
from aiortc.codecs.h264 import H264Decoder
from aiortc.jitterbuffer import JitterFrame

from bench import report
from bench.frameindex import INDEX_MODULO, IndexCode
from bench.livesource import BITRATE, FPS, GOP, SourceProcess
from bench.media import source_frames
from bench.threadnames import named_threads
from bench.webrtc import Processor
from relay_server import settings
from relay_server.api.relay.v1 import relay_service_pb2 as pb
from relay_server.api.relay.v1 import relay_service_pb2_grpc as pb_grpc
from relay_server.media.encoder import CLOCK, EncoderSettings, VideoEncoder
from relay_server.media.scaler import ScaleMode, Scaler
from relay_server.media.segmenter import Segmenter
from relay_server.service.server import RelayServer
from relay_server.session.manager import SessionManager
from relay_server.session.relay import RelayStats
from relay_server.webrtc.link import LinkSettings

SOURCE = (1280, 720)
SIZES = [(512, 512), (1280, 720)]
WARMUP = 3.0  # seconds after the first returned frame, not measured
GRACE = 1.0  # seconds the session runs on after the window: frames published late in it arrive
CONNECT_TIMEOUT = 30.0
RAW_FRAMES = {True: 90, False: 300}  # frames per raw codec run (quick, full)
STOCK_BITRATE = 1_000_000  # aiortc's H264Encoder default: what the processor sends back at
VARIANTS = {"relay": LinkSettings(), "stock": LinkSettings(stock_encoder=True, return_bitrate=None)}

# Targets (issue), at 512×512 30 fps.
TARGET_CPU_MS = 8.0
TARGET_CPU_VS_RAW = 1.5
TARGET_P50_MS = 60.0
TARGET_P99_MS = 150.0


# -- latency: publish and receive times joined by index ---------------------------------------


@dataclass
class Joined:
    published: int  # frames published in the window
    lost: int  # of those, never seen in the output
    repeated: int  # output frames showing an index already seen
    unreadable: int  # output frames received in the window whose index could not be read
    latencies: list[float] = field(default_factory=list)  # seconds, per frame seen, publish order

    def percentile(self, q: float) -> float:
        return report.percentile(self.latencies, q)


def join(
    published: Iterable[tuple[int, float]],
    received: Iterable[tuple[int | None, float]],
    start: float,
    end: float,
) -> Joined:
    """Join the source's (index, publish time) with the output's (index read or None, receive
    time), in output order, over the frames published in [start, end). Output indices are the
    code's (modulo INDEX_MODULO); the window is far shorter, so they map back uniquely."""
    window = {index: at for index, at in published if start <= at < end}
    by_code = {index % INDEX_MODULO: index for index in window}
    first: dict[int, float] = {}
    repeated = unreadable = 0
    for code, at in received:
        if code is None:
            unreadable += start <= at < end
            continue
        index = by_code.get(code)
        if index is None:
            continue  # published outside the window
        if index in first:
            repeated += 1
        else:
            first[index] = at
    latencies = [first[index] - window[index] for index in sorted(first)]
    return Joined(len(window), len(window) - len(first), repeated, unreadable, latencies)


# -- CPU by thread --------------------------------------------------------------------------------

# Stages, by the thread names (Python threads) or inherited comm (codec threads) that serve them.
STAGES = [
    ("input: demux, decode, scale", ("decoder ",)),
    ("send leg: x264 (ours)", ("send-encode", "x264 send")),
    ("send leg: aiortc's encoder (stock)", ("asyncio_",)),
    ("return leg: aiortc decode", ("video-decoder",)),
    ("output: x264, mux", ("output-encode", "x264 output")),
    ("event loop: HTTP, RTP, pacing, gRPC", ("MainThread",)),
]
OTHER = "other threads"
ENDED = "threads that ended in the window"


def stage_of(name: str) -> str:
    bare = name.strip("[]")
    for stage, prefixes in STAGES:
        if bare.startswith(prefixes):
            return stage
    return OTHER


def thread_cpu(pid: int | str = "self") -> dict[int, tuple[str, float]]:
    """CPU seconds of every thread of a process (this one unless told) so far, by tid, with its
    name: in this process the Python thread's, else (and for native threads: codec slice threads
    inherit their creator's comm) "[comm]"."""
    names = {thread.native_id: thread.name for thread in threading.enumerate()} if pid == "self" else {}
    threads = {}
    with contextlib.suppress(OSError):
        for entry in os.listdir(f"/proc/{pid}/task"):
            tid = int(entry)
            try:
                comm = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
                seconds = int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0]) / 1e9
            except (OSError, ValueError, IndexError):
                continue
            threads[tid] = (names.get(tid) or f"[{comm}]", seconds)
    return threads


class ThreadSampler:
    """CPU per thread over a window, sampled every `interval` seconds, so that a thread that ends
    meanwhile (aiortc re-creates its encoder, and x264 its threads, when the bitrate moves) still
    counts up to its last sample. Each sample reads two /proc files per thread (a relay with a
    session runs dozens) on the event loop: every 0.2 s that cost 0.2-0.3 ms per frame, as much
    as a tenth of a passthrough session's own CPU, so samples are a second apart."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self.first: dict[int, tuple[str, float]] = {}
        self.last: dict[int, tuple[str, float]] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.first = thread_cpu()
        self.last = dict(self.first)
        self._task = asyncio.create_task(self._sample())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.last.update(thread_cpu())

    def by_stage(self, process_seconds: float) -> dict[str, float]:
        """CPU seconds per stage; what the process spent beyond that (threads that ended between
        samples) is ENDED."""
        stages: dict[str, float] = {}
        for tid, (name, seconds) in self.last.items():
            spent = seconds - self.first.get(tid, (name, 0.0))[1]  # born in the window: from 0
            stage = stage_of(name)
            stages[stage] = stages.get(stage, 0.0) + spent
        stages[ENDED] = max(0.0, process_seconds - sum(stages.values()))
        return stages

    async def _sample(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.last.update(thread_cpu())


# -- raw codec work -----------------------------------------------------------------------------


class _Memory:
    """A SegmentSink that keeps the bytes."""

    def __init__(self) -> None:
        self.data = bytearray()

    def begin(self, index: int) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.data += data

    def end(self, index: int) -> None:
        pass


@dataclass(frozen=True)
class RawInput:
    width: int
    height: int
    stream: bytes  # the source's MPEG-TS, as the live source encodes it
    returns: list[bytes]  # per frame, the return leg as the processor's stock encoder sends it


def raw_input(width: int, height: int, frames: int) -> RawInput:
    """The input stream and the return leg for the raw codec loop (made before any timing)."""
    source_w, source_h = SOURCE
    code = IndexCode(source_w, source_h)
    pictures = source_frames(source_w, source_h)
    encoder = VideoEncoder(source_w, source_h, gop=GOP, bitrate=BITRATE, fps=FPS)
    memory = _Memory()
    segmenter = Segmenter(memory, source_w, source_h)
    for index in range(frames):
        picture = code.draw(pictures[index % len(pictures)], index)
        for packet in encoder.encode(picture, round(index / FPS / CLOCK)):
            segmenter.mux_video(packet)
    for packet in encoder.close():
        segmenter.mux_video(packet)
    segmenter.close()
    stream = bytes(memory.data)
    # The return leg: the scaled frames through aiortc's H264Encoder settings (x264 default
    # preset, zerolatency, Baseline, level 3.1, 1 Mbit/s).
    stock = av.CodecContext.create("libx264", "w")
    stock.width, stock.height, stock.pix_fmt = width, height, "yuv420p"
    stock.bit_rate, stock.framerate, stock.time_base = STOCK_BITRATE, Fraction(FPS), Fraction(1, FPS)
    stock.options = {"level": "31", "tune": "zerolatency"}
    stock.profile = "Baseline"
    scaler = Scaler(width, height, ScaleMode.LETTERBOX)
    returns = []
    with av.open(io.BytesIO(stream), format="mpegts") as container:
        for number, frame in enumerate(container.decode(video=0)):
            scaled = scaler(frame)
            scaled.pts, scaled.time_base = number, Fraction(1, FPS)
            returns.append(b"".join(bytes(packet) for packet in stock.encode(scaled)))
    return RawInput(width, height, stream, returns)


RAW_STAGES = ["input decode", "scale", "send x264", "return decode", "output x264"]


def raw_codec_work(raw: RawInput) -> dict[str, Any]:
    """CPU per frame of the codec calls alone, one frame at a time through all of them."""
    send = LinkSettings().send_encoder(raw.width, raw.height)
    output = EncoderSettings().encoder(raw.width, raw.height)
    scaler = Scaler(raw.width, raw.height, ScaleMode.LETTERBOX)
    back = H264Decoder()  # aiortc's, as the link's receiver decodes the return leg
    stages = dict.fromkeys(RAW_STAGES, 0.0)
    clock = time.process_time
    frames = 0
    started = clock()
    with av.open(io.BytesIO(raw.stream), format="mpegts") as container:
        codec = container.streams.video[0].codec_context
        codec.thread_type, codec.thread_count = "SLICE", settings.workers()  # as the Decoder does
        mark = clock()
        for packet in container.demux(video=0):
            for frame in codec.decode(packet):
                now = clock()
                stages["input decode"] += now - mark
                scaled = scaler(frame)
                mark, now = now, clock()
                stages["scale"] += now - mark
                pts = round(frames / FPS / CLOCK)
                send.encode(scaled, pts)
                mark, now = now, clock()
                stages["send x264"] += now - mark
                returned = back.decode(JitterFrame(raw.returns[frames % len(raw.returns)], pts))
                mark, now = now, clock()
                stages["return decode"] += now - mark
                for picture in returned:
                    output.encode(picture, pts)  # type: ignore[arg-type]
                mark, now = now, clock()
                stages["output x264"] += now - mark
                frames += 1
            mark = clock()
    total = clock() - started
    return {
        "frames": frames,
        "cpu ms/frame": 1000 * total / frames,
        "stages ms/frame": {stage: 1000 * seconds / frames for stage, seconds in stages.items()},
    }


# -- one session --------------------------------------------------------------------------------


@dataclass
class Snapshot:
    wall: float
    cpu: float
    stats: RelayStats
    processor_cpu: float
    source_cpu: float
    processor_frames: tuple[int, int, int]


async def serve_relay(
    stack: contextlib.AsyncExitStack, manager: SessionManager
) -> tuple[RelayServer, pb_grpc.RelayServiceStub]:
    """An in-process RelayServer on `manager` and a client of it, both closed by `stack`."""
    server = RelayServer(manager)
    await server.start()
    stack.push_async_callback(server.drain)
    channel = grpc.aio.insecure_channel(server.address)
    stack.push_async_callback(channel.close)
    return server, pb_grpc.RelayServiceStub(channel)


class Bench:
    """Sessions through the gRPC API, one RelayServer per variant (its LinkSettings), each
    started with the variant's session mode (`modes`; the default, transcode, for any not in
    it)."""

    def __init__(
        self,
        source: SourceProcess,
        processor: Processor,
        variants: Mapping[str, LinkSettings] = VARIANTS,
        modes: Mapping[str, pb.SessionMode] | None = None,
    ) -> None:
        self.source = source
        self.processor = processor
        self.variants = variants
        self.modes = dict(modes or {})
        self.servers: dict[str, RelayServer] = {}
        self.stubs: dict[str, pb_grpc.RelayServiceStub] = {}
        self._channels: list[grpc.aio.Channel] = []

    async def start(self) -> None:
        for variant, link in self.variants.items():
            server = self.servers[variant] = RelayServer(SessionManager(link=link))
            await server.start()
            channel = grpc.aio.insecure_channel(server.address)
            self._channels.append(channel)
            self.stubs[variant] = pb_grpc.RelayServiceStub(channel)

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()
        for server in self.servers.values():
            await server.drain()

    async def snapshot(self, session_id: str, variant: str) -> Snapshot:
        processor_frames = await self.processor.frames()
        relay = self.servers[variant].manager.get(session_id).relay
        return Snapshot(
            time.monotonic(),
            time.process_time(),
            relay.stats,
            self.processor.cpu_seconds(),
            self.source.cpu_seconds(),
            processor_frames,
        )

    async def run(self, variant: str, width: int, height: int, repeat: int, seconds: float) -> dict[str, Any]:
        session_id = f"{variant}-{width}x{height}-{repeat}"
        reading = await self.source.request(
            "read", name=session_id, channel=session_id, mode=ScaleMode.LETTERBOX.value
        )
        # The input too, from the segment in progress, as the relay reads it: how long a Decoder
        # holds each frame after its last byte arrived.
        await self.source.request("read", name="input", channel="input", create=False, start_seq=-2)
        stub = self.stubs[variant]
        session_started = time.monotonic()
        await stub.StartSession(
            pb.StartSessionRequest(
                session_id=session_id,
                subscribe_url=self.source.input,
                publish_url=reading["url"],
                processor_url=self.processor.url,
                width=width,
                height=height,
                # The transcoding path unless the variant says otherwise (the default is AUTO).
                mode=self.modes.get(variant, pb.SESSION_MODE_TRANSCODE),
            )
        )
        relay = self.servers[variant].manager.get(session_id).relay
        try:
            await _until(lambda: relay.stats.frames_returned > 0, CONNECT_TIMEOUT, "a returned frame")
            await asyncio.sleep(WARMUP)
            sampler = ThreadSampler()
            start = await self.snapshot(session_id, variant)
            sampler.start()
            await asyncio.sleep(seconds)
            end = await self.snapshot(session_id, variant)
            await sampler.stop()
            await asyncio.sleep(GRACE)
        finally:
            await stub.StopSession(pb.StopSessionRequest(session_id=session_id))
        received = await self.source.request("collect", name=session_id, within=3.0)
        inputs = await self.source.request("collect", name="input", within=0.0)
        # Loss and latency over the whole session: from StartSession, start-up included.
        published = await self.source.request("published", start=session_started, end=end.wall)
        joined = join(
            published["published"],
            [(index, at) for index, at, _ in received["received"]],
            session_started,
            end.wall,
        )
        result = _figures(start, end, sampler, joined)
        times = sorted(at for _, at in published["published"])
        # Nominally 1000/FPS: more means the source stalled (the machine was busy), which the relay
        # sees as input jitter.
        result["source max gap ms"] = 1000 * max(
            (b - a for a, b in itertools.pairwise(times)), default=math.nan
        )
        held = [decoded - at for _, at, decoded in inputs["received"] if start.wall <= at < end.wall]
        result["input decoder lag ms"] = 1000 * report.median(held)
        print(
            f"  {session_id}: {result['cpu ms/frame']:.2f} ms CPU/frame, p50 {result['p50 ms']:.0f} ms,"
            f" p99 {result['p99 ms']:.0f} ms, lost {joined.lost}/{joined.published},"
            f" repeated {joined.repeated}",
            flush=True,
        )
        return result


def _figures(start: Snapshot, end: Snapshot, sampler: ThreadSampler, joined: Joined) -> dict[str, Any]:
    wall = end.wall - start.wall
    cpu = end.cpu - start.cpu
    a, b = start.stats, end.stats
    returned = b.frames_returned - a.frames_returned
    # Output frames: encoded, or (zero-transcode) the processor's access units muxed as they are.
    remuxed = (b.pipeline.packets_in - b.pipeline.packets_dropped) - (
        a.pipeline.packets_in - a.pipeline.packets_dropped
    )
    encoded = b.frames_encoded - a.frames_encoded + remuxed
    stages = sampler.by_stage(cpu)
    send_frames = b.link.encoder.frames - a.link.encoder.frames
    send_wall = b.link.encoder.encode_wall_seconds - a.link.encoder.encode_wall_seconds
    output_frames = b.encoder.frames - a.encoder.frames
    output_wall = b.encoder.encode_wall_seconds - a.encoder.encode_wall_seconds
    p_in, p_out, p_dropped = (
        y - x for x, y in zip(start.processor_frames, end.processor_frames, strict=True)
    )
    return {
        "seconds": round(wall, 2),
        "cpu ms/frame": 1000 * cpu / returned if returned else math.nan,
        "cpu ms/output frame": 1000 * cpu / encoded if encoded else math.nan,
        "cores": cpu / wall,
        "p50 ms": 1000 * joined.percentile(50),
        "p95 ms": 1000 * joined.percentile(95),
        "p99 ms": 1000 * joined.percentile(99),
        "max ms": 1000 * max(joined.latencies, default=math.nan),
        "published": joined.published,
        "lost": joined.lost,
        "repeated": joined.repeated,
        "unreadable": joined.unreadable,
        "decoded fps": (b.frames_decoded - a.frames_decoded) / wall,
        "sent fps": (b.link.send.frames - a.link.send.frames) / wall,
        "returned fps": returned / wall,
        "output fps": encoded / wall,
        "filled": b.frames_filled - a.frames_filled,
        "input replaced": b.frames_dropped - a.frames_dropped,
        "output replaced": b.pipeline.frames_dropped - a.pipeline.frames_dropped,
        "round trip p50 ms": 1000 * b.link.latency_p50,  # the link's own, over its last ~10 s
        "send encode wall ms": 1000 * send_wall / send_frames if send_frames else math.nan,
        "output encode wall ms": 1000 * output_wall / output_frames if output_frames else math.nan,
        "processor in": p_in,
        "processor out": p_out,
        "processor dropped": p_dropped,
        "processor cpu %": 100 * (end.processor_cpu - start.processor_cpu) / wall,
        "source+reader cpu %": 100 * (end.source_cpu - start.source_cpu) / wall,
        "threads ms/frame": {
            stage: 1000 * seconds / returned if returned else math.nan for stage, seconds in stages.items()
        },
    }


async def _until(condition: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {what} within {within:g} s")
        await asyncio.sleep(0.05)  # polling the relay's counters: nothing to await


# -- the benchmark ------------------------------------------------------------------------------


async def run(quick: bool) -> dict[str, Any]:
    seconds, repeats = (6, 1) if quick else (20, 3)
    results: dict[str, Any] = {
        "quick": quick,
        "repeats": repeats,
        "seconds": seconds,
        "warmup": WARMUP,
        "source": f"{SOURCE[0]}x{SOURCE[1]} {FPS} fps {BITRATE / 1e6:g} Mbit/s",
        "codec threads": settings.workers(),
        "runs": {},
    }
    raw_inputs = {size: raw_input(*size, RAW_FRAMES[quick]) for size in SIZES}  # before any timing
    with named_threads():
        async with SourceProcess(*SOURCE) as source, Processor() as processor:
            bench = Bench(source, processor)
            await bench.start()
            try:
                for width, height in SIZES:
                    runs: dict[str, list[dict[str, Any]]] = {
                        "raw": [],
                        **{variant: [] for variant in VARIANTS},
                    }
                    for repeat in range(repeats):  # interleaved: drift in the machine hits all alike
                        raw = await asyncio.to_thread(raw_codec_work, raw_inputs[width, height])
                        print(f"  raw {width}x{height}: {raw['cpu ms/frame']:.2f} ms CPU/frame", flush=True)
                        runs["raw"].append(raw)
                        for variant in VARIANTS:
                            runs[variant].append(await bench.run(variant, width, height, repeat, seconds))
                    results["runs"][f"{width}x{height}"] = runs
            finally:
                await bench.close()
    return results


FIGURES = [
    "cpu ms/frame",
    "cpu ms/output frame",
    "cores",
    "p50 ms",
    "p95 ms",
    "p99 ms",
    "max ms",
    "lost",
    "repeated",
    "unreadable",
    "published",
    "returned fps",
    "output fps",
    "round trip p50 ms",
    "send encode wall ms",
    "output encode wall ms",
    "processor cpu %",
    "source+reader cpu %",
    "processor dropped",
    "input replaced",
    "output replaced",
    "filled",
    "source max gap ms",
    "input decoder lag ms",
]


def _medians(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    medians: dict[str, Any] = {key: report.median([run[key] for run in runs]) for key in FIGURES}
    stages = {stage for run in runs for stage in run["threads ms/frame"]}
    medians["threads ms/frame"] = {
        stage: report.median([run["threads ms/frame"].get(stage, 0.0) for run in runs]) for stage in stages
    }
    return medians


def _verdict(value: float, limit: float, unit: str) -> str:
    if math.isnan(value):
        return "not measured"
    margin = abs(limit - value)
    share = f"{margin:.3g} {unit} ({100 * margin / limit:.0f}%)"
    if value <= limit:
        return f"met: {value:.3g} {unit} ≤ {limit:g} {unit}, {share} to spare"
    return f"missed: {value:.3g} {unit} > {limit:g} {unit}, {share} over"


def main(quick: bool = False) -> Path:
    return write(report.timed_run(run, quick))


def write(results: dict[str, Any]) -> Path:
    """results/e2e.json and e2e.md from run()'s results."""
    rows: list[dict[str, Any]] = []
    breakdown: list[dict[str, Any]] = []
    raw_table: list[dict[str, Any]] = []
    latency_table: list[dict[str, Any]] = []
    medians: dict[str, dict[str, Any]] = {}
    for size, runs in results["runs"].items():
        raw_cpu = report.median([run["cpu ms/frame"] for run in runs["raw"]])
        raw_stages = {
            stage: report.median([run["stages ms/frame"][stage] for run in runs["raw"]])
            for stage in RAW_STAGES
        }
        figures = {variant: _medians(runs[variant]) for variant in VARIANTS}
        medians[size] = {"raw": {"cpu ms/frame": raw_cpu, "stages ms/frame": raw_stages}, **figures}
        stock_cpu = figures["stock"]["cpu ms/frame"]
        rows.append(
            {"size": size, "what": "raw codec work", "CPU ms/frame": round(raw_cpu, 2), "vs raw": 1.0}
        )
        for variant, median in figures.items():
            rows.append(
                {
                    "size": size,
                    "what": {"relay": "relay", "stock": "relay, stock aiortc encoder"}[variant],
                    "CPU ms/frame": round(median["cpu ms/frame"], 2),
                    "vs raw": round(median["cpu ms/frame"] / raw_cpu, 2),
                    "vs stock": round(median["cpu ms/frame"] / stock_cpu, 2),
                    "cores": round(median["cores"], 2),
                    "p50 ms": round(median["p50 ms"], 1),
                    "p95 ms": round(median["p95 ms"], 1),
                    "p99 ms": round(median["p99 ms"], 1),
                    "lost": median["lost"],
                    "of": median["published"],
                    "repeated": median["repeated"],
                    "unreadable": median["unreadable"],
                    "output fps": round(median["output fps"], 1),
                    "round trip p50 ms": round(median["round trip p50 ms"], 1),
                    "processor CPU %": round(median["processor cpu %"]),
                }
            )
        for variant, median in figures.items():
            lag, trip = median["input decoder lag ms"], median["round trip p50 ms"]
            latency_table.append(
                {
                    "size": size,
                    "relay": variant,
                    "end to end p50 ms": round(median["p50 ms"], 1),
                    "input Decoder holds a frame ms": round(lag, 1),
                    "WebRTC round trip p50 ms": round(trip, 1),
                    "the rest ms": round(median["p50 ms"] - lag - trip, 1),
                    "send encode wall ms": round(median["send encode wall ms"], 2),
                    "output encode wall ms": round(median["output encode wall ms"], 2),
                }
            )
        for variant, median in figures.items():
            row: dict[str, Any] = {"size": size, "relay": variant}
            for stage in [*(name for name, _ in STAGES), OTHER, ENDED]:
                row[stage] = round(median["threads ms/frame"].get(stage, 0.0), 2)
            breakdown.append(row)
        raw_table.append({"size": size, **{stage: round(ms, 2) for stage, ms in raw_stages.items()}})
    columns = list(rows[-1])  # a relay row has every column; the raw rows leave some empty
    rows = [{column: row.get(column) for column in columns} for row in rows]
    results["medians"] = medians
    small = medians.get("512x512")
    targets = ""
    if small is not None:
        relay = small["relay"]
        ratio = relay["cpu ms/frame"] / small["raw"]["cpu ms/frame"]
        targets = f"""
Targets at 512×512 30 fps (issue):
- relay CPU per frame ≤ {TARGET_CPU_MS:g} ms: {_verdict(relay["cpu ms/frame"], TARGET_CPU_MS, "ms")}
- relay CPU ≤ {TARGET_CPU_VS_RAW:g}× the raw codec work: {_verdict(ratio, TARGET_CPU_VS_RAW, "×")}
- added latency p50 ≤ {TARGET_P50_MS:g} ms: {_verdict(relay["p50 ms"], TARGET_P50_MS, "ms")}
- added latency p99 ≤ {TARGET_P99_MS:g} ms: {_verdict(relay["p99 ms"], TARGET_P99_MS, "ms")}
"""
    notes = f"""
Medians of {results["repeats"]} interleaved repeats (raw, relay, stock per repeat). CPU over
{results["seconds"]} s windows after a {WARMUP:g} s warm-up; loss and latency over the whole session,
from StartSession to the end of that window. {results["total seconds"]:g} s in all, on
{os.cpu_count()} CPUs shared with whatever else runs on the box. Source: {results["source"]},
GOP {GOP:g} s; sessions through the gRPC API, letterboxed to the size, processor passthrough in
its own process. Codec threads: {results["codec threads"]} (TRICKLE_WORKERS) in the relay and in
the raw loop alike.

- CPU ms/frame: this process's CPU (time.process_time: the relay's threads, x264's and libavcodec's
  included, and its idle gRPC server) over the window ÷ frames returned by the processor. The live
  source, the output reader and the trickle server run in a child process (bench.livesource): nothing
  is subtracted; `cores` = CPU ÷ wall time. The processor's CPU (its decode and aiortc's stock x264
  for the return leg) is apart (`processor CPU %`, 100 = one core).
- vs raw: ÷ the raw codec work, the codec calls alone in a tight loop in this process: decode of the
  720p input, scale, x264 ultrafast send leg, aiortc's decode of a stock-encoded return leg, x264
  ultrafast output (no muxing, no HTTP, no RTP). vs stock: ÷ the relay with aiortc's own encoder.
- Latency: output receive time − input publish time of the same frame index. Publish: when the
  frame's last bytes were handed to the source's SegmentWriter.write. Receive: when the chunk holding
  the frame's last TS packet arrived at the output reader (not when it decoded: the demuxer's parser
  releases a frame only once the next begins). Both on loopback through the same trickle server, so
  they include the relay's trickle GET and POST legs but hardly any network. Lost: published from
  StartSession to the window's end, never seen; repeated: output frames showing an index already
  seen (the output's fill while nothing comes back, processor re-sends); unreadable: output
  frames whose code failed its check.
- round trip p50: the link's own send → return (WebRTC leg and processor) at the end of the window.
{targets}
Where the latency goes (medians; p50s do not add up exactly). The input Decoder's hold: a Decoder
like the relay's reading the same input channel in the child process, decode time − arrival of the
frame's last byte (libavformat releases a frame only when the next frames' PES start). The round
trip: the link's own send → return (processor's jitter buffer, decode and stock re-encode, our
decode; with the stock encoder the frame is stamped as it goes into aiortc's encoder, so its
encode is in the round trip, not the rest). The rest: pacing, send encode, output encode, mux,
both trickle legs:

{report.markdown_table(latency_table)}
CPU by thread, ms per returned frame (/proc/self/task/*/schedstat over the window; codec slice
threads count with the stage whose thread started them, by the thread name they inherit):

{report.markdown_table(breakdown)}
Raw codec work by call, CPU ms per frame (process_time around each call, its slice threads included):

{report.markdown_table(raw_table)}"""
    return report.write(
        "e2e", "End to end through the gRPC API: relay vs raw codec work vs stock", results, rows, notes
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs, one repeat")
    print(main(parser.parse_args().quick).read_text())
