"""Catch-up: one session fed as fast as it takes its input. `python -m bench catchup [--quick]`.

A pre-encoded input (1280×720 30 fps indexed frames, as the live source encodes them: x264
ultrafast, 3 Mbit/s, 1 s GOPs, so 30 frames per segment) is published on its channel at full
speed: each segment as soon as the relay's subscriber has reached the one AHEAD before it (the
trickle ring keeps 5 segments: a publisher further ahead would push the reader out of the ring,
which then jumps to the live edge and skips the rest). So the input is never what waits.

The session (through the gRPC API, 512×512 letterboxed, passthrough processor in its own process)
runs with the link settings of each variant:
- catch-up: LinkSettings(pace=False): a frame goes to the processor as soon as it is decoded and
  fewer than max_in_flight (4) frames are out;
- catch-up with max_in_flight 8, and with no in-flight limit: is the window the bottleneck?
- live default: LinkSettings() (pace=True): frames leave at their media time.
The relay's decoder reads and decodes the input as fast as it can in every variant (the hand-off
to the sender keeps only the newest frame), so the input is consumed at decode speed and what the
sender cannot take is replaced ("input replaced").

The trickle server, the publisher and a reader of the output channel (which stamps each output
frame's arrival without decoding it, bench.livesource.ArrivalScanner) run in a child process
(`python -m bench.catchup --child`), so this process's CPU is the relay's. Measured from a warm-up
after the first returned frame until the relay has decoded all but the last segment.

Baseline: the codec work alone, in a tight loop on this process (bench.e2e.raw_codec_work for the
relay's calls; and the processor's: aiortc's decode of our send leg and aiortc's stock H264Encoder
at 512×512), which bounds the frame rate the box can reach with every frame processed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import logging
import math
import os
import sys
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import av.container
from aiortc.codecs.h264 import H264Decoder, H264Encoder
from aiortc.jitterbuffer import JitterFrame

from bench import child, report
from bench.capacity import until
from bench.child import reply
from bench.cpubreakdown import system_cpu
from bench.e2e import (
    ENDED,
    OTHER,
    STAGES,
    RawInput,
    ThreadSampler,
    raw_codec_work,
    raw_input,
    serve_relay,
)
from bench.frameindex import IndexCode
from bench.livesource import BITRATE, FPS, GOP, ArrivalScanner
from bench.media import source_frames
from bench.threadnames import named_threads
from bench.webrtc import Processor
from relay_server.api.relay.v1 import relay_service_pb2 as pb
from relay_server.api.relay.v1 import relay_service_pb2_grpc as pb_grpc
from relay_server.media.encoder import CLOCK, VideoEncoder
from relay_server.media.scaler import ScaleMode, Scaler
from relay_server.media.segmenter import Segmenter
from relay_server.service.server import RelayServer
from relay_server.session.manager import SessionManager
from relay_server.session.relay import RelayStats
from relay_server.trickle import Publisher, Subscriber
from relay_server.trickle.server import TrickleServer
from relay_server.webrtc.link import LinkSettings

log = logging.getLogger(__name__)

SOURCE = (1280, 720)
SIZE = (512, 512)
# Seconds of pre-encoded input (quick, full). The relay decodes it at 400-1000 fps (media speed
# 13-35×), so 150 s make a window of 5-10 s.
INPUT_SECONDS = {True: 60, False: 150}
REPEATS = {True: 1, False: 2}
RAW_FRAMES = {True: 90, False: 300}
AHEAD = 2  # segments published beyond the one the relay reads
WARMUP = 0.5  # seconds after the first returned frame, not measured
CONNECT_TIMEOUT = 30.0
TARGET_FPS = 150.0  # issue: catch-up throughput

MAX_WINDOW = 10.0  # seconds at most of a window (a variant that processes every frame is slow)
VARIANTS = {
    "catch-up": LinkSettings(pace=False),
    "catch-up, 8 in flight": LinkSettings(pace=False, max_in_flight=8),
    "catch-up, no in-flight limit": LinkSettings(pace=False, max_in_flight=0),
    "live default (paced)": LinkSettings(),
}


# -- the child: trickle server, full-speed publisher, output scanner ------------------------------


class _Collect:
    """A SegmentSink keeping each segment's writes."""

    def __init__(self) -> None:
        self.segments: list[list[bytes]] = []

    def begin(self, index: int) -> None:
        self.segments.append([])

    def write(self, data: bytes) -> None:
        self.segments[-1].append(bytes(data))

    def end(self, index: int) -> None:
        pass


def encode_input(frames: int) -> list[list[bytes]]:
    """`frames` indexed 1280×720 frames as the live source encodes them, cut into segments (one per
    GOP), each a list of the byte strings the segmenter wrote (one per frame)."""
    width, height = SOURCE
    code = IndexCode(width, height)
    pictures = source_frames(width, height)
    encoder = VideoEncoder(width, height, gop=GOP, bitrate=BITRATE, fps=FPS)
    sink = _Collect()
    segmenter = Segmenter(sink, width, height)
    for index in range(frames):
        picture = pictures[index % len(pictures)]
        code.draw(picture, index)
        for packet in encoder.encode(picture, round(index / FPS / CLOCK)):
            segmenter.mux_video(packet)
    for packet in encoder.close():
        segmenter.mux_video(packet)
    segmenter.close()
    return sink.segments


def _reader_at(server: TrickleServer, name: str) -> int | None:
    """The newest segment of channel `name` a reader is on (reading or waiting), if any."""
    snapshot = server.snapshot(name)
    if snapshot is None:
        return None
    return max((seq for seq, segment in snapshot.segments.items() if segment.readers), default=None)


class Publishing:
    def __init__(self) -> None:
        self.published = 0  # segments
        self.first: float | None = None  # when the first segment was published
        self.last: float | None = None  # when the last one was


async def _publish(
    server: TrickleServer, publisher: Publisher, name: str, segments: list[list[bytes]], state: Publishing
) -> None:
    try:
        for seq, chunks in enumerate(segments):

            def within_reach(seq: int = seq) -> bool:
                # Not before a reader is on the channel, never more than AHEAD segments ahead of it.
                at = _reader_at(server, name)
                return at is not None and seq <= at + AHEAD

            await server.wait_until(within_reach, timeout=120)
            writer = await publisher.segment()
            for chunk in chunks:
                await writer.write(chunk)
            await writer.close()
            state.published = seq + 1
            state.first = state.first or time.monotonic()
        state.last = time.monotonic()
        # Until the reader asks for the segment after the last: then it has every byte, and the
        # channel's deletion (its end of input) cuts nothing short.
        with contextlib.suppress(TimeoutError):
            await server.wait_until(lambda: (_reader_at(server, name) or 0) >= len(segments), timeout=60)
    except Exception as error:
        log.warning("publishing %s: %r", name, error)
        raise
    finally:
        await publisher.close()  # DELETE: the input ends


class Scan:
    """Reads an output channel from its first segment, stamping each frame's arrival."""

    def __init__(self, url: str) -> None:
        self.scanner = ArrivalScanner()
        self.subscriber = Subscriber(url, start_seq=0, startup_grace=60.0)
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for segment in self.subscriber:
            async for chunk in segment:
                self.scanner.feed(chunk, time.monotonic())

    async def stop(self, within: float) -> list[float]:
        with contextlib.suppress(TimeoutError, Exception):
            await asyncio.wait_for(asyncio.shield(self.task), within)
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.subscriber.close()
        return sorted(self.scanner.arrivals.values())


async def serve(frames: int) -> None:
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    segments = await asyncio.to_thread(encode_input, frames)
    publishing: dict[str, tuple[Publishing, asyncio.Task[None]]] = {}
    scans: dict[str, Scan] = {}
    async with TrickleServer() as server:
        reply(
            {
                "server": server.url,
                "pid": os.getpid(),
                "frames": frames,
                "segments": len(segments),
                "bytes": sum(len(chunk) for chunks in segments for chunk in chunks),
            }
        )
        try:
            while line := await stdin.readline():
                request = json.loads(line)
                op, name = request["op"], request.get("name", "")
                if op == "publish":  # the input at full speed on channel `name`
                    publisher = Publisher(server.channel_url(name))
                    await publisher.create_channel()
                    state = Publishing()
                    task = asyncio.create_task(_publish(server, publisher, name, segments, state))
                    publishing[name] = (state, task)
                    reply({"url": publisher.url})
                elif op == "published":
                    state, task = publishing[name]
                    reply(
                        {
                            "segments": state.published,
                            "first": state.first,
                            "last": state.last,
                            "done": task.done(),
                        }
                    )
                elif op == "scan":  # read output channel `name` (created here)
                    url = server.channel_url(name)
                    creator = Publisher(url)
                    await creator.create_channel()
                    await creator.close(delete_channel=False)
                    scans[name] = Scan(url)
                    reply({"url": url})
                elif op == "collect":  # the output's arrival times, once it ended (or `within`)
                    arrivals = await scans.pop(name).stop(float(request.get("within", 2.0)))
                    reply({"arrivals": arrivals})
                else:
                    reply({"error": f"unknown op {op!r}"})
        finally:
            for scan in scans.values():
                await scan.stop(0.0)
            for _, task in publishing.values():
                task.cancel()
            await asyncio.gather(*(task for _, task in publishing.values()), return_exceptions=True)


class Child(child.Child):
    """`python -m bench.catchup --child` as a child process: `ready` says what input it made."""

    def __init__(self, frames: int) -> None:
        # It encodes the whole input before it is ready.
        args = ["--child", "--frames", str(frames)]
        super().__init__("bench.catchup", args, what="catch-up child", ready_within=300)

    async def __aenter__(self) -> Child:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


def process_threads(pid: int) -> dict[int, tuple[str, float]]:
    """CPU seconds of every thread of process `pid` so far, by tid, with its comm."""
    threads = {}
    tick = os.sysconf("SC_CLK_TCK")
    with contextlib.suppress(OSError):
        for entry in os.listdir(f"/proc/{pid}/task"):
            try:
                text = Path(f"/proc/{pid}/task/{entry}/stat").read_text()
            except OSError:
                continue
            comm = text[text.index("(") + 1 : text.rindex(")")]
            fields = text.rsplit(")", 1)[1].split()
            threads[int(entry)] = (comm, (int(fields[11]) + int(fields[12])) / tick)
    return threads


def busiest(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> tuple[str, float]:
    """The thread that spent the most CPU between two process_threads() samples: comm, seconds."""
    spent = [(seconds - before.get(tid, (name, 0.0))[1], name) for tid, (name, seconds) in after.items()]
    seconds, name = max(spent, default=(0.0, ""))
    return name, seconds


# -- raw codec work: what the box can do at most -------------------------------------------------


def processor_codec_work(raw: RawInput) -> dict[str, float]:
    """CPU per frame of the processor's codec calls (passthrough): aiortc's decode of our send leg
    (x264 ultrafast Baseline, the link's settings) and aiortc's stock H264Encoder (x264 default
    preset, zerolatency) for the return leg."""
    send = LinkSettings().send_encoder(raw.width, raw.height)
    scaler = Scaler(raw.width, raw.height, ScaleMode.LETTERBOX)
    packets = []
    with av.open(io.BytesIO(raw.stream), format="mpegts") as container:
        assert isinstance(container, av.container.InputContainer)
        for number, frame in enumerate(container.decode(video=0)):
            pts = round(number / FPS / CLOCK)
            encoded = send.encode(scaler(frame), pts)
            if encoded:
                packets.append((b"".join(bytes(packet) for packet in encoded), pts))
    decoder, encoder = H264Decoder(), H264Encoder()
    clock = time.process_time
    decode = encode = encode_wall = 0.0
    frames = 0
    for data, pts in packets:
        mark = clock()
        decoded = decoder.decode(JitterFrame(data, pts))
        now = clock()
        decode += now - mark
        for picture in decoded:
            picture.pts, picture.time_base = pts, Fraction(1, 90_000)
            wall = time.perf_counter()
            encoder.encode(picture)
            encode_wall += time.perf_counter() - wall
            frames += 1
        encode += clock() - now
    frames = max(frames, 1)
    return {
        "decode ms/frame": 1000 * decode / frames,
        "stock encode ms/frame": 1000 * encode / frames,
        # aiortc's sender encodes one frame at a time: 1000 ÷ this bounds its frame rate.
        "stock encode wall ms/frame": 1000 * encode_wall / frames,
        "cpu ms/frame": 1000 * (decode + encode) / frames,
    }


# -- the benchmark ------------------------------------------------------------------------------


class Bench:
    def __init__(self, child: Child, processor: Processor, stack: contextlib.AsyncExitStack) -> None:
        self.child = child
        self.processor = processor
        self.stack = stack
        self.servers: dict[str, RelayServer] = {}
        self.stubs: dict[str, pb_grpc.RelayServiceStub] = {}

    async def start(self) -> None:
        for variant, link in VARIANTS.items():
            manager = SessionManager(link=link)
            self.servers[variant], self.stubs[variant] = await serve_relay(self.stack, manager)

    async def snapshot(self, stats: RelayStats) -> dict[str, Any]:
        busy, _ = system_cpu()
        return {
            "wall": time.monotonic(),
            "cpu": time.process_time(),
            "stats": stats,
            "processor cpu": self.processor.cpu_seconds(),
            "processor frames": await self.processor.frames(),
            "child cpu": self.child.cpu_seconds(),
            "box": busy,
            "processor threads": process_threads(self.processor.process.pid)
            if self.processor.process
            else {},
        }

    async def run(self, variant: str, repeat: int) -> dict[str, Any]:
        session_id = f"v{list(VARIANTS).index(variant)}-{repeat}"
        total = int(self.child.ready["frames"])
        source = await self.child.request("publish", name=f"in-{session_id}")
        output = await self.child.request("scan", name=f"out-{session_id}")
        manager = self.servers[variant].manager
        stub = self.stubs[variant]
        await stub.StartSession(
            pb.StartSessionRequest(
                session_id=session_id,
                subscribe_url=source["url"],
                publish_url=output["url"],
                processor_url=self.processor.url,
                width=SIZE[0],
                height=SIZE[1],
                mode=pb.SESSION_MODE_TRANSCODE,  # the transcoding path's throughput
            )
        )
        session = manager.get(session_id)
        relay = session.relay
        try:
            await until(lambda: relay.stats.frames_returned > 0, CONNECT_TIMEOUT, "returned frame")
            await asyncio.sleep(WARMUP)
            sampler = ThreadSampler()
            start = await self.snapshot(relay.stats)
            sampler.start()
            # Until all but the last segment is decoded (the tail, the input's end and the drain
            # of the last frames, is not throughput), or MAX_WINDOW.
            with contextlib.suppress(RuntimeError):
                await until(
                    lambda: session.done or relay.stats.frames_decoded >= total - FPS * GOP,
                    MAX_WINDOW,
                    "end of input",
                )
            end = await self.snapshot(relay.stats)
            await sampler.stop()
            with contextlib.suppress(RuntimeError):
                await until(lambda: session.done, 10.0, "session end")
        finally:
            await stub.StopSession(pb.StopSessionRequest(session_id=session_id))
        arrivals = (await self.child.request("collect", name=f"out-{session_id}", within=3.0))["arrivals"]
        published = await self.child.request("published", name=f"in-{session_id}")
        result = _figures(start, end, arrivals)
        wall = end["wall"] - start["wall"]
        stages = sampler.by_stage(end["cpu"] - start["cpu"])
        result["relay cores by stage"] = {stage: seconds / wall for stage, seconds in stages.items()}
        name, seconds = busiest(start["processor threads"], end["processor threads"])
        result["processor busiest thread"] = name
        result["processor busiest thread cores"] = seconds / wall
        result["input segments published"] = published["segments"]
        result["session"] = f"{session.state.value}: {session.reason}"
        print(
            f"  {variant} #{repeat}: published {result['published fps']:.0f} fps, returned"
            f" {result['returned fps']:.0f}, input decoded {result['decoded fps']:.0f} fps"
            f" ({result['input replaced %']:.0f}% replaced); relay {result['relay cores']:.2f} cores,"
            f" processor {result['processor cores']:.2f}; in-flight wait {result['throttled %']:.0f}%",
            flush=True,
        )
        return result


def _figures(start: dict[str, Any], end: dict[str, Any], arrivals: list[float]) -> dict[str, Any]:
    wall = end["wall"] - start["wall"]
    a: RelayStats = start["stats"]
    b: RelayStats = end["stats"]
    decoded = b.frames_decoded - a.frames_decoded
    sent = b.link.send.frames - a.link.send.frames
    returned = b.frames_returned - a.frames_returned
    p_in, p_out, p_dropped = (
        y - x for x, y in zip(start["processor frames"], end["processor frames"], strict=True)
    )
    published = sum(1 for at in arrivals if start["wall"] <= at < end["wall"])
    send_frames = b.link.encoder.frames - a.link.encoder.frames
    send_wall = b.link.encoder.encode_wall_seconds - a.link.encoder.encode_wall_seconds
    relay_cpu = end["cpu"] - start["cpu"]
    return {
        "seconds": round(wall, 2),
        "decoded fps": decoded / wall,
        "media speed": decoded / wall / FPS,  # input seconds consumed per second
        "sent fps": sent / wall,
        "returned fps": returned / wall,
        "encoded fps": (b.frames_encoded - a.frames_encoded) / wall,
        "published fps": published / wall,
        "input replaced %": 100 * (b.frames_dropped - a.frames_dropped) / decoded if decoded else math.nan,
        "output replaced": b.pipeline.frames_dropped - a.pipeline.frames_dropped,
        "filled": b.frames_filled - a.frames_filled,
        "presumed lost": b.link.send.presumed_lost - a.link.send.presumed_lost,
        "relay cores": relay_cpu / wall,
        "relay cpu ms/returned": 1000 * relay_cpu / returned if returned else math.nan,
        "processor cores": (end["processor cpu"] - start["processor cpu"]) / wall,
        "processor in": p_in,
        "processor out": p_out,
        "processor dropped": p_dropped,
        "child cores": (end["child cpu"] - start["child cpu"]) / wall,
        "box busy cores": (end["box"] - start["box"]) / wall,
        "others cores": (end["box"] - start["box"] - relay_cpu) / wall
        - (end["processor cpu"] - start["processor cpu"]) / wall
        - (end["child cpu"] - start["child cpu"]) / wall,
        "throttled %": 100 * (b.link.send.throttled_seconds - a.link.send.throttled_seconds) / wall,
        "paced %": 100 * (b.link.send.paced_seconds - a.link.send.paced_seconds) / wall,
        "round trip p50 ms": 1000 * b.link.latency_p50,
        "send encode wall ms": 1000 * send_wall / send_frames if send_frames else math.nan,
    }


async def run(quick: bool) -> dict[str, Any]:
    frames = INPUT_SECONDS[quick] * FPS
    repeats = REPEATS[quick]
    results: dict[str, Any] = {
        "quick": quick,
        "repeats": repeats,
        "input": f"{SOURCE[0]}x{SOURCE[1]} {FPS} fps {BITRATE / 1e6:g} Mbit/s, {INPUT_SECONDS[quick]} s"
        f" ({frames} frames), {GOP:g} s GOPs and segments",
        "size": f"{SIZE[0]}x{SIZE[1]}",
        "runs": {variant: [] for variant in VARIANTS},
    }
    raw = raw_input(*SIZE, RAW_FRAMES[quick])
    relay_raw = await asyncio.to_thread(raw_codec_work, raw)
    processor_raw = await asyncio.to_thread(processor_codec_work, raw)
    results["raw"] = {"relay": relay_raw, "processor": processor_raw}
    print(
        f"  raw: relay {relay_raw['cpu ms/frame']:.2f} ms/frame, processor"
        f" {processor_raw['cpu ms/frame']:.2f} ms/frame",
        flush=True,
    )
    async with contextlib.AsyncExitStack() as stack:
        stack.enter_context(named_threads())  # codec threads named by the stage that starts them
        child = await stack.enter_async_context(Child(frames))
        results["input bytes"] = child.ready["bytes"]
        results["input segments"] = child.ready["segments"]
        processor = await stack.enter_async_context(Processor())
        bench = Bench(child, processor, stack)
        await bench.start()
        for repeat in range(repeats):  # interleaved: drift in the machine hits every variant alike
            for variant in VARIANTS:
                results["runs"][variant].append(await bench.run(variant, repeat))
    return results


def main(quick: bool = False) -> Path:
    return write(report.timed_run(run, quick))


ROW_FIGURES = [
    ("published fps", 0),
    ("returned fps", 0),
    ("sent fps", 0),
    ("decoded fps", 0),
    ("media speed", 1),
    ("input replaced %", 0),
    ("relay cores", 2),
    ("relay cpu ms/returned", 2),
    ("processor cores", 2),
    ("processor busiest thread cores", 2),
    ("child cores", 2),
    ("box busy cores", 2),
    ("others cores", 2),
    ("throttled %", 0),
    ("paced %", 0),
    ("round trip p50 ms", 1),
    ("processor dropped", 0),
]


def write(results: dict[str, Any]) -> Path:
    rows = []
    medians: dict[str, dict[str, float]] = {}
    for variant, runs in results["runs"].items():
        median = {key: report.median([run[key] for run in runs]) for key, _ in ROW_FIGURES}
        medians[variant] = median
        row: dict[str, Any] = {"variant": variant}
        settings = VARIANTS[variant]
        row["pace"] = "on" if settings.pace else "off"
        row["max in flight"] = settings.max_in_flight or "none"
        for key, digits in ROW_FIGURES:
            value = median[key]
            row[key] = round(value, digits) if not math.isnan(value) else value
            if digits == 0 and not math.isnan(value):
                row[key] = round(value)
        rows.append(row)
    results["medians"] = medians
    breakdown = []
    for variant, runs in results["runs"].items():
        row = {"variant": variant}
        for stage in [*(name for name, _ in STAGES), OTHER, ENDED]:
            row[stage] = round(
                report.median([run["relay cores by stage"].get(stage, 0.0) for run in runs]), 2
            )
        row["processor busiest thread"] = runs[0]["processor busiest thread"]
        breakdown.append(row)
    raw = results["raw"]
    relay_raw = raw["relay"]["cpu ms/frame"]
    processor_raw = raw["processor"]["cpu ms/frame"]
    decode_raw = raw["relay"]["stages ms/frame"]["input decode"]
    stock_wall = raw["processor"]["stock encode wall ms/frame"]
    cpus = os.cpu_count() or 1
    ceiling = 1000 * cpus / (relay_raw + processor_raw)
    catch, wider = medians["catch-up"], medians["catch-up, 8 in flight"]
    racing = catch["input replaced %"] >= 5  # the relay's decoder does not wait for the sender
    waits = catch  # the relay's decoder waits for the sender in catch-up
    verdict = "met" if catch["published fps"] >= TARGET_FPS else "missed"
    best_name, best = max(medians.items(), key=lambda item: item[1]["published fps"])
    input_cores = {
        variant: report.median([run["relay cores by stage"].get(STAGES[0][0], 0.0) for run in runs])
        for variant, runs in results["runs"].items()
    }
    unlimited = medians["catch-up, no in-flight limit"]
    fps, speed, replaced = catch["published fps"], catch["media speed"], catch["input replaced %"]
    gain = 100 * (wider["published fps"] / fps - 1)
    stock_cpu = raw["processor"]["stock encode ms/frame"]
    waiting = "`catch-up`"
    if racing:
        decoder = f"""\
- The relay's own input decoder races ahead: it never waits for the sender (the hand-off keeps the
  newest frame), so it decodes every input frame, at {catch["decoded fps"]:.0f} fps
  ({input_cores["catch-up"]:.2f} cores), for frames it then drops; the relay takes
  {catch["relay cores"]:.2f} cores, {catch["relay cpu ms/returned"]:.1f} ms per returned frame.
"""
    else:
        decoder = f"""\
- The relay's input decoder waits for the sender in catch-up ({catch["input replaced %"]:.1f}% of the
  input replaced): every input frame goes through, the relay at {catch["relay cores"]:.2f} cores,
  {catch["relay cpu ms/returned"]:.1f} ms per frame (input decode {input_cores["catch-up"]:.2f} cores).
"""
    idle = cpus - waits["box busy cores"]
    processor_ms = 1000 * waits["processor cores"] / waits["returned fps"]
    notes = f"""
Catch-up throughput, frames published per second with LinkSettings(pace=False) (`catch-up`):
**{fps:.0f} fps** (input consumed at {speed:.0f}× real time, {replaced:.0f}% of its frames replaced
before they could be sent); target (issue) ≥ {TARGET_FPS:g} fps: {verdict}. Best variant: {best_name},
{best["published fps"]:.0f} fps.

What limits it, on this box with the processor on it:
- Not the in-flight window: 8 frames in flight give {wider["published fps"]:.0f} fps against {fps:.0f}
  ({gain:+.0f}%); the sender waits for room {catch["throttled %"]:.0f}% of the window because the
  frames are at the processor.
- The processor, sharing the CPUs: handed every frame (no in-flight limit,
  {unlimited["sent fps"]:.0f} fps sent) it returns {unlimited["returned fps"]:.0f} fps and drops the rest
  (`processor dropped`: its input keeps the newest frame), at {unlimited["processor cores"]:.2f} cores
  (aiortc's decode, its stock x264 at the default preset, RTP and SRTP in Python). With the
  relay's decoder waiting ({waiting}) the box has {idle:.2f} cores idle and the processor
  still returns only {waits["returned fps"]:.0f} fps, at {waits["processor cores"]:.2f} cores
  ({processor_ms:.1f} ms CPU per frame): its own pipeline is the bound.
  Not its encode alone: {stock_wall:.1f} ms wall per 512×512 frame in a tight loop here
  ({1000 / stock_wall:.0f} fps), {stock_cpu:.2f} ms CPU.
{decoder}- CPU: {cpus} CPUs; box busy {catch["box busy cores"]:.2f} cores in `catch-up`. Codec ceiling
  (baseline: the codec calls alone, tight loop, this process): relay {relay_raw:.2f} ms CPU/frame
  (input decode {decode_raw:.2f} of it), processor {processor_raw:.2f} ms ({stock_cpu:.2f} of it
  aiortc's stock x264): with every frame processed and both CPUs busy, at most {ceiling:.0f} fps
  end to end.

Input: {results["input"]}, pre-encoded, published at full speed ({AHEAD} segments ahead of the relay's
reader at most: the trickle ring holds 5); session {results["size"]} letterboxed, passthrough processor in
its own process, started through the gRPC API. Medians of {results["repeats"]} interleaved repeat(s);
{results["total seconds"]:g} s in all. Window: from {WARMUP:g} s after the first returned frame until the
relay had decoded all but the last segment, or {MAX_WINDOW:g} s.

- published fps: frames that arrived on the output channel in the window (the child's reader stamps
  every frame's last TS packet) ÷ the window; returned: frames back from the processor; decoded:
  input frames decoded; media speed = decoded ÷ 30, input seconds consumed per second.
- input replaced %: decoded frames replaced by a newer one before the sender took them.
- relay cores: this process's CPU ÷ wall (decoding every input frame included: an H.264 stream
  cannot be decoded in part); processor cores: the processor process; child: trickle server,
  publisher and output reader (no decoding); box busy: /proc/stat, everything on the box;
  others: box busy minus those three, whatever else ran meanwhile.
- throttled %: share of the window the sender waited for in-flight room (max_in_flight frames out
  at the processor); paced %: share it held a frame back until its media time.
- live default (pace on): the pacer holds each frame until its media time and re-anchors on one
  more than 1 s early, so on an input far ahead it sends a few frames in bursts and drops the rest
  (the output is filled with repeats meanwhile: published > returned): the live default does not
  speed up, it stays near media time and skips what it is behind.
- processor busiest thread cores: its thread that spent the most CPU (comm): far below 1, so the
  processor is not bound by one saturated thread but by its serial encode and the shared CPUs.

Relay CPU by thread, cores (medians; /proc/self/task/*/schedstat over the window, codec threads
counted with the stage whose thread started them):

{report.markdown_table(breakdown)}"""
    return report.write("catchup", "Catch-up: one session fed as fast as it goes", results, rows, notes)


def main_child() -> None:
    parser = argparse.ArgumentParser(description="bench catchup's child")
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--frames", type=int, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncio.run(serve(args.frames))


if __name__ == "__main__":
    if "--child" in sys.argv:
        main_child()
    else:
        parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
        parser.add_argument("--quick", action="store_true", help="a shorter input, one repeat")
        print(main(parser.parse_args().quick).read_text())
