"""One long-lived libx264 per session, with keyframes placed by media time.

The caller owns the output timeline: it gives every frame its timestamp on the 90 kHz clock
(frames come back from the processor at whatever rate they come, so a frame count says nothing
about time). An IDR is forced on the first frame at or past `last IDR + gop`; x264's own
keyframe placement (keyint, scene cuts) is off, so GOPs, and with them output segments, follow
media time even when the frame rate changes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from fractions import Fraction
from typing import cast

import av
from av.video.codeccontext import VideoCodecContext
from av.video.frame import PictureType

from relay_server import settings
from relay_server.media.scaler import ScaleMode, Scaler

CLOCK = Fraction(1, 90_000)  # MPEG-TS timestamps: 90 kHz


@dataclass
class EncoderStats:
    frames: int = 0  # frames encoded
    keyframes: int = 0  # IDR packets produced
    bytes: int = 0  # encoded bytes produced
    # CPU time of the encode thread inside libx264. With sliced threads most of the work runs
    # on x264's own threads, which this does not see (measured at 512×512 with 2 threads:
    # 0.1 ms/frame here against ~1 ms/frame of process CPU): the encode thread's share only.
    encode_seconds: float = 0.0
    # Wall time inside libx264: what encoding adds to each frame's latency.
    encode_wall_seconds: float = 0.0
    pts_fixed: int = 0  # timestamps not after the previous one, moved to previous + 1
    # Frames not yuv420p at the session size, converted first: fitted by the session's scale mode
    # (a frame the processor made before a resize reached it keeps its proportions).
    reformatted: int = 0


@dataclass(frozen=True)
class EncoderSettings:
    """A session's output encoding."""

    preset: str = "ultrafast"
    bitrate: int = 2_000_000
    gop: float = 2.0  # seconds of media time per GOP, and so per output segment
    fps: float = 30.0  # a rate-control hint only: timestamps decide frame durations

    def encoder(self, width: int, height: int, mode: ScaleMode = ScaleMode.LETTERBOX) -> VideoEncoder:
        return VideoEncoder(
            width, height, gop=self.gop, preset=self.preset, bitrate=self.bitrate, fps=self.fps, mode=mode
        )


class VideoEncoder:
    """H.264 for one session: `encode(frame, pts90k)` for each frame, `close()` at the end."""

    def __init__(
        self,
        width: int,
        height: int,
        *,
        gop: float = 2.0,
        preset: str = "ultrafast",
        bitrate: int = 2_000_000,
        fps: float = 30.0,
        threads: int | None = None,
        profile: str | None = None,
        mode: ScaleMode = ScaleMode.LETTERBOX,
    ) -> None:
        if gop <= 0:
            raise ValueError(f"gop must be positive, got {gop}")
        self.width = width
        self.height = height
        self.gop = gop
        self.stats = EncoderStats()
        self._gop_ticks = round(gop / CLOCK)
        self._next_idr: int | None = None  # first pts that gets an IDR; None: the next frame
        self._last_pts: int | None = None
        self._closed = False
        self._fit = Scaler(width, height, mode)
        self._settings = (preset, bitrate, fps, threads, profile)
        self._codec = self._open()

    def _open(self) -> VideoCodecContext:
        """x264 at the encoder's size, opened."""
        preset, bitrate, fps, threads, profile = self._settings
        codec = cast(VideoCodecContext, av.CodecContext.create("libx264", "w"))
        codec.width, codec.height, codec.pix_fmt = self.width, self.height, "yuv420p"
        codec.time_base = CLOCK
        # Only a hint for rate control (x264 takes frame durations from the timestamps, which
        # are what they are); without it x264 would assume 90000 frames per second.
        codec.framerate = Fraction(fps).limit_denominator(1001)
        codec.bit_rate = bitrate
        # zerolatency turns frame threads (a frame of delay each) into sliced threads.
        codec.thread_count = threads or settings.workers()
        codec.options = {
            "preset": preset,
            "tune": "zerolatency",
            "bf": "0",
            # Keyframes only where encode() asks for them, and then as IDRs (a segment must
            # decode on its own, which a non-IDR I-frame does not guarantee).
            "x264-params": "keyint=infinite:scenecut=0",
            "forced-idr": "1",
            # A VBV of one second at the target rate: a scene of noise cannot balloon a segment
            # beyond about (gop + 1) × bitrate.
            "maxrate": str(bitrate),
            "bufsize": str(bitrate),
        }
        if profile is not None:
            codec.profile = profile  # e.g. "baseline": what WebRTC peers are sure to decode
        codec.open()
        return codec

    @property
    def last_pts(self) -> int | None:
        """Timestamp of the last frame encoded (after any fix-up)."""
        return self._last_pts

    def resize(self, width: int, height: int) -> list[av.Packet]:
        """Encode width×height frames from now on: the encoder is drained (its last packets
        returned) and opened again at the new size; the next frame is an IDR."""
        packets = self._run(None)
        self.width, self.height = width, height
        self._fit.resize(width, height)
        self._codec = self._open()
        self._next_idr = None
        return packets

    def request_keyframe(self) -> None:
        """Make the next frame an IDR (a receiver lost the picture). Any thread: at worst the
        frame after the one being encoded gets it."""
        self._next_idr = None

    def encode(self, frame: av.VideoFrame, pts90k: int) -> list[av.Packet]:
        """Encode `frame` at `pts90k`; returns the packets ready (pts = dts, on the 90 kHz clock).

        The frame is the encoder's from here on: its pts, time base and picture type are set.
        """
        if self._closed:
            raise RuntimeError("encoder is closed")
        if pts90k < 0:
            # MPEG-TS has no negative timestamps; a muxer would shift that segment on its own.
            raise ValueError(f"output timestamps start at 0, got {pts90k}")
        if self._last_pts is not None and pts90k <= self._last_pts:
            # Repeats and clock steps must not stop the stream: the muxer rejects them.
            pts90k = self._last_pts + 1
            self.stats.pts_fixed += 1
        self._last_pts = pts90k
        if frame.format.name != "yuv420p" or (frame.width, frame.height) != (self.width, self.height):
            frame = self._fit(frame)
            self.stats.reformatted += 1
        frame.pts = pts90k
        frame.time_base = CLOCK
        # Decoded frames keep their I/P/B type and x264 obeys it: clear it unless an IDR is due.
        if self._next_idr is None or pts90k >= self._next_idr:
            frame.pict_type = PictureType.I
            self._next_idr = pts90k + self._gop_ticks
        else:
            frame.pict_type = PictureType.NONE
        self.stats.frames += 1
        return self._run(frame)

    def close(self) -> list[av.Packet]:
        """Drain the encoder; returns the last packets (none under zerolatency, but say so)."""
        if self._closed:
            return []
        self._closed = True
        return self._run(None)

    def _run(self, frame: av.VideoFrame | None) -> list[av.Packet]:
        started, started_wall = time.thread_time(), time.perf_counter()
        packets = self._codec.encode(frame)
        self.stats.encode_seconds += time.thread_time() - started
        self.stats.encode_wall_seconds += time.perf_counter() - started_wall
        for packet in packets:
            self.stats.bytes += packet.size
            self.stats.keyframes += packet.is_keyframe
        return packets
