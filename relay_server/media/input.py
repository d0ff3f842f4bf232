"""MediaInput: the input side of a session, a trickle channel decoded to frames on a thread of its own.

    subscriber ─feed()─▶ ChunkQueue ─▶ Decoder (+ Scaler) ─▶ on_frame / on_audio / … (the owner's)
     (event loop)         (bounded)     (decode thread)

Every composition that starts from a trickle input (the Transcoder, which encodes the frames
again; a relay that hands them to a processor) needs the same three parts started and, above all,
stopped in the same order without ever blocking the loop; they live here so that is written once.

The callbacks run on the decode thread. One that blocks (back-pressure from whatever takes the
frames) slows decoding and so, through the bounded ChunkQueue, reading from the network. The loop
never waits on the thread: the decoder's on_exit resolves `ended`, and stop() joins only then.
Errors are not raised but kept (feed_error, decoder_error): only the owner knows which of its
parts failed first, and so which error is the root cause.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import AsyncIterable, Callable
from fractions import Fraction

import av

from relay_server import settings
from relay_server._fast import ChunkQueue
from relay_server.media.decoder import AUDIO_WAIT, Decoder, DecoderStats
from relay_server.media.feeder import FeedStats, feed
from relay_server.media.scaler import ScaleMode, Scaler
from relay_server.media.segmenter import AudioInfo
from relay_server.trickle.subscriber import Subscriber

log = logging.getLogger(__name__)


class MediaInput:
    """Reads `source` (a channel URL, or anything a Subscriber is: segments of byte chunks),
    decodes its video scaled to width×height yuv420p (0×0: the input's size) and hands frames and
    audio packets to the callbacks, on the decode thread. A Subscriber made here from a URL is
    closed by stop(). Start once.
    """

    def __init__(
        self,
        source: str | AsyncIterable[AsyncIterable[bytes]],
        *,
        on_frame: Callable[[av.VideoFrame], object],
        width: int,
        height: int,
        mode: ScaleMode = ScaleMode.LETTERBOX,
        on_audio: Callable[[av.Packet], object] | None = None,
        on_audio_stream: Callable[[AudioInfo], object] | None = None,
        on_video_packet: Callable[[av.Packet], bool] | None = None,
        on_chunk: Callable[[bytes], object] | None = None,
        on_start: Callable[[bool], object] | None = None,
        audio_wait: int = AUDIO_WAIT,
        buffer_size: int | None = None,
        name: str = "input",
    ) -> None:
        self.name = name
        self._on_chunk = on_chunk  # on the loop, each chunk as it arrives
        self._on_start = on_start  # on the loop: read from the input's start (True) or joined live
        self.feed_stats = FeedStats()  # written by the feed task, on the loop
        self._source = source
        self._queue = ChunkQueue(buffer_size or settings.buffer_size())
        self._scaler = Scaler(width, height, mode)
        self._decoder = Decoder(
            self._queue,
            on_frame,
            scaler=self._scaler,
            on_audio=on_audio,  # None: the demuxer leaves audio alone altogether
            on_audio_stream=on_audio_stream,
            on_video_packet=on_video_packet,
            on_exit=self._on_decoder_exit,
            audio_wait=audio_wait,
            name=f"decoder {name}",
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ended: asyncio.Future[None] | None = None  # also: started
        self._subscriber: Subscriber | None = None  # made here, so closed here
        self._feeding: asyncio.Task[None] | None = None
        self._stopped = False

    @property
    def ended(self) -> asyncio.Future[None]:
        """Resolves once the decode thread has exited: the input ended, the decoder failed, or
        stop(). Never fails (the errors are in feed_error and decoder_error)."""
        if self._ended is None:
            raise RuntimeError(f"input {self.name} has not been started")
        return self._ended

    @property
    def feed_error(self) -> BaseException | None:
        """Why reading the input failed (None: it has not, or it was cancelled)."""
        feeding = self._feeding
        if feeding is None or not feeding.done() or feeding.cancelled():
            return None
        return feeding.exception()

    @property
    def decoder_error(self) -> Exception | None:
        """Why the decoder gave up (an InputError, or the error a callback raised)."""
        return self._decoder.error

    @property
    def buffered(self) -> tuple[int, int]:
        """Bytes read from the network and not yet demuxed, and the most that may wait."""
        return self._queue.size, self._queue.capacity

    def resize(self, width: int, height: int) -> None:
        """Scale the frames to width×height from the next one decoded (any thread)."""
        self._scaler.resize(width, height)

    @property
    def declared_rate(self) -> Fraction | None:
        """Frames per second the input's SPS declares, once seen (None: not declared)."""
        return self._decoder.stats.declared_rate

    @property
    def decoder_stats(self) -> DecoderStats:
        """A copy: the decode thread keeps writing the live one (fields may be a packet apart)."""
        return copy.copy(self._decoder.stats)

    def start(self) -> None:
        """Start the decode thread and the feed task; on the event loop, once."""
        if self._ended is not None or self._stopped:
            raise RuntimeError(f"input {self.name} was already started or stopped")
        loop = self._loop = asyncio.get_running_loop()
        self._ended = loop.create_future()
        source = self._source
        if isinstance(source, str):
            source = self._subscriber = Subscriber(source, startup_grace=settings.startup_grace())
        self._decoder.start()
        self._feeding = loop.create_task(
            feed(source, self._queue, self.feed_stats, self._on_chunk, self._on_start),
            name=f"feed {self.name}",
        )

    async def stop(self) -> None:
        """Stop decoding and reading, and wait for both without blocking the loop; any time
        (also before start() and from a task being cancelled), any number of times. Never raises
        the run's errors: see feed_error and decoder_error."""
        self._stopped = True
        try:
            # Stop asking for input; a decode thread inside a callback finishes that call first,
            # then sees the request. The shield keeps `ended` intact for another waiter should
            # this wait be cancelled.
            self._decoder.stop(wait=False)
            if self._ended is not None and self._decoder.running:
                await asyncio.shield(self._ended)
            self._decoder.stop()  # the thread has signalled its exit: this join is immediate
            if self._feeding is not None:
                self._feeding.cancel()  # it may be waiting on the network for a next segment
                await asyncio.wait([self._feeding])
                if not self._feeding.cancelled():
                    self._feeding.exception()  # retrieved (feed_error has it): asyncio logs no more
        finally:
            subscriber, self._subscriber = self._subscriber, None
            if subscriber is not None:
                await subscriber.close()

    # -- the decode thread ---------------------------------------------------------------------

    def _on_decoder_exit(self) -> None:
        assert self._loop is not None and self._ended is not None
        self._loop.call_soon_threadsafe(_resolve, self._ended)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
