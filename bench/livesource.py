"""The end-to-end benchmark's far side: a live indexed source and output readers, timed per frame.

- LiveSource publishes frames on a trickle channel in real time, each carrying its index in its
  pixels (bench.frameindex). It is publish_pattern's live source composed from the same parts
  (VideoEncoder → Segmenter → SegmentPublisherSink) on a thread of its own, so that it knows which
  bytes are whose: the segmenter flushes after every packet, one packet per frame, so the bytes
  written while frame i is muxed are frame i's. The publisher is wrapped to stamp the moment each
  of those byte strings is handed to its SegmentWriter.write: frame i's publish time is the last
  of its stamps (time.monotonic).
- OutputReader subscribes to an output channel and decodes it progressively (the relay's own
  Decoder, fed through a ChunkQueue by feed()), reading each frame's index. Receive times are
  not decode times: libavformat's H.264 parser gives a frame out only when the next one starts,
  a frame interval late. ArrivalScanner instead stamps, for every video PES (one frame) of the
  MPEG-TS, when the chunk holding its last TS packet arrived, keyed by its PTS; the decoded frame
  is joined to it by its pts. The subscriber reads an embedded trickle server on loopback, so
  receive ≈ publish time of the relay's output.

Both run in a process of their own with the trickle server (`python -m bench.livesource`, driven
by SourceProcess over JSON lines on stdin/stdout), so the relay's process spends its CPU on the
relay alone; readers of many sessions can run in processes of their own too (bench.readers, the
same Readers ops). time.monotonic is the system's CLOCK_MONOTONIC: comparable across processes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import av

from bench.child import Child, answer_requests, reply
from bench.frameindex import IndexCode
from bench.media import source_frames
from relay_server import settings
from relay_server._fast import ChunkQueue
from relay_server.media.decoder import Decoder
from relay_server.media.encoder import CLOCK, VideoEncoder
from relay_server.media.feeder import feed
from relay_server.media.output import SegmentPublisherSink
from relay_server.media.scaler import ScaleMode
from relay_server.media.segmenter import Segmenter
from relay_server.trickle import Publisher, SegmentWriter, Subscriber
from relay_server.trickle.server import TrickleServer

log = logging.getLogger(__name__)

FPS = 30
BITRATE = 3_000_000  # a live 720p stream's rate (bench.media's)
GOP = 1.0  # seconds per GOP, and so per input segment
TS_PACKET = 188


# -- the source --------------------------------------------------------------------------------


class _StampingWriter:
    """A SegmentWriter whose write() reports each byte string once the publisher has taken it."""

    def __init__(self, writer: SegmentWriter, on_written: Any) -> None:
        self._writer = writer
        self._on_written = on_written
        self.seq = writer.seq

    async def write(self, data: bytes) -> None:
        await self._writer.write(data)
        self._on_written(data)

    async def close(self) -> Any:
        return await self._writer.close()

    async def abort(self) -> Any:
        return await self._writer.abort()


class _StampingPublisher(Publisher):
    def __init__(self, url: str, on_written: Any) -> None:
        super().__init__(url)
        self._on_written = on_written

    async def segment(self) -> SegmentWriter:
        writer = await super().segment()
        return _StampingWriter(writer, self._on_written)  # type: ignore[return-value]


class _TaggingSink:
    """Between the segmenter and the publishing sink, on the encode thread: tags each byte
    string with the frame being muxed when it was written."""

    def __init__(self, sink: SegmentPublisherSink, tags: dict[int, tuple[bytes, int]]) -> None:
        self.sink = sink
        self.current = -1  # the frame being muxed
        self._tags = tags

    def begin(self, index: int) -> None:
        self.sink.begin(index)

    def write(self, data: bytes) -> None:
        # Keyed by identity (the sink hands the same object to the writer); the value keeps it
        # alive, so the id is not reused before the stamp pops it.
        self._tags[id(data)] = (data, self.current)
        self.sink.write(data)

    def end(self, index: int) -> None:
        self.sink.end(index)


class LiveSource:
    """Indexed frames at `fps` on the channel at `url`, in real time, until stop(). `published`
    maps each frame index to its publish time (time.monotonic)."""

    def __init__(
        self, url: str, width: int, height: int, *, fps: int = FPS, bitrate: int = BITRATE, gop: float = GOP
    ) -> None:
        self.url = url
        self.width, self.height, self.fps = width, height, fps
        self.code = IndexCode(width, height)
        self.published: dict[int, float] = {}
        self.frames = 0  # frames encoded
        self._tags: dict[int, tuple[bytes, int]] = {}
        self._publisher = _StampingPublisher(url, self._written)
        self._sink = SegmentPublisherSink(self._publisher)
        self._tagger = _TaggingSink(self._sink, self._tags)
        self._encoder = VideoEncoder(width, height, gop=gop, bitrate=bitrate, fps=fps)
        self._segmenter = Segmenter(self._tagger, width, height)
        self._pictures = source_frames(width, height)  # the test pattern with moving noise
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    async def start(self) -> None:
        await self._publisher.create_channel()
        self._sink.start()
        self._thread = threading.Thread(target=self._run, name="live-source", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        await self._sink.stop()
        await self._publisher.close()

    def _written(self, data: bytes) -> None:
        tag = self._tags.pop(id(data), None)
        if tag is not None and tag[1] >= 0:
            self.published[tag[1]] = time.monotonic()  # the last write of a frame wins

    def _run(self) -> None:
        try:
            origin = time.monotonic()
            index = 0
            while not self._stop.is_set():
                delay = origin + index / self.fps - time.monotonic()
                if delay > 0 and self._stop.wait(delay):
                    break
                picture = self._pictures[index % len(self._pictures)]
                self.code.draw(picture, index)  # x264 copies the picture in: it may be drawn on again
                self._tagger.current = index
                for packet in self._encoder.encode(picture, round(index / self.fps / CLOCK)):
                    self._segmenter.mux_video(packet)
                self.frames = index = index + 1
            for packet in self._encoder.close():
                self._segmenter.mux_video(packet)
            self._segmenter.close()
        except Exception as exc:  # the sink stopped under us, most likely
            self.error = exc
            log.warning("live source: %r", exc)


# -- the output reader ---------------------------------------------------------------------------


class ArrivalScanner:
    """Fed an MPEG-TS byte stream chunk by chunk, with each chunk's arrival time: `arrivals` maps
    the PTS of every video PES (one frame) to when its last TS packet arrived."""

    def __init__(self) -> None:
        self.arrivals: dict[int, float] = {}
        self.resyncs = 0  # times the stream was not on a 188-byte TS packet boundary
        self._rest = b""
        self._pid: int | None = None  # the video PID, from the first video PES header
        self._pts: int | None = None  # the PES being received

    def feed(self, chunk: bytes, at: float) -> None:
        data = self._rest + chunk if self._rest else chunk
        offset, end = 0, len(data)
        while end - offset >= TS_PACKET:
            if data[offset] != 0x47:
                self.resyncs += 1
                found = data.find(b"\x47", offset + 1)
                offset = end if found < 0 else found
                continue
            self._packet(data, offset, at)
            offset += TS_PACKET
        self._rest = data[offset:]

    def _packet(self, data: bytes, offset: int, at: float) -> None:
        pid = ((data[offset + 1] & 0x1F) << 8) | data[offset + 2]
        if self._pid is not None and pid != self._pid:
            return
        control = (data[offset + 3] >> 4) & 0x3
        if not control & 0x1:
            return  # adaptation field only: no payload
        start = offset + 4 + (1 + data[offset + 4] if control & 0x2 else 0)
        if data[offset + 1] & 0x40:  # payload_unit_start: a PES begins here
            header = data[start : start + 14]
            if (
                len(header) >= 14
                and header[:3] == b"\0\0\1"
                and 0xE0 <= header[3] <= 0xEF
                and header[7] & 0x80
            ):
                self._pid = pid
                self._pts = (
                    ((header[9] >> 1) & 0x7) << 30
                    | header[10] << 22
                    | (header[11] >> 1) << 15
                    | header[12] << 7
                    | header[13] >> 1
                )
        if self._pid == pid and self._pts is not None:
            self.arrivals[self._pts] = at


class OutputReader:
    """Reads the channel at `url` from segment `start_seq` (0: its first), decodes every frame
    and reads its index (`code` is the source's, `mode` how the relay scaled it). `results()`:
    one (index or None, receive time, decode time) per frame, in output order."""

    def __init__(
        self, url: str, code: IndexCode, mode: ScaleMode = ScaleMode.LETTERBOX, *, start_seq: int = 0
    ) -> None:
        self.url = url
        self.start_seq = start_seq
        self.code = code
        self.mode = mode
        self.scanner = ArrivalScanner()
        self._frames: list[tuple[int | None, int | None, float]] = []  # index, pts, decoded at
        self._queue = ChunkQueue(settings.buffer_size())
        self._decoder = Decoder(
            self._queue, self._on_frame, on_exit=self._on_exit, name=f"reader {url.rsplit('/', 1)[-1]}"
        )
        self._subscriber: Subscriber | None = None
        self._feeding: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._exited = asyncio.Event()

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._subscriber = Subscriber(self.url, start_seq=self.start_seq, startup_grace=60.0)
        self._decoder.start()
        self._feeding = asyncio.create_task(feed(self._stamped(self._subscriber), self._queue))

    async def stop(self) -> None:
        """Stop reading now (what was decoded stays)."""
        await asyncio.to_thread(self._decoder.stop)  # first: an aborted feed is then no error
        if self._feeding is not None:
            self._feeding.cancel()
            await asyncio.gather(self._feeding, return_exceptions=True)
        if self._subscriber is not None:
            await self._subscriber.close()

    async def ended(self, within: float) -> None:
        """Wait up to `within` seconds for the channel to end and its frames to be decoded."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._exited.wait(), within)

    @property
    def frames(self) -> int:
        return len(self._frames)

    def results(self) -> list[tuple[int | None, float, float]]:
        arrivals = self.scanner.arrivals
        return [
            (index, arrivals.get(pts, decoded) if pts is not None else decoded, decoded)
            for index, pts, decoded in list(self._frames)
        ]

    async def _stamped(self, subscriber: Subscriber) -> AsyncIterator[AsyncIterator[bytes]]:
        async for segment in subscriber:
            yield self._stamped_segment(segment)

    async def _stamped_segment(self, segment: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for chunk in segment:
            self.scanner.feed(chunk, time.monotonic())
            yield chunk

    def _on_exit(self) -> None:  # on the decode thread, last
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._exited.set)

    def _on_frame(self, frame: av.VideoFrame) -> None:  # on the decode thread
        decoded = time.monotonic()
        self._frames.append((self.code.read(frame, self.mode), frame.pts, decoded))


class Readers:
    """Output readers by name, as a child's "read" and "collect" requests drive them; `code` is
    the source's."""

    def __init__(self, code: IndexCode) -> None:
        self.code = code
        self._readers: dict[str, OutputReader] = {}

    async def answer(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request["op"]
        if op == "read":  # read the channel at `url` (created first unless it exists) as `name`
            url = request["url"]
            if request.get("create", True):
                creator = Publisher(url)
                await creator.create_channel()
                await creator.close(delete_channel=False)
            mode = ScaleMode(request.get("mode", ScaleMode.LETTERBOX.value))
            start_seq = int(request.get("start_seq", 0))
            reader = self._readers[request["name"]] = OutputReader(url, self.code, mode, start_seq=start_seq)
            reader.start()
            return {"url": url}
        if op == "collect":  # wait for the channel's end (a short while), stop, report
            reader = self._readers.pop(request["name"])
            await reader.ended(float(request.get("within", 2.0)))
            await reader.stop()
            return {"received": reader.results(), "resyncs": reader.scanner.resyncs}
        return {"error": f"unknown op {op!r}"}

    async def stop(self) -> None:
        for reader in self._readers.values():
            await reader.stop()


# -- the process: a trickle server, the source and readers, driven over JSON lines -----------------


async def serve(width: int, height: int, fps: int, bitrate: int) -> None:
    """Run the server and the source; answer one JSON request per stdin line on stdout: Readers'
    ops ("read" names a `channel` of this server) and "published"."""
    async with TrickleServer() as server:
        source = LiveSource(server.channel_url("input"), width, height, fps=fps, bitrate=bitrate)
        await source.start()
        readers = Readers(source.code)

        async def answer(request: dict[str, Any]) -> dict[str, Any]:
            if source.error is not None:
                raise RuntimeError(f"the live source failed: {source.error!r}")
            if request["op"] == "read":
                return await readers.answer({**request, "url": server.channel_url(request["channel"])})
            if request["op"] == "published":  # publish times of frames published in [start, end]
                start, end = request["start"], request["end"]
                published = [(i, t) for i, t in list(source.published.items()) if start <= t <= end]
                return {"published": published, "frames": source.frames}
            return await readers.answer(request)

        reply({"input": source.url, "server": server.url, "pid": os.getpid()})
        try:
            await answer_requests(answer)
        finally:
            await readers.stop()
            await source.stop()


class SourceProcess(Child):
    """`python -m bench.livesource` as a child process: `input` is the live channel's URL."""

    def __init__(self, width: int, height: int, *, fps: int = FPS, bitrate: int = BITRATE) -> None:
        args = ["--width", str(width), "--height", str(height), "--fps", str(fps), "--bitrate", str(bitrate)]
        super().__init__("bench.livesource", args, what="live source process", ready_within=60)
        self.width, self.height = width, height
        self.input = ""
        self.server = ""

    async def __aenter__(self) -> SourceProcess:
        await self.start()
        self.input, self.server = self.ready["input"], self.ready["server"]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def channel_url(self, name: str) -> str:
        """The URL of channel `name` on the child's trickle server (TrickleServer.channel_url)."""
        return f"{self.server}/{name}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description="A live indexed source and output readers (bench e2e's child)."
    )
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--fps", type=int, default=FPS)
    parser.add_argument("--bitrate", type=int, default=BITRATE)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncio.run(serve(args.width, args.height, args.fps, args.bitrate))


if __name__ == "__main__":
    main()
