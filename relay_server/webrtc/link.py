"""ProcessorLink: one session's WebRTC connection to its processor, kept alive.

    FrameQueue ─▶ SendTrack (paced, our x264) ─▶ RTCPeerConnection ─▶ processor
                                                         │
    on_frame(frame, arrival, media) ◀── returned track ◀─┘      control / data channels

run() waits for the input's first frame (state CONNECTING, "waiting for input"): a processor
connected before there is anything to send would starve into its watchdog (ComfyStream ends its
track after 5 s without input). It then negotiates (POST {url}/offer) and watches the connection.
When it fails or closes, its returned track ends, or nothing comes back for `return_timeout`
seconds while frames go out, the peer connection is torn down completely and a new one
negotiated after a backoff, with the current prompts; meanwhile the state is RECONNECTING with
the reason, and the owner keeps its output's timeline. An offer refused before any connection
succeeded (an invalid prompt, say) is fatal: retrying cannot fix it; so is an answer the relay
refuses itself (a redirect, no ICE candidate on an allowed host), whenever it comes. A stop never
cuts an offer off mid-request: it is let finish (within offer_timeout), and a connection it
answered is let connect (within CLOSE_HANDSHAKE) and closed, so that the processor sees the close.

Returned frames are stamped on arrival (monotonic clock) and matched to sent ones (roundtrip.py),
which gives the round trip and the media time of the input frame each was made from. Their own
pts say nothing more: ComfyStream labels a slow pipeline's output with stale ones.

With `remux` on (zero-transcode) returned frames are not decoded at all: the receiver's jitter
buffer hands each complete access unit to on_unit instead of aiortc's decoder thread;
request_keyframe() asks the processor for an IDR (RTCP PLI). Switching remux off mid-stream asks
for one too, since aiortc's decoder starts again where the units left off.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import aiohttp
import av
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCRtpSender
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from relay_server.backoff import Backoff
from relay_server.media.encoder import EncoderStats, VideoEncoder
from relay_server.media.h264 import is_idr
from relay_server.media.handoff import FrameQueue
from relay_server.media.timeline import SessionTimeline
from relay_server.waits import until_set
from relay_server.webrtc import jitter
from relay_server.webrtc.control import ControlClient, ControlError
from relay_server.webrtc.resend import Resender
from relay_server.webrtc.roundtrip import LatencyWindow, RoundTrip
from relay_server.webrtc.sendtrack import (
    IN_FLIGHT_EXPIRY,
    MAX_IN_FLIGHT,
    REPEAT_AFTER,
    InFlight,
    SendStats,
    SendTrack,
)
from relay_server.webrtc.signaling import AnswerRefused, OfferRejected, ProcessorError, negotiate

log = logging.getLogger(__name__)

_T = TypeVar("_T")

# Returned access units waiting for delivery (remux): a second at 30 fps; the processor holds at
# most max_in_flight frames, so only a burst after a stall comes near it.
RETURNED_UNITS = 32
REMB_INTERVAL = 1.0  # seconds between requests for the return bitrate, as browsers send REMB
RETURN_TAIL = 16  # packets after the newest returned one asked for when returns stall (resend.py)
# Seconds a connection answered just before it is closed may take to connect: closed connected,
# it tells the processor (DTLS close_notify), which otherwise waits for its ICE to give up.
CLOSE_HANDSHAKE = 5.0
WAITING_FOR_INPUT = "waiting for input"
CONNECTING = "connecting to the processor"


class LinkState(enum.Enum):
    CONNECTING = "connecting"  # negotiating, or connected with no frame back yet
    CONNECTED = "connected"  # processed frames are coming back
    RECONNECTING = "reconnecting"  # the connection was lost: a new one follows a backoff
    CLOSED = "closed"  # run() ended by stop()
    FAILED = "failed"  # run() ended by a LinkError


class LinkError(RuntimeError):
    """The link cannot work: the processor refused the first offer, or reconnecting gave up."""


@dataclass(frozen=True)
class LinkSettings:
    offer_timeout: float = 60.0  # seconds for /offer: with prompts, the processor warms up first
    # No ICE servers by default: between servers on one network none is needed, and a public
    # STUN server would be asked for every connection.
    ice_servers: tuple[RTCIceServer, ...] = ()
    preset: str = "ultrafast"  # x264 preset of the send leg
    bitrate: int = 2_000_000  # of the send leg; ComfyStream sends back at 2 Mbit/s too
    # What the processor is asked to send back at (RTCP REMB, every REMB_INTERVAL): with no
    # bandwidth estimation (signaling.py), the bitrate of an aiortc processor's returned video.
    # None: aiortc's bandwidth estimation on both legs instead, as a stock aiortc client has it.
    return_bitrate: int | None = 2_000_000
    gop: float = 4.0  # seconds between the send leg's IDRs (the processor can also ask for one)
    fps: float = 30.0  # rate-control hint of the send leg's encoder
    repeat_after: float = REPEAT_AFTER  # input stall after which the last frame is sent again
    max_in_flight: int = MAX_IN_FLIGHT  # frames at the processor at once (0: no limit)
    max_fps: float = 0.0  # frames per second sent at most (0: the input's rate)
    # Release frames by the session timeline. Off, a frame goes as soon as it is decoded and the
    # processor has room: an input that is behind catches up as fast as the relay can go.
    pace: bool = True
    # aiortc's own H.264 encoder instead of ours (x264's default preset, re-created whenever the
    # bandwidth estimate moves by 10%, with return_bitrate None): the baseline the benchmarks
    # measure the relay against.
    stock_encoder: bool = False
    return_timeout: float = 5.0  # seconds without a returned frame, while sending, that mean lost
    control_timeout: float = 10.0  # seconds to wait for a control reply
    # The relay's allow-list: the processor's ICE candidates must be on these hosts (candidates.py).
    allowed_hosts: frozenset[str] = frozenset()  # empty: any host
    reconnect: Backoff = field(
        default_factory=lambda: Backoff(initial=0.25, factor=2.0, maximum=5.0, attempts=1_000_000)
    )

    def send_encoder(self, width: int, height: int) -> VideoEncoder:
        """The send leg's x264, one per peer connection (so each connection starts on an IDR)."""
        return VideoEncoder(
            width,
            height,
            gop=self.gop,
            preset=self.preset,
            bitrate=self.bitrate,
            fps=self.fps,
            profile="Baseline",  # the profile every WebRTC H.264 decoder takes
        )


@dataclass(frozen=True)
class LinkStats:
    state: LinkState
    reason: str  # why the link is not (or no longer) connected; "" when it is
    connections: int  # offers the processor answered
    losses: int  # connections lost and torn down
    frames_dropped: int  # input frames replaced by a newer one before they could be sent
    frames_returned: int
    units_dropped: int  # returned access units let go (remux): the delivery queue was full
    returns_unmatched: int  # returned frames not matched to a sent one (no latency for them)
    latency_p50: float  # send → return, seconds, over the last ~10 s (NaN: none matched)
    latency_p95: float
    latency_p99: float
    latency_mean: float
    peer_state: str  # aiortc's connectionState of the current connection ("" between them)
    send: SendStats
    encoder: EncoderStats  # the send leg's x264, summed over every connection


class ProcessorLink:
    """Keeps frames flowing to the processor at `url` and processed frames coming back."""

    def __init__(
        self,
        url: str,
        frames: FrameQueue,
        on_frame: Callable[[av.VideoFrame, float, int | None], Awaitable[None]],
        *,
        prompts: list[dict[str, Any]] | None = None,
        settings: LinkSettings | None = None,
        timeline: SessionTimeline | None = None,
        on_data: Callable[[str], None] | None = None,
        on_state: Callable[[LinkState, str], None] | None = None,
        on_unit: Callable[[bytes, float, int | None], Awaitable[None]] | None = None,
        remux: bool = False,
        name: str = "link",
    ) -> None:
        if remux and on_unit is None:
            raise ValueError("remux needs on_unit, where the returned access units go")
        self.url = url
        self.frames = frames
        self.prompts = prompts
        self.settings = settings or LinkSettings()
        self.name = name
        self.state = LinkState.CONNECTING
        self.reason = ""
        self.latencies = LatencyWindow()
        self._on_frame = on_frame
        self._on_data = on_data
        self._on_state = on_state
        self._on_unit = on_unit
        self._remux = remux
        self.units_dropped = 0  # returned access units let go: the delivery queue was full
        # Media time → clock, kept across connections (the owner's, shared with its output).
        self.timeline = timeline or SessionTimeline(time.monotonic())
        self._send = SendStats()
        self._encoded = EncoderStats()  # of closed connections' encoders
        self._connections = 0
        self._losses = 0
        self._returned = 0
        self._unmatched = 0
        self._connection: _Connection | None = None
        self._origin = time.monotonic()  # zero of the send timeline, kept across connections
        self._ran = False
        self._stop = asyncio.Event()

    @property
    def stats(self) -> LinkStats:
        connection = self._connection
        current = connection.encoder if connection else None
        encoder = _sum(self._encoded, current.stats) if current else replace(self._encoded)
        unmatched = self._unmatched + (connection.roundtrip.unmatched if connection else 0)
        window = self.latencies
        return LinkStats(
            state=self.state,
            reason=self.reason,
            connections=self._connections,
            losses=self._losses,
            frames_dropped=self.frames.dropped,
            frames_returned=self._returned,
            units_dropped=self.units_dropped,
            returns_unmatched=unmatched,
            latency_p50=window.percentile(0.50),
            latency_p95=window.percentile(0.95),
            latency_p99=window.percentile(0.99),
            latency_mean=window.mean(),
            peer_state=connection.pc.connectionState if connection else "",
            send=replace(self._send),
            encoder=encoder,
        )

    @property
    def in_flight(self) -> tuple[int, int]:
        """Frames at the processor now (sent, not back), and the most allowed (0: no limit)."""
        connection = self._connection
        return (len(connection.in_flight) if connection is not None else 0), self.settings.max_in_flight

    @property
    def remux(self) -> bool:
        """Returned frames go to on_unit as they are (True) or decoded to on_frame."""
        return self._remux

    def set_remux(self, remux: bool) -> None:
        """Switch the return leg, at once on the current connection and for the next ones."""
        if remux and self._on_unit is None:
            raise ValueError("remux needs on_unit, where the returned access units go")
        if remux != self._remux:
            self._remux = remux
            if self._connection is not None:
                self._connection.set_remux(remux)

    def pending_media(self) -> int | None:
        """The media time of the oldest frame at the processor now (sent, not back, not yet
        presumed lost); None when none is."""
        connection = self._connection
        if connection is None:
            return None
        return connection.roundtrip.pending(time.monotonic() - IN_FLIGHT_EXPIRY)

    def request_keyframe(self) -> bool:
        """Ask the processor for an IDR on its return leg (RTCP PLI); False when not connected."""
        connection = self._connection
        return connection is not None and connection.request_keyframe()

    async def run(self) -> None:
        """Connect, and reconnect after every loss, until stop(); raises LinkError when the link
        cannot work. Every peer connection, task and thread is gone when it returns."""
        if self._ran:
            raise RuntimeError(f"link {self.name} runs once")
        self._ran = True
        executor = ThreadPoolExecutor(1, thread_name_prefix=f"send-encode {self.name}")
        http = aiohttp.ClientSession()
        try:
            await self._keep_connected(executor, http)
        except LinkError as error:
            self._set_state(LinkState.FAILED, str(error))
            raise
        finally:
            await http.close()
            executor.shutdown(wait=True)  # every encode has been drained: this is immediate
            if self.state is not LinkState.FAILED:
                self._set_state(LinkState.CLOSED, self.reason)

    async def stop(self) -> None:
        """Make run() close the connection and return (it may be awaited elsewhere)."""
        self._stop.set()

    async def control(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send a `control` request (update_prompts, update_resolution, pause_prompts, ...) and
        return the processor's reply. ControlRejected if it says it failed; ControlError when
        no processor is connected or it does not answer in time. Prompts that the processor
        accepted are the ones the next connection offers."""
        connection = self._connection
        if connection is None or self.state is not LinkState.CONNECTED:
            raise ControlError(f"the processor is not connected ({self.state.value}: {self.reason})")
        reply = await connection.control.request(message, self.settings.control_timeout)
        if message.get("type") == "update_prompts":
            self.prompts = message.get("prompts")
        return reply

    async def drain(self, within: float) -> None:
        """Wait, at most `within` seconds, until every frame has been sent and has come back:
        the input has ended, and its last frames may still be on their way (paced at their media
        time) or at the processor."""
        connection = self._connection
        if connection is None or self.state is not LinkState.CONNECTED:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await connection.track.sent_all.wait()
                await connection.in_flight.drained()

    # -- the connection loop -----------------------------------------------------------------

    async def _keep_connected(self, executor: ThreadPoolExecutor, http: aiohttp.ClientSession) -> None:
        self._set_state(LinkState.CONNECTING, WAITING_FOR_INPUT)
        await self._unless_stopped(self.frames.first())
        self._set_state(LinkState.CONNECTING, CONNECTING)
        delays = self.settings.reconnect.delays()
        while not self._stop.is_set():
            connection = _Connection(self, executor, http)
            self._connection = connection
            try:
                reason = await self._unless_stopped(connection.run())
            except AnswerRefused as error:
                raise LinkError(str(error)) from error
            except OfferRejected as error:
                if self._connections == 0:
                    raise LinkError(str(error)) from error
                reason = str(error)
            except ProcessorError as error:
                reason = str(error)
            finally:
                self._connection = None
                await connection.close()
                self._retire(connection)
            if reason is None:  # stopped
                return
            if connection.returned:
                delays = self.settings.reconnect.delays()  # it worked for a while: start afresh
            self._losses += connection.answered
            lost = LinkState.RECONNECTING if self._connections else LinkState.CONNECTING
            self._set_state(lost, reason)
            log.warning("link %s: %s; reconnecting", self.name, reason)
            delay = next(delays, None)
            if delay is None:
                raise LinkError(f"gave up reconnecting to {self.url}: {reason}")
            await self._unless_stopped(asyncio.sleep(delay))

    async def _unless_stopped(self, work: Awaitable[_T]) -> _T | None:
        """`work`'s result, or None once stop() was called (the work is then cancelled)."""
        task = await until_set(work, self._stop)
        return None if task.cancelled() else task.result()

    def _retire(self, connection: _Connection) -> None:
        if connection.encoder is not None:
            self._encoded = _sum(self._encoded, connection.encoder.stats)
        self._unmatched += connection.roundtrip.unmatched

    def _set_state(self, state: LinkState, reason: str) -> None:
        if (state, reason) == (self.state, self.reason):
            return
        self.state, self.reason = state, reason
        if self._on_state is not None:
            self._on_state(state, reason)

    # -- called by the connection ----------------------------------------------------------------

    def _answered(self) -> None:
        self._connections += 1

    def _count_return(self) -> None:
        self._returned += 1
        if self.state is not LinkState.CONNECTED:
            self._set_state(LinkState.CONNECTED, "")

    async def _returned_frame(self, frame: av.VideoFrame, arrival: float, media: int | None) -> None:
        self._count_return()
        await self._on_frame(frame, arrival, media)

    async def _returned_unit(self, unit: bytes, arrival: float, media: int | None) -> None:
        self._count_return()
        assert self._on_unit is not None
        await self._on_unit(unit, arrival, media)

    def _data(self, message: Any) -> None:
        if self._on_data is not None:
            self._on_data(message if isinstance(message, str) else bytes(message).decode(errors="replace"))


class _Connection:
    """One peer connection: negotiated by run(), which returns why it was lost."""

    def __init__(
        self, link: ProcessorLink, executor: ThreadPoolExecutor, http: aiohttp.ClientSession
    ) -> None:
        settings = link.settings
        self.link = link
        self.http = http
        self.answered = 0  # 1 once the processor answered the offer
        self.returned = 0  # frames that came back on this connection
        self.roundtrip = RoundTrip(link.latencies)
        self.in_flight = InFlight(link._send, settings.max_in_flight)
        frames = link.frames
        self.encoder = None if settings.stock_encoder else settings.send_encoder(frames.width, frames.height)
        self.track = SendTrack(
            frames,
            self.encoder,
            executor,
            timeline=link.timeline if settings.pace else None,
            roundtrip=self.roundtrip,
            in_flight=self.in_flight,
            clock_origin=link._origin,
            repeat_after=settings.repeat_after,
            max_fps=settings.max_fps,
            stats=link._send,
            on_resume=self._input_resumed,
        )
        self.executor = executor
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=list(settings.ice_servers)))
        transceiver = self.pc.addTransceiver(self.track, direction="sendrecv")
        transceiver.setCodecPreferences(_video_codecs())
        if self.encoder is not None:
            # aiortc answers RTCP PLI/FIR by flagging its own encoder, which packets bypass.
            transceiver.sender._send_keyframe = self.track.request_keyframe  # type: ignore[method-assign]
        self.resender = Resender(transceiver.sender, self.roundtrip, link._send, on_stall=self._stalled)
        # Returned frames as soon as they are complete, not one frame interval later.
        self.receiver = transceiver.receiver
        self.jitter = jitter.install(self.receiver)
        if self.jitter is not None:
            # A lost packet holds what is behind it a quarter of the budget at most.
            self.jitter.max_wait = link.timeline.budget / 4
            self.jitter.on_missing = self._ask_again
        # Returned access units (remux) wait here for delivery: the tap runs inside aiortc's
        # packet handler and cannot wait. Bounded by the frames in flight in practice.
        self.units: asyncio.Queue[tuple[bytes, float, int]] = asyncio.Queue(RETURNED_UNITS)
        self._skip_to_keyframe = False
        self._first_timestamp: int | None = None  # of the returned RTP stream (remux)
        self.control = ControlClient(self.pc.createDataChannel("control"))
        self.pc.createDataChannel("data").on("message", link._data)
        self.pc.on("track", self._on_track)
        self.pc.on("connectionstatechange", self._on_peer_state)
        self._lost: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._receiving: asyncio.Task[None] | None = None
        self._delivering: asyncio.Task[None] | None = None
        self._requests: set[asyncio.Task[None]] = set()  # keyframe requests (RTCP PLI) being sent
        self._asking: asyncio.Task[None] | None = None  # for the return bitrate (RTCP REMB)
        self._watchdog: asyncio.TimerHandle | None = None
        self._last_return = 0.0
        self._offer: asyncio.Task[None] | None = None
        self._settled = asyncio.Event()  # ICE and DTLS got somewhere: connected, failed or closed

    async def run(self) -> str:
        link = self.link
        self._offer = asyncio.create_task(
            negotiate(
                self.pc,
                self.http,
                link.url,
                prompts=link.prompts,
                width=link.frames.width,
                height=link.frames.height,
                within=link.settings.offer_timeout,
                estimate_bandwidth=link.settings.return_bitrate is None,
                allowed_hosts=link.settings.allowed_hosts,
            ),
            name=f"link-offer {link.name}",
        )
        # Cancelling run() (a stop) leaves the offer to finish: close() waits for it.
        await asyncio.shield(self._offer)
        self.answered = 1
        link._answered()
        self.set_remux(link.remux)
        self._delivering = asyncio.create_task(self._deliver_units(), name=f"link-units {link.name}")
        bitrate = link.settings.return_bitrate
        if self.jitter is not None and bitrate is not None:
            self._asking = asyncio.create_task(
                self._ask_bitrate(self.jitter, bitrate), name=f"link-remb {link.name}"
            )
        self._arm(link.settings.return_timeout)
        self.resender.start()
        return await asyncio.shield(self._lost)

    async def close(self) -> None:
        await self._conclude_offer()
        if self._watchdog is not None:
            self._watchdog.cancel()
        await self.resender.stop()
        await self.pc.close()  # stops the sender (and with it the track) and the receiver
        if self.jitter is not None:
            self.jitter.tap = None
            self.jitter.stop()
        for task in (self._receiving, self._delivering, self._asking, *self._requests):
            if task is not None:
                task.cancel()
                await asyncio.wait([task])
        await self.track.drain()
        loop = asyncio.get_running_loop()
        if self.encoder is not None:
            await loop.run_in_executor(self.executor, self.encoder.close)

    async def _conclude_offer(self) -> None:
        """Let an offer in flight finish and, once answered, the connection get somewhere, so that
        closing it reaches the processor. An /offer cut off mid-request leaves ComfyStream a
        peer connection nobody connects to; when its ICE gives up (about a minute later) it
        stops the shared workflow, under whichever session uses the processor by then."""
        offer = self._offer
        if offer is None:
            return
        try:
            await asyncio.wait([offer])  # bounded by offer_timeout
        except asyncio.CancelledError:
            offer.cancel()  # the owner gave up waiting: nothing is left running
            raise
        if offer.cancelled() or offer.exception() is not None:
            return  # not answered (or refused): there is no connection to tell
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_HANDSHAKE):
                await self._settled.wait()

    def _lose(self, reason: str) -> None:
        if not self._lost.done():
            self._lost.set_result(reason)

    def _on_peer_state(self) -> None:
        state = self.pc.connectionState
        if state in ("connected", "failed", "closed"):
            self._settled.set()
        if state in ("failed", "closed"):
            self._lose(f"the peer connection {state}")

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "video" and self._receiving is None:
            self._receiving = asyncio.create_task(self._receive(track), name=f"link-receive {self.link.name}")

    async def _receive(self, track: MediaStreamTrack) -> None:
        try:
            while True:
                frame = await track.recv()
                arrival = time.monotonic()
                assert isinstance(frame, av.VideoFrame)
                media = self._returned(arrival, frame.pts)
                await self.link._returned_frame(frame, arrival, media)
        except MediaStreamError:
            self._lose("the processor's video track ended")
        except Exception as error:
            log.exception("link %s: returned frames cannot be delivered", self.link.name)
            self._lose(f"returned frames cannot be delivered: {error}")

    def set_remux(self, remux: bool) -> None:
        if self.jitter is None:
            if remux:
                log.warning(
                    "link %s: aiortc's receiver cannot be tapped: returned frames are decoded", self.link.name
                )
            return
        was = self.jitter.tap is not None
        self.jitter.tap = self._tapped if remux else None
        if was and not remux:
            self.request_keyframe()  # aiortc's decoder starts again mid-GOP

    def _input_resumed(self) -> None:
        """Fresh frames follow repeats: the output filled the stall and can resume with the
        processor's first frame only if it is a keyframe."""
        if self.link.remux:
            self.request_keyframe()

    def request_keyframe(self) -> bool:
        request = jitter.keyframe_request(self.receiver)
        if request is None:
            return False
        self._request(request, "keyframe")
        return True

    def _stalled(self) -> None:
        """Frames out did not come back in time: perhaps the processor's last packets were lost."""
        if self.jitter is not None:
            self.jitter.ask_past_newest(RETURN_TAIL)

    def _ask_again(self, media_ssrc: int, lost: list[int]) -> None:
        """The returned video's lost packets, asked for again (RTCP NACK)."""
        self._request(jitter.nack_request(self.receiver, media_ssrc, lost), "nack")

    def _request(self, request: Coroutine[Any, Any, None], what: str) -> None:
        task = asyncio.create_task(request, name=f"{what}-request {self.link.name}")
        self._requests.add(task)
        task.add_done_callback(self._request_done)

    def _request_done(self, task: asyncio.Task[None]) -> None:
        self._requests.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("link %s: %s not sent: %r", self.link.name, task.get_name(), task.exception())

    async def _ask_bitrate(self, buffer: jitter.MarkerJitterBuffer, bitrate: int) -> None:
        """Ask the processor for `bitrate` as soon as its video starts, then every
        REMB_INTERVAL (RTCP is lost sometimes; a processor keeps the last value it got)."""
        await buffer.started.wait()
        try:
            while True:
                request = jitter.bitrate_request(self.receiver, bitrate)
                if request is not None:
                    await request
                await asyncio.sleep(REMB_INTERVAL)
        except Exception as error:  # the connection goes on, at whatever bitrate it was given
            log.warning("link %s: bitrate requests stopped: %r", self.link.name, error)

    def _tapped(self, unit: bytes, timestamp: int) -> None:
        """A returned access unit, complete (on the loop, inside aiortc's RTP handler)."""
        if self._skip_to_keyframe:
            if not is_idr(unit):
                self.link.units_dropped += 1
                return
            self._skip_to_keyframe = False
        # From 0 like aiortc's decoded frames, modulo the 32-bit wrap: the round trip matcher
        # learns the offset to the send timeline either way.
        if self._first_timestamp is None:
            self._first_timestamp = timestamp
        pts = (timestamp - self._first_timestamp) & 0xFFFFFFFF
        try:
            self.units.put_nowait((unit, time.monotonic(), pts))
        except asyncio.QueueFull:
            # Dropping a unit breaks every picture up to the next keyframe: drop those too, and
            # ask for one now.
            self.link.units_dropped += 1 + self.units.qsize()
            while not self.units.empty():
                self.units.get_nowait()
            self._skip_to_keyframe = True
            self.request_keyframe()

    async def _deliver_units(self) -> None:
        try:
            while True:
                unit, arrival, pts = await self.units.get()
                media = self._returned(arrival, pts)
                await self.link._returned_unit(unit, arrival, media)
        except Exception as error:
            log.exception("link %s: returned units cannot be delivered", self.link.name)
            self._lose(f"returned frames cannot be delivered: {error}")

    def _returned(self, arrival: float, pts: int | None) -> int | None:
        """Count a returned frame; the media time of the input frame it was made from."""
        self.returned += 1
        self._last_return = arrival
        roundtrip = self.roundtrip
        skipped = roundtrip.skipped
        media = roundtrip.returned(pts, arrival)
        self.in_flight.returned(passed_over=roundtrip.skipped - skipped, sent_at=roundtrip.last_sent_at)
        return media

    def _arm(self, timeout: float) -> None:
        """Watchdog: lost when frames went out and none came back for `timeout` seconds. One
        timer per `timeout`, re-armed when it fires early (no per-frame timer churn)."""
        loop = asyncio.get_running_loop()

        def check() -> None:
            first_sent = self.roundtrip.first_sent
            if first_sent is None:  # nothing sent yet (no input): nothing to expect back
                self._watchdog = loop.call_later(timeout, check)
                return
            deadline = max(first_sent, self._last_return) + timeout
            now = time.monotonic()
            if now < deadline:
                self._watchdog = loop.call_later(deadline - now, check)
            else:
                self._lose(f"no processed frame came back for {timeout:g} s")

        self._watchdog = loop.call_later(timeout, check)


def _video_codecs() -> list[Any]:
    """H.264 (the processor demands it), with RTX for retransmissions."""
    codecs = RTCRtpSender.getCapabilities("video").codecs
    return [codec for codec in codecs if codec.mimeType.lower() in ("video/h264", "video/rtx")]


def _sum(a: EncoderStats, b: EncoderStats) -> EncoderStats:
    return EncoderStats(**{name: getattr(a, name) + getattr(b, name) for name in a.__dataclass_fields__})
