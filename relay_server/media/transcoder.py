"""Transcoder: the processor-less core of a session, input trickle channel to output trickle channel.

    subscriber ─feed()─▶ ChunkQueue ─▶ Decoder (+ Scaler) ─▶ OutputPipeline ─▶ publisher
     (event loop)         (bounded)     (decode thread)      (encode thread)    (event loop)
    └──────────────────── MediaInput ──────────────────┘

Output timestamps are the input's, on the 90 kHz clock (MPEG-TS input already is), for video and
audio alike, so the two stay in sync; the encoder keeps video monotonic. The input's audio (AAC or
Opus) is carried through as it is, unless drop_audio.

Frames cross from the decode thread to the event loop with run_coroutine_threadsafe(submit(...)),
waited for on the decode thread: under Policy.BLOCK that is the back-pressure that slows decoding
(and so, through the ChunkQueue, reading) to the encoder's pace; under Policy.LIVE submit()
returns at once. The loop never waits on a thread: MediaInput.ended and OutputPipeline.failed
tell it when a side is done.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections.abc import AsyncIterable, Coroutine
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, TypeVar

import av

from relay_server import _fast
from relay_server.media.decoder import DecoderStats
from relay_server.media.encoder import CLOCK, EncoderSettings, EncoderStats
from relay_server.media.feeder import FeedStats
from relay_server.media.input import MediaInput
from relay_server.media.output import OutputPipeline, PipelineStats, Policy, SinkStats
from relay_server.media.scaler import ScaleMode
from relay_server.media.segmenter import AudioInfo, SegmenterStats
from relay_server.trickle.publisher import Publisher

log = logging.getLogger(__name__)

_T = TypeVar("_T")


@dataclass(frozen=True)
class TranscoderStats:
    """A snapshot: every stage's counters copied at one moment (from the loop; threads may be a
    frame apart)."""

    implementation: str  # which relay_server._fast build moves the bytes ("cython" or "python")
    elapsed: float  # seconds since run() started (0 before)
    frames_in: int  # frames decoded
    frames_out: int  # frames encoded
    audio_skipped: int  # audio packets demuxed before their stream could still join the output
    feed: FeedStats = field(default_factory=FeedStats)
    decoder: DecoderStats = field(default_factory=DecoderStats)
    pipeline: PipelineStats = field(default_factory=PipelineStats)
    encoder: EncoderStats = field(default_factory=EncoderStats)
    segmenter: SegmenterStats = field(default_factory=SegmenterStats)
    sink: SinkStats = field(default_factory=SinkStats)


class Transcoder:
    """Decodes a trickle input, scales it to width×height and re-encodes it to a trickle output.

    `source` is a channel URL or anything a Subscriber is (segments of byte chunks); `output` a
    channel URL or a Publisher. What the Transcoder makes from a URL it closes; a Publisher made
    here is closed without deleting the channel (the channel outlives one run). Run once.
    """

    def __init__(
        self,
        source: str | AsyncIterable[AsyncIterable[bytes]],
        output: str | Publisher,
        *,
        width: int,
        height: int,
        mode: ScaleMode = ScaleMode.LETTERBOX,
        encoder: EncoderSettings | None = None,
        drop_audio: bool = False,
        policy: Policy = Policy.LIVE,
        buffer_size: int | None = None,
        name: str = "transcoder",
    ) -> None:
        if width <= 0 or height <= 0:
            raise ValueError(f"the output size must be positive, got {width}x{height}")
        encoding = encoder or EncoderSettings()
        self.name = name
        self._publisher = Publisher(output) if isinstance(output, str) else output
        self._owns_publisher = isinstance(output, str)
        self._pipeline = OutputPipeline(
            self._publisher, encoding.encoder(width, height, mode), policy=policy, drop_audio=drop_audio
        )
        self._input = MediaInput(
            source,
            on_frame=self._on_frame,
            width=width,
            height=height,
            mode=mode,
            # With drop_audio the demuxer leaves audio alone altogether.
            on_audio=None if drop_audio else self._on_audio,
            on_audio_stream=self._on_audio_stream,
            buffer_size=buffer_size,
            name=name,
        )
        self._carry_audio = False  # set on the loop once the pipeline took the audio stream
        self._audio_skipped = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started_at: float | None = None
        self._ran = False
        self._stopping = False
        self._wake: asyncio.Event | None = None  # stop() wakes run()
        self._done = asyncio.Event()  # run() has cleaned up (or will never run)

    @property
    def feed_stats(self) -> FeedStats:
        return self._input.feed_stats

    @property
    def stats(self) -> TranscoderStats:
        decoder, encoder = self._input.decoder_stats, copy.copy(self._pipeline.encoder.stats)
        return TranscoderStats(
            implementation=_fast.IMPLEMENTATION,
            elapsed=0.0 if self._started_at is None else time.monotonic() - self._started_at,
            frames_in=decoder.frames,
            frames_out=encoder.frames,
            audio_skipped=self._audio_skipped,
            feed=copy.copy(self.feed_stats),
            decoder=decoder,
            pipeline=self._pipeline.stats,
            encoder=encoder,
            segmenter=copy.copy(self._pipeline.segmenter.stats),
            sink=copy.copy(self._pipeline.sink.stats),
        )

    async def run(self) -> None:
        """Transcode until the input ends, stop() or a failure; then flush the encoder, end the
        last output segment and join every thread and task. Raises what failed: the input, the
        decoder (InputError) or the output."""
        if self._ran:
            raise RuntimeError(f"transcoder {self.name} runs once")
        self._ran = True
        if self._stopping:
            self._done.set()
            return
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._started_at = time.monotonic()
        log.info("transcoder %s: hot path %s", self.name, _fast.IMPLEMENTATION)
        try:
            self._pipeline.start()
            self._input.start()
            await self._until_done()
        finally:
            await self._shut_down()

    async def stop(self) -> None:
        """End the run now (the output is still flushed) and wait until it has cleaned up; any
        time, any number of times; never raises the run's error (run() does)."""
        self._stopping = True
        if self._wake is None:  # not running: run() will return at once
            return
        self._wake.set()
        await self._done.wait()

    # -- the event loop ------------------------------------------------------------------------

    async def _until_done(self) -> None:
        """Wait for the decode thread to end, or for stop() or an output failure to end it."""
        assert self._wake is not None
        waits: list[asyncio.Future[Any]] = [self._input.ended, self._pipeline.failed]
        stopping = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait([*waits, stopping], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            await asyncio.wait([stopping])

    async def _shut_down(self) -> None:
        """Runs however run() ends (also when it is cancelled): every thread joined, every task
        awaited, then the first error raised."""
        try:
            # The input first: a decode thread inside on_frame finishes that frame (under BLOCK
            # the encode thread keeps making room), then stops; the pipeline then flushes.
            await self._input.stop()
            pipeline_error: BaseException | None = None
            try:
                await self._pipeline.stop()
            except Exception as exc:
                pipeline_error = exc
            # The root cause first: a failed input or output also fails the decoder.
            error = self._input.feed_error or pipeline_error or self._input.decoder_error
            if error is not None:
                raise error
        finally:
            if self._owns_publisher:
                await self._publisher.close(delete_channel=False)
            self._done.set()

    async def _add_audio_stream(self, info: AudioInfo) -> None:
        try:
            self._pipeline.add_audio_stream(info)
        except RuntimeError as exc:
            # The first video frame beat the audio's first packet: the output has begun without it.
            log.warning("transcoder %s: the input's audio is not carried: %s", self.name, exc)
            return
        self._carry_audio = True

    async def _submit_audio(self, packet: av.Packet, pts90k: int) -> None:
        if not self._carry_audio:
            self._audio_skipped += 1
            return
        await self._pipeline.submit_audio(packet, pts90k)

    # -- the decode thread ---------------------------------------------------------------------

    def _on_frame(self, frame: av.VideoFrame) -> None:
        assert frame.pts is not None, "decoded frames carry their packet's timestamp"
        self._call(self._pipeline.submit(frame, _to_clock(frame.pts, frame.time_base)))

    def _on_audio_stream(self, info: AudioInfo) -> None:
        self._call(self._add_audio_stream(info))

    def _on_audio(self, packet: av.Packet) -> None:
        if packet.pts is None:
            self._audio_skipped += 1  # nowhere to put it on the output's timeline
            return
        self._call(self._submit_audio(packet, _to_clock(packet.pts, packet.time_base)))

    def _call(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        """Run `coroutine` on the loop and wait for it here, on the decode thread."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()


def _to_clock(pts: int, time_base: Fraction | None) -> int:
    """`pts` in `time_base` on the 90 kHz output clock (identity for MPEG-TS input)."""
    if time_base is None or time_base == CLOCK:
        return pts
    return round(pts * time_base / CLOCK)
