"""The returned video track: reads a peer's incoming track and yields processed frames.

A reader task keeps only the newest input frame (latest wins): when processing is slower than the
input, or a rate cap is set, older frames are dropped and counted, so no queue ever grows and the
output is never stale. The `queue` knob instead keeps up to that many frames in arrival order and
processes the oldest first, as ComfyStream does: a slow pipeline then falls behind its input.
recv() ends the track for good (MediaStreamError) when the input ends or,
like ComfyStream, when no input frame arrives for `input_timeout` seconds.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import NoReturn, TypeVar

import av
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from relay_server.processor.pipeline import Pipeline

log = logging.getLogger(__name__)

T = TypeVar("T")


class FrameRate:
    """Output frames per second over the last second and the last minute."""

    def __init__(self) -> None:
        self._stamps: collections.deque[float] = collections.deque()
        self._started = time.monotonic()

    def tick(self) -> None:
        now = time.monotonic()
        self._stamps.append(now)
        while self._stamps[0] < now - 60:
            self._stamps.popleft()

    def snapshot(self) -> dict[str, float]:
        now = time.monotonic()
        last_second = sum(1 for stamp in self._stamps if stamp >= now - 1)
        window = min(60.0, max(now - self._started, 1.0))
        recent = sum(1 for stamp in self._stamps if stamp >= now - 60)
        return {"fps": float(last_second), "minute_avg_fps": recent / window}


class ReturnedTrack(MediaStreamTrack):
    """A processor's returned video: what it counts, and its end, for good and with a reason,
    when its input ends or, like ComfyStream's, stalls for `input_timeout` seconds (None: never).
    Subclasses queue their input in `inbox` and set `arrived`; `source_ended` once it ends."""

    kind = "video"

    def __init__(self, source: MediaStreamTrack) -> None:
        super().__init__()
        self.source = source
        self.rate = FrameRate()
        self.frames_in = 0
        self.frames_out = 0
        self.end_reason = ""
        self.finished = asyncio.Event()  # set once the track has ended, for whatever reason
        self.arrived = asyncio.Event()
        self.source_ended = False

    async def _next_in(self, inbox: collections.deque[T], input_timeout: float | None) -> T:
        """The oldest input waiting in `inbox`, once there is one."""
        while not inbox:
            if self.source_ended:
                self._end("input track ended")
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), input_timeout)
            except TimeoutError:
                # ComfyStream's trap, on purpose: a stalled input ends the returned video for good.
                self._end(f"no input frame for {input_timeout:g} s")
        return inbox.popleft()

    def _end(self, reason: str) -> NoReturn:
        if not self.end_reason:
            self.end_reason = reason
            log.info("track %s ended: %s", self.id, reason)
        raise MediaStreamError(reason)

    def stop(self) -> None:
        super().stop()
        if not self.end_reason:
            self.end_reason = "stopped"
        self.finished.set()

    def stats(self) -> dict[str, float | int | str]:
        return {
            **self.rate.snapshot(),
            "frames_in": self.frames_in,
            "frames_out": self.frames_out,
            "ended": self.end_reason,
        }


class ProcessingTrack(ReturnedTrack):
    """Processed frames of `source`, same size, pts and time_base; the pipeline's effects apply
    only if the peer's offer carried prompts (otherwise it is a noop peer)."""

    def __init__(self, source: MediaStreamTrack, pipeline: Pipeline, *, with_prompts: bool) -> None:
        super().__init__(source)
        self.pipeline = pipeline
        self.with_prompts = with_prompts
        self.dropped_latest = 0  # pushed out by newer input frames before processing
        self.max_queued = 0  # most input frames waiting at once
        self.dropped_nth = 0  # dropped by the drop-every-Nth knob
        self._inbox: collections.deque[av.VideoFrame] = collections.deque()
        self._taken = 0  # input frames taken for processing (the drop-every-Nth count)
        self._next_due = 0.0  # monotonic time of the next frame under the rate cap
        self._reader = asyncio.create_task(self._read(), name=f"processor-read-{self.id}")

    async def _read(self) -> None:
        try:
            while True:
                frame = await self.source.recv()
                if not isinstance(frame, av.VideoFrame):
                    continue
                self.frames_in += 1
                self._inbox.append(frame)
                if len(self._inbox) > max(1, self.pipeline.knobs.queue):
                    self._inbox.popleft()
                    self.dropped_latest += 1
                self.max_queued = max(self.max_queued, len(self._inbox))
                self.arrived.set()
        except MediaStreamError:
            pass
        finally:
            self.source_ended = True
            self.arrived.set()

    async def recv(self) -> av.VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        try:
            while True:
                frame = await self._next_input()
                self._taken += 1
                drop_every = self.pipeline.knobs.drop_every
                if drop_every and self._taken % drop_every == 0:
                    self.dropped_nth += 1
                    continue
                chain = self.pipeline.current_chain(self.with_prompts)
                out = await self.pipeline.process(frame, chain)
                self.frames_out += 1
                self.rate.tick()
                return out
        except MediaStreamError:
            self.stop()
            raise

    async def _next_input(self) -> av.VideoFrame:
        max_fps = self.pipeline.knobs.max_fps
        if max_fps:
            # Pacing under the cap: wait for the slot, then take the next frame.
            now = time.monotonic()
            if self._next_due > now:
                await asyncio.sleep(self._next_due - now)
        frame = await self._next_in(self._inbox, self.pipeline.knobs.input_timeout or None)
        if max_fps:
            # The next slot is an interval after this frame was taken: after a wait for input
            # too (a slot does not keep, or the first frames after it would go two at once).
            self._next_due = max(self._next_due, time.monotonic()) + 1 / max_fps
        return frame

    def stop(self) -> None:
        super().stop()
        self._reader.cancel()

    async def aclose(self) -> None:
        """Stop and wait for the reader task."""
        self.stop()
        await asyncio.gather(self._reader, return_exceptions=True)

    def stats(self) -> dict[str, float | int | str]:
        return {
            **super().stats(),
            "dropped_latest": self.dropped_latest,
            "max_queued": self.max_queued,
            "dropped_nth": self.dropped_nth,
        }
