"""A test client speaking ComfyStream's contract: a known pattern out, processed frames back."""

from __future__ import annotations

import asyncio
import json
import time
from fractions import Fraction
from typing import Any

import aiohttp
import av
import numpy as np
from aiortc import RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack, MediaStreamError, MediaStreamTrack

WIDTH, HEIGHT = 256, 256
CLOCK = Fraction(1, 90_000)
TICKS = 3000  # one frame at 30 fps on the 90 kHz clock
DARK, BRIGHT = 40, 200  # luma of the left and right halves
U, V = 90, 170  # a colour, so that grayscale is visible


def pattern(index: int) -> av.VideoFrame:
    frame = av.VideoFrame(WIDTH, HEIGHT, "yuv420p")
    values = [np.full((HEIGHT, WIDTH), DARK, np.uint8), np.full((HEIGHT // 2, WIDTH // 2), U, np.uint8)]
    values[0][:, WIDTH // 2 :] = BRIGHT
    values.append(np.full((HEIGHT // 2, WIDTH // 2), V, np.uint8))
    # A small moving box, so that consecutive frames differ.
    x = (index * 4) % (WIDTH // 2 - 16)
    values[0][:16, x : x + 16] = 128
    for plane, pixels in zip(frame.planes, values, strict=True):
        rows = np.frombuffer(memoryview(plane), np.uint8).reshape(-1, plane.line_size)
        rows[: pixels.shape[0], : pixels.shape[1]] = pixels
    frame.pts = index * TICKS
    frame.time_base = CLOCK
    return frame


def planes(frame: av.VideoFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y, u, v = (frame.to_ndarray(format="yuv420p")[r] for r in _regions(frame))
    return y, u, v


def _regions(frame: av.VideoFrame) -> tuple[slice, slice, slice]:
    h = frame.height
    return slice(0, h), slice(h, h + h // 4), slice(h + h // 4, h + h // 2)


class PatternTrack(MediaStreamTrack):
    """The pattern at 30 fps, paced by the clock; `halt()` stops it producing frames for good."""

    kind = "video"

    def __init__(self) -> None:
        super().__init__()
        self.sent = 0
        self._start: float | None = None
        self._halted = asyncio.Event()

    def halt(self) -> None:
        self._halted.set()

    @property
    def latest_pts(self) -> int:
        return (self.sent - 1) * TICKS

    async def recv(self) -> av.VideoFrame:
        if self._start is None:
            self._start = time.monotonic()
        due = self._start + self.sent / 30
        delay = max(0.0, due - time.monotonic())
        # Pacing by media time; a halted source never returns again (the sender waits forever).
        try:
            await asyncio.wait_for(self._halted.wait(), delay)
        except TimeoutError:
            frame = pattern(self.sent)
            self.sent += 1
            return frame
        await asyncio.Future()  # never resolves: cancelled when the connection closes
        raise MediaStreamError


class Client:
    def __init__(self, *, codec: str = "video/H264", channel: bool = True, audio: bool = False) -> None:
        self.pc = RTCPeerConnection()
        self.source = PatternTrack()
        transceiver = self.pc.addTransceiver(self.source, direction="sendrecv")
        if audio:
            self.pc.addTransceiver(AudioStreamTrack(), direction="sendrecv")
        capabilities = RTCRtpSender.getCapabilities("video").codecs
        transceiver.setCodecPreferences([c for c in capabilities if c.mimeType == codec])
        self.remote: asyncio.Future[MediaStreamTrack] = asyncio.get_running_loop().create_future()
        self.pc.on("track", self._on_track)
        self.replies: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.control = self.pc.createDataChannel("control") if channel else None
        self.opened = asyncio.Event()
        if self.control is not None:
            self.control.on("open", self.opened.set)
            self.control.on("message", lambda m: self.replies.put_nowait(json.loads(m)))

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "video" and not self.remote.done():
            self.remote.set_result(track)

    async def offer(self, url: str, prompts: Any = None, within: float = 20) -> tuple[int, str]:
        """POST /offer; applies a 200 answer. Returns the status and the body."""
        await self.pc.setLocalDescription(await self.pc.createOffer())
        body = {
            "offer": {"sdp": self.pc.localDescription.sdp, "type": "offer"},
            "prompts": prompts,
            "resolution": {"width": WIDTH, "height": HEIGHT},
        }
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"{url}/offer", json=body, timeout=aiohttp.ClientTimeout(total=within)) as response,
        ):
            text = await response.text()
            if response.status == 200:
                answer = json.loads(text)
                await self.pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))
            return response.status, text

    async def frames(self, count: int, within: float = 10) -> list[av.VideoFrame]:
        track = await asyncio.wait_for(asyncio.shield(self.remote), within)
        frames = []
        for _ in range(count):
            frame = await asyncio.wait_for(track.recv(), within)
            assert isinstance(frame, av.VideoFrame)
            frames.append(frame)
        return frames

    async def send(self, message: dict[str, Any] | str, within: float = 5) -> None:
        assert self.control is not None
        await asyncio.wait_for(self.opened.wait(), within)
        self.control.send(message if isinstance(message, str) else json.dumps(message))

    async def request(self, message: dict[str, Any] | str, within: float = 5) -> dict[str, Any]:
        await self.send(message, within)
        return await asyncio.wait_for(self.replies.get(), within)

    async def close(self) -> None:
        await self.pc.close()
