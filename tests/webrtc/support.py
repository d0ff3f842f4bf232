"""What the link tests share: solid test frames, a producer thread, event-driven waits, and the
processor as a separate process (to kill it, or to keep its tasks out of the test's loop)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import IO, Any

import aiohttp
import av
import numpy as np

from relay_server.media.handoff import FrameQueue
from relay_server.webrtc import LinkError, LinkState, ProcessorLink

WIDTH, HEIGHT = 256, 256
CLOCK = Fraction(1, 90_000)
FPS = 30.0


def graph(class_type: str) -> dict[str, Any]:
    return {"1": {"class_type": class_type, "inputs": {}}}


def solid(y: int, u: int = 128, v: int = 128) -> av.VideoFrame:
    """A static frame: every pixel the same, so that every returned frame is comparable."""
    frame = av.VideoFrame(WIDTH, HEIGHT, "yuv420p")
    for plane, value in zip(frame.planes, (y, u, v), strict=True):
        np.frombuffer(memoryview(plane), np.uint8)[:] = value
    frame.time_base = CLOCK
    return frame


@dataclass(frozen=True)
class Returned:
    """One returned frame: when it arrived and its mean Y, U, V over the central region."""

    at: float
    y: float
    u: float
    v: float


def measure(frame: av.VideoFrame, at: float) -> Returned:
    pixels = frame.to_ndarray(format="yuv420p")  # (h * 3/2, w): Y, then U and V stacked
    h, w = frame.height, frame.width
    y = pixels[:h]
    u = pixels[h : h + h // 4].reshape(h // 2, w // 2)
    v = pixels[h + h // 4 :].reshape(h // 2, w // 2)
    central = (slice(h // 4, 3 * h // 4), slice(w // 4, 3 * w // 4))
    half = (slice(h // 8, 3 * h // 8), slice(w // 8, 3 * w // 8))
    return Returned(at, float(y[central].mean()), float(u[half].mean()), float(v[half].mean()))


class Changes:
    """Wakes waiters whenever something they may be waiting for happened (no polling)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()

    async def until(self, condition: Callable[[], bool], within: float, what: str) -> None:
        try:
            async with asyncio.timeout(within):
                while not condition():
                    self._event.clear()
                    await self._event.wait()
        except TimeoutError:
            raise AssertionError(f"not within {within:g} s: {what}") from None


class Producer:
    """The input: puts `image` into the hand-off at 30 fps from a thread (its pacing is the
    source's, not synchronisation), with pts on the 90 kHz clock. stall() pauses it once."""

    def __init__(self, frames: FrameQueue, image: av.VideoFrame, changes: Changes) -> None:
        self.frames = frames
        self.image = image
        self.put = 0
        self.stalled_at: float | None = None
        self.resumed_at: float | None = None
        self._changes = changes
        self._loop = asyncio.get_running_loop()
        self._stop = threading.Event()
        self._stall: tuple[float, av.VideoFrame] | None = None
        self._thread = threading.Thread(target=self._run, name="test-producer", daemon=True)
        self._thread.start()

    def stall(self, seconds: float, then: av.VideoFrame) -> None:
        """Stop putting frames for `seconds`, then go on with `then`."""
        self._stall = (seconds, then)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        due = time.monotonic()
        while not self._stop.is_set():
            if self._stall is not None:
                (seconds, then), self._stall = self._stall, None
                self.stalled_at = time.monotonic()
                if self._stop.wait(seconds):
                    return
                self.image = then
                self.resumed_at = due = time.monotonic()
                self._notify()
            image = self.image
            image.pts = self.put * 3000
            self.frames.put(image)
            self.put += 1
            due += 1 / FPS
            delay = due - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)
            elif delay < -0.2:
                due = time.monotonic()  # fell far behind (a loaded machine): do not burst

    def _notify(self) -> None:
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._changes.notify)


@dataclass
class Rig:
    """A link with its input and what it returned and reported."""

    link: ProcessorLink
    frames: FrameQueue
    changes: Changes
    task: asyncio.Task[None] | None = None
    producer: Producer | None = None
    returns: list[Returned] = field(default_factory=list)
    states: list[tuple[LinkState, str]] = field(default_factory=list)

    async def until(self, condition: Callable[[], bool], within: float, what: str) -> None:
        await self.changes.until(condition, within, f"{what} (link: {self.link.stats})")

    async def returned(self, count: int, within: float = 20, after: int = 0) -> None:
        """Wait until `count` frames returned after the first `after` ones."""
        await self.until(lambda: len(self.returns) >= after + count, within, f"{count} frames back")

    def reached(self, state: LinkState) -> bool:
        return any(seen is state for seen, _ in self.states)

    def start(self) -> None:
        self.task = asyncio.create_task(self.link.run(), name="test-link-run")
        self.task.add_done_callback(lambda _: self.changes.notify())

    async def close(self) -> None:
        """Stop the link and await run(), then the producer. run() must return after stop(); an
        error other than LinkError (which tests that expect one check) fails the test."""
        try:
            await self.link.stop()
            if self.task is not None:
                done, _ = await asyncio.wait([self.task], timeout=30)
                assert done, "run() did not return within 30 s of stop()"
                error = self.task.exception()
                if error is not None and not isinstance(error, LinkError):
                    raise error
        finally:
            if self.producer is not None:
                self.producer.stop()
            self.frames.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class ProcessorProcess:
    """`python -m relay_server processor` on a fixed port, its log in a file."""

    def __init__(self, port: int, log: Path, *options: str) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self.options = options
        self.process: asyncio.subprocess.Process | None = None
        self._log_file: IO[bytes] | None = None

    async def start(self, within: float = 30) -> None:
        self._log_file = self.log.open("ab")
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "relay_server",
            "processor",
            "--listen",
            f"127.0.0.1:{self.port}",
            *self.options,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=self._log_file,
        )
        # Polling the health endpoint is how a start-up is noticed from outside.
        async with aiohttp.ClientSession() as http:
            try:
                async with asyncio.timeout(within):
                    while True:
                        if self.process.returncode is not None:
                            raise AssertionError(f"the processor exited: {self.log.read_text()[-2000:]}")
                        with contextlib.suppress(aiohttp.ClientError):
                            async with http.get(f"{self.url}/health") as response:
                                if response.status == 200:
                                    return
                        await asyncio.sleep(0.05)
            except TimeoutError:
                raise AssertionError(f"the processor did not start: {self.log.read_text()[-2000:]}") from None

    async def kill(self) -> None:
        """SIGKILL: no goodbye to its peers."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        await self.process.wait()
        self._close_log()

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 10)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        self._close_log()

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
