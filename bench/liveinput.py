"""Live inputs as people make them, and a relay's output judged the way its readers judge it
(the tests in tests/session/test_live_inputs.py and the scenarios benchmark use it).

- make_input(spec, directory): an MPEG-TS file made by the ffmpeg CLI (libx264 with its B-frames
  and GOP, AAC or Opus, any rate, variable frame rate), each frame showing its index in its pixels
  (bench.frameindex) and, once per marker period, a white flash with a beep at the same media time.
- LiveInput: that file as a live encoder writes it to a trickle channel: a segment per GOP (each
  beginning with PAT/PMT), each frame's bytes when its decode time comes (or `burst` frames at
  once), recording when each frame went out.
- Probe: the output channel read from its first segment as the bytes arrive; once it has ended,
  the figures over the whole session (frames lost, latency per frame, A/V offset at every marker,
  DTS order, what `ffmpeg -v error` says).
"""

from __future__ import annotations

import asyncio
import io
import itertools
import shutil
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from fractions import Fraction
from functools import cached_property
from pathlib import Path

import av
import numpy as np

from bench.frameindex import IndexCode
from relay_server.media.arrivals import VideoArrivals
from relay_server.media.scaler import ScaleMode
from relay_server.trickle import Publisher, Subscriber

FFMPEG = shutil.which("ffmpeg")
BEEP = 0.05  # seconds of a 1 kHz beep at every marker
FLASH_LUMA = 235
QUIET = 0.3  # seconds of silence before a beep onset counts
MARKER_WINDOW = 0.3  # seconds between a flash and the beep that goes with it, at most


@dataclass(frozen=True)
class InputSpec:
    width: int = 512
    height: int = 512
    rate: Fraction = Fraction(30)
    seconds: float = 10.0
    gop: float = 2.0  # seconds between keyframes
    b_frames: int = 0
    profile: str = "high"
    audio: str | None = "aac"  # an ffmpeg audio encoder ("aac", "mp2", "ac3"; "opus", "mp3"), or None
    variable: bool = False  # frame intervals vary (setpts), markers stay on their times
    audio_rate: int = 48000
    channels: str = "stereo"
    ts_offset: float = 0.0  # seconds added to every timestamp (near 2**33 / 90000: the PTS wraps)
    codec: str = "libx264"  # or "libx265"
    pix_fmt: str = "yuv420p"  # "yuv420p10le" with profile "high10", say
    interlaced: bool = False  # coded as fields (broadcast's 1080i)

    @property
    def frames(self) -> int:
        return round(self.seconds * self.rate)

    @property
    def marker_frames(self) -> int:
        """Frames from one marker to the next: about a second, a multiple of 3 (see `variable`)."""
        return 3 * max(1, round(self.rate / 3))

    @property
    def name(self) -> str:
        rate = f"{float(self.rate):.2f}".rstrip("0").rstrip(".")
        return (
            f"{self.width}x{self.height}-{rate}fps-{self.seconds:g}s-gop{self.gop:g}-bf{self.b_frames}"
            f"-{self.profile}-{self.audio or 'silent'}{'-vfr' if self.variable else ''}"
            f"-{self.audio_rate}-{self.channels}-off{self.ts_offset:g}-{self.codec}-{self.pix_fmt}"
            f"{'-interlaced' if self.interlaced else ''}"
        )


def make_input(spec: InputSpec, directory: Path) -> Path:
    """The clip, made once per directory."""
    path = directory / f"{spec.name}.ts"
    if path.exists():
        return path
    if FFMPEG is None:
        raise RuntimeError("the ffmpeg CLI is not installed")
    code = IndexCode(spec.width, spec.height)
    period = spec.marker_frames / spec.rate
    command = [
        FFMPEG, "-v", "error", "-y",
        "-f", "rawvideo", "-pix_fmt", "yuv420p", "-s", f"{spec.width}x{spec.height}",
        "-r", str(spec.rate), "-i", "pipe:0",
    ]  # fmt: skip
    if spec.audio is not None:
        beep = f"0.5*sin(2*PI*1000*t)*lt(mod(t\\,{float(period)})\\,{BEEP})"
        source = f"aevalsrc={beep}:s={spec.audio_rate}:c={spec.channels}:d={spec.seconds}"
        encoder = {"opus": "libopus", "mp3": "libmp3lame"}.get(spec.audio, spec.audio)
        command += ["-f", "lavfi", "-i", source, "-c:a", encoder, "-b:a", "96k"]
    if spec.variable:
        # Frame n at n/rate plus 0, 12 or 24 ms by n mod 3: intervals of 45, 45 and 9 ms at 30 fps;
        # markers (n a multiple of 3) stay where the beeps are.
        command += ["-vf", f"setpts=(N/({spec.rate})+0.012*mod(N\\,3))/TB", "-fps_mode", "vfr"]
    if spec.interlaced:
        command += ["-flags", "+ildct+ilme"]
    command += [
        "-c:v", spec.codec, "-preset", "veryfast", "-profile:v", spec.profile, "-pix_fmt", spec.pix_fmt,
        "-bf", str(spec.b_frames), "-g", str(round(spec.gop * spec.rate)),
        "-keyint_min", str(round(spec.gop * spec.rate)), "-sc_threshold", "0",
        "-b:v", "2M", "-output_ts_offset", str(spec.ts_offset),
        "-f", "mpegts", str(path),
    ]  # fmt: skip
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdin is not None
    ramp = np.tile(np.linspace(40, 110, spec.width, dtype=np.float32), (spec.height, 1))
    chroma = np.full(spec.width * spec.height // 2, 128, np.uint8).tobytes()
    for index in range(spec.frames):
        luma = np.roll(ramp, 6 * index, axis=1).astype(np.uint8)  # moving: real coding work
        if index % spec.marker_frames == 0:
            luma[:] = FLASH_LUMA
        code.draw_luma(luma, index)
        process.stdin.write(luma.tobytes() + chroma)
    _, errors = process.communicate()
    if process.returncode:
        path.unlink(missing_ok=True)
        raise RuntimeError(f"ffmpeg failed: {errors.decode(errors='replace')}")
    return path


# -- the live input ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    """One video access unit of the input file, with the bytes that follow it up to the next."""

    index: int  # the index drawn in its pixels
    data: bytes
    dts: float  # seconds
    pts: int  # 90 kHz
    keyframe: bool


class LiveInput:
    """An input file written to a channel as a live encoder would."""

    def __init__(self, path: Path, spec: InputSpec) -> None:
        self.spec = spec
        self.code = IndexCode(spec.width, spec.height)
        data = path.read_bytes()
        with av.open(io.BytesIO(data), format="mpegts") as container:
            packets = [p for p in container.demux(video=0) if p.size and p.pos is not None]
        with av.open(io.BytesIO(data), format="mpegts") as container:
            indices = {frame.pts: self.code.read(frame) for frame in container.decode(video=0)}
        assert None not in indices.values(), "an input frame's index cannot be read"
        packets.sort(key=lambda packet: packet.pos)
        self.header = data[: packets[0].pos]  # PAT and PMT: every segment begins with them
        ends = [packet.pos for packet in packets[1:]] + [len(data)]
        self.frames = [
            Frame(
                index=indices[packet.pts],
                data=data[packet.pos : end],
                dts=float(packet.dts * packet.time_base),
                pts=packet.pts,
                keyframe=packet.is_keyframe,
            )
            for packet, end in zip(packets, ends, strict=True)
        ]
        self.sent: dict[int, float] = {}  # frame index → when its bytes went out
        self._watched: dict[int, asyncio.Event] = {}
        self.presentation = {frame.index: frame.pts for frame in self.frames}  # 90 kHz
        audio = AudioFigures.of(data)
        self.audio_end, self.audio_behind = audio.end, audio.behind

    async def publish(
        self,
        publisher: Publisher,
        *,
        burst: int = 1,
        stall: tuple[float, float] | None = None,
        started: asyncio.Event | None = None,
        skip_until: float = 0.0,
    ) -> None:
        """Write every frame at its decode time from now (`burst` frames at once, when the last of
        them is due); `stall` = (at, seconds): nothing is written for that long from media time
        `at`, the timestamps going on where they were. `skip_until` seconds of the input go out at
        once (a channel that was live before anyone read it). `started` is set once the first
        bytes are out."""
        loop = asyncio.get_running_loop()
        origin = loop.time() - skip_until
        first = self.frames[0].dts
        segment = None
        pending: list[Frame] = []
        try:
            for position, frame in enumerate(self.frames):
                if frame.keyframe or segment is None:
                    if pending:
                        await self._write(segment, pending)
                        pending = []
                    if segment is not None:
                        await segment.close()
                    segment = await publisher.segment()
                    await segment.write(self.header)
                pending.append(frame)
                last = position == len(self.frames) - 1
                if len(pending) < burst and not last and not self.frames[position + 1].keyframe:
                    continue
                due = frame.dts - first
                if stall is not None and due >= stall[0]:
                    due += stall[1]
                await asyncio.sleep(max(0.0, origin + due - loop.time()))
                await self._write(segment, pending)
                pending = []
                if started is not None:
                    started.set()
        finally:
            if segment is not None:
                await segment.close()

    async def until_sent(self, index: int) -> None:
        """Wait until frame `index` has gone out."""
        if index not in self.sent:
            await self._watched.setdefault(index, asyncio.Event()).wait()

    async def _write(self, segment: object, frames: list[Frame]) -> None:
        await segment.write(b"".join(frame.data for frame in frames))  # type: ignore[attr-defined]
        now = time.monotonic()
        for frame in frames:
            self.sent[frame.index] = now
            if frame.index in self._watched:
                self._watched.pop(frame.index).set()


# -- the output ----------------------------------------------------------------------------------


@dataclass
class Marker:
    flash: float  # output media time of the flash frame (s)
    beep: float | None  # of the nearest beep onset, if any


@dataclass
class Figures:
    indices: list[int]  # output frames' indices, in output order (-1: unreadable)
    pts: list[int]  # output video pts, in output order
    sizes: list[tuple[int, int]]  # output frames' width and height, in output order
    dts_increasing: bool
    arrivals: list[float]  # when each output frame's bytes arrived
    ffmpeg_errors: str
    markers: list[Marker] = field(default_factory=list)
    audio_pts_increasing: bool = True
    audio_end: float | None = None  # where the last audio frame ends (s)
    audio_behind: float = 0.0  # the most audio is written after video of later times (s)

    def lost(self, published: list[int]) -> list[int]:
        seen = set(self.indices)
        return [index for index in published if index not in seen]

    @property
    def av_offsets(self) -> list[float]:
        return [marker.flash - marker.beep for marker in self.markers if marker.beep is not None]


class Probe:
    """The output channel from its first segment, each chunk stamped as it arrives."""

    def __init__(self, url: str, code: IndexCode) -> None:
        self.url = url
        self.code = code
        self.data = bytearray()
        self._arrivals: dict[int, float] = {}
        self._scanner = VideoArrivals(self._arrived)
        self._task = asyncio.create_task(self._read(), name=f"probe {url}")

    def _arrived(self, pts: int, at: float) -> None:
        self._arrivals.setdefault(pts, at)

    async def _read(self) -> None:
        async with Subscriber(self.url, start_seq=0, startup_grace=60) as subscriber:
            async for segment in subscriber:
                async for chunk in segment:
                    self._scanner.feed(chunk, time.monotonic())
                    self.data += chunk

    async def ended(self, within: float = 30) -> None:
        await asyncio.wait_for(asyncio.shield(self._task), within)

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    @cached_property
    def figures(self) -> Figures:
        data = bytes(self.data)
        with av.open(io.BytesIO(data), format="mpegts") as container:
            dts = [p.dts for p in container.demux(video=0) if p.size and p.dts is not None]
        lumas: list[float] = []
        indices, pts, sizes = [], [], []
        with av.open(io.BytesIO(data), format="mpegts") as container:
            for frame in container.decode(video=0):
                index = self.code.read(frame, ScaleMode.LETTERBOX)
                indices.append(-1 if index is None else index)
                pts.append(frame.pts)
                sizes.append((frame.width, frame.height))
                lumas.append(float(np.frombuffer(memoryview(frame.planes[0]), np.uint8).mean()))
        figures = Figures(
            indices=indices,
            pts=pts,
            sizes=sizes,
            dts_increasing=all(b > a for a, b in itertools.pairwise(dts)),
            arrivals=[self._arrivals.get(p, float("nan")) for p in pts],
            ffmpeg_errors=ffmpeg_errors(data),
        )
        audio = AudioFigures.of(data)
        beeps = audio.onsets
        figures.audio_pts_increasing, figures.audio_end = audio.increasing, audio.end
        figures.audio_behind = audio.behind
        if lumas:
            threshold = statistics.median(lumas) + 40
            flashes = [p / 90_000 for p, luma in zip(pts, lumas, strict=True) if luma > threshold]
            for flash in flashes:
                near = [beep for beep in beeps if abs(beep - flash) < MARKER_WINDOW]
                figures.markers.append(
                    Marker(flash, min(near, key=lambda beep: abs(beep - flash), default=None))
                )
        return figures


@dataclass
class AudioFigures:
    onsets: list[float]  # media times at which a beep starts (s)
    increasing: bool  # audio timestamps only go forward
    end: float | None  # where the last audio frame ends (s); None: no audio
    # How far audio is written behind the video, at most (s): the newest video timestamp before
    # an audio packet, less the packet's. A reader plays each packet only once it is in, so it
    # must wait that long for the sound to a picture it has.
    behind: float = 0.0

    @classmethod
    def of(cls, data: bytes) -> AudioFigures:
        """The audio of an MPEG-TS stream, decoded."""
        figures = cls([], True, None)
        packets: list[int] = []
        with av.open(io.BytesIO(data), format="mpegts") as container:
            if not container.streams.audio:
                return figures
            audio, newest = container.streams.audio[0], None
            for packet in container.demux():
                if not packet.size or packet.pts is None:
                    continue
                if packet.stream.type == "video":
                    newest = packet.pts if newest is None else max(newest, packet.pts)
                elif packet.stream is audio:
                    packets.append(packet.pts)
                    if newest is not None and audio.time_base is not None:
                        figures.behind = max(figures.behind, float((newest - packet.pts) * audio.time_base))
        figures.increasing = all(b > a for a, b in itertools.pairwise(packets))
        with av.open(io.BytesIO(data), format="mpegts") as container:
            quiet_since: float | None = None
            for frame in container.decode(audio=0):
                if frame.time is None:
                    continue
                start = frame.time
                figures.end = max(figures.end or start, start + frame.samples / frame.sample_rate)
                samples = np.abs(frame.to_ndarray()).max(axis=0)
                loud = np.flatnonzero(samples > 0.1)
                if quiet_since is None:
                    quiet_since = start
                if loud.size:
                    onset = start + loud[0] / frame.sample_rate
                    if onset - quiet_since >= QUIET:
                        figures.onsets.append(onset)
                    quiet_since = start + (loud[-1] + 1) / frame.sample_rate
        return figures


def ffmpeg_errors(data: bytes) -> str:
    """What `ffmpeg -v error -i out.ts -f null -` prints about the output."""
    assert FFMPEG is not None
    result = subprocess.run(
        [FFMPEG, "-v", "error", "-i", "pipe:0", "-f", "null", "-"],
        input=data,
        capture_output=True,
        check=False,
    )
    return result.stderr.decode(errors="replace")
