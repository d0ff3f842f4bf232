"""MarkerJitterBuffer: a frame leaves as soon as its marked last packet is in, to the decoder or
to a tap; keyframe requests to the sender."""

from __future__ import annotations

import asyncio
from itertools import pairwise
from typing import Any

import av
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpSender
from aiortc.jitterbuffer import JitterBuffer
from aiortc.rtp import RtpPacket

from relay_server.media.h264 import is_idr
from relay_server.webrtc.jitter import MarkerJitterBuffer, bitrate_request, install, keyframe_request
from tests.processor.client import HEIGHT, WIDTH, PatternTrack
from tests.webrtc.support import Changes


def packet(seq: int, timestamp: int, data: bytes, *, marker: bool = False) -> RtpPacket:
    rtp = RtpPacket(sequence_number=seq, timestamp=timestamp, marker=int(marker), ssrc=0x1234)
    rtp._data = data  # type: ignore[attr-defined]  # what aiortc's depayloader sets
    return rtp


async def ask_for_keyframe(receiver: Any) -> None:
    request = keyframe_request(receiver)
    assert request is not None
    await request


# Annex B access units as aiortc's depayloader leaves them: start codes, then NAL units.
SPS, PPS = b"\x00\x00\x00\x01\x67\x42", b"\x00\x00\x00\x01\x68\xce"
IDR = SPS + PPS + b"\x00\x00\x00\x01\x65\x88\x84"
P = b"\x00\x00\x00\x01\x41\x9a\x02"


def test_a_frame_leaves_with_its_marked_packet_where_aiortc_waits_for_the_next_frame() -> None:
    ours, stock = MarkerJitterBuffer(), JitterBuffer(capacity=512, is_video=True)
    first = [packet(10, 3000, IDR[:9]), packet(11, 3000, IDR[9:], marker=True)]
    for rtp in first[:-1]:
        assert ours.add(rtp)[1] is None
        assert stock.add(rtp)[1] is None
    frame = ours.add(first[-1])[1]
    assert frame is not None and (frame.data, frame.timestamp) == (IDR, 3000)
    assert stock.add(first[-1])[1] is None  # aiortc: only once the next frame begins
    assert stock.add(packet(12, 6000, P[:5]))[1] is not None
    assert ours.add(packet(12, 6000, P[:5]))[1] is None  # not complete yet
    frame = ours.add(packet(13, 6000, P[5:], marker=True))[1]
    assert frame is not None and (frame.data, frame.timestamp) == (P, 6000)


def started() -> MarkerJitterBuffer:
    """A buffer that released the stream's first keyframe (packet 1)."""
    buffer = MarkerJitterBuffer()
    assert buffer.add(packet(1, 90, IDR, marker=True))[1] is not None
    return buffer


def test_a_gap_holds_the_frame_until_the_missing_packet_comes() -> None:
    buffer = started()
    assert buffer.add(packet(2, 180, P[:3]))[1] is None
    assert buffer.add(packet(4, 180, P[5:], marker=True))[1] is None  # 3 is missing
    frame = buffer.add(packet(3, 180, P[3:5]))[1]
    assert frame is not None and frame.data == P


def test_a_frame_whose_last_packet_is_not_marked_leaves_when_the_next_one_starts() -> None:
    buffer = started()
    assert buffer.add(packet(2, 180, P))[1] is None
    frame = buffer.add(packet(3, 270, P[:5]))[1]  # the packet of ts 180 was not marked
    assert frame is not None and (frame.data, frame.timestamp) == (P, 180)
    frame = buffer.add(packet(4, 270, P[5:], marker=True))[1]
    assert frame is not None and frame.data == P


def test_the_stream_starts_at_a_keyframe_with_its_parameter_sets() -> None:
    """The first packets sent (SPS, PPS) were lost: the buffer starts at the first that came."""
    buffer = MarkerJitterBuffer()
    slices = IDR[len(SPS + PPS) :]
    assert buffer.add(packet(3, 90, slices, marker=True)) == (True, None)  # a keyframe, please
    assert buffer.add(packet(4, 180, P, marker=True)) == (False, None)  # asked once
    assert buffer.withheld == 2
    frame = buffer.add(packet(5, 270, IDR, marker=True))[1]
    assert frame is not None and frame.data == IDR
    frame = buffer.add(packet(6, 360, slices, marker=True))[1]  # later keyframes may omit them
    assert frame is not None and frame.data == slices


async def test_a_gap_is_asked_for_again_then_its_frame_given_up() -> None:
    buffer = started()
    buffer.nack_interval = 0
    buffer.max_wait = 3600
    asked: list[list[int]] = []
    buffer.on_missing = lambda ssrc, lost: asked.append(lost)
    # The P-frame at 180 lost its first packet (2); the P-frame at 270 waits behind it.
    assert buffer.add(packet(3, 180, P[5:], marker=True)) == (False, None)
    assert buffer.add(packet(4, 270, P, marker=True)) == (False, None)
    assert asked == [[2], [2]]  # again with each packet while the gap lasts
    buffer.max_wait = 0
    # Given up: the frame at 180 dropped, the one at 270 withheld (it refers to it), a keyframe
    # asked for; the keyframe behind them goes at once.
    pli, frame = buffer.add(packet(5, 360, IDR, marker=True))
    assert pli and frame is not None and (frame.data, frame.timestamp) == (IDR, 360)
    assert (buffer.given_up, buffer.withheld) == (1, 1)
    frame = buffer.add(packet(6, 450, P, marker=True))[1]
    assert frame is not None and frame.timestamp == 450
    assert buffer.add(packet(2, 180, P[:5])) == (False, None)  # too late: ignored
    assert asked == [[2], [2]]


async def test_a_gap_is_asked_for_again_while_nothing_else_comes() -> None:
    """The sender may send nothing more until its frames come back: the asks go on by timer."""
    buffer = started()
    buffer.nack_interval = 0.001
    asked: list[list[int]] = []
    three_asks = asyncio.Event()

    def on_missing(ssrc: int, lost: list[int]) -> None:
        asked.append(lost)
        if len(asked) == 3:
            three_asks.set()

    buffer.on_missing = on_missing
    buffer.add(packet(3, 180, P[5:], marker=True))  # 2 is missing
    buffer.add(packet(5, 270, P, marker=True))  # and 4
    await asyncio.wait_for(three_asks.wait(), 5)
    assert asked[-1] == [2, 4]
    buffer.stop()


def test_a_retransmission_that_comes_lets_every_frame_behind_the_gap_go() -> None:
    buffer = started()
    tapped: list[int] = []
    buffer.tap = lambda _, timestamp: tapped.append(timestamp)
    buffer.add(packet(3, 180, P[5:], marker=True))
    buffer.add(packet(4, 270, P, marker=True))
    buffer.add(packet(5, 360, P, marker=True))
    assert tapped == []
    buffer.add(packet(2, 180, P[:5]))  # the retransmission
    assert tapped == [180, 270, 360] and buffer.given_up == 0


def test_a_tap_takes_every_complete_frame_from_the_decoder() -> None:
    buffer = MarkerJitterBuffer()
    tapped: list[tuple[bytes, int]] = []
    buffer.tap = lambda data, timestamp: tapped.append((data, timestamp))
    assert buffer.add(packet(1, 3000, IDR[:9]))[1] is None
    assert buffer.add(packet(2, 3000, IDR[9:], marker=True)) == (False, None)
    assert buffer.add(packet(3, 6000, P, marker=True)) == (False, None)
    assert tapped == [(IDR, 3000), (P, 6000)]
    assert buffer.tapped == 2
    assert buffer.ssrc == 0x1234


def test_cleared_the_decoder_resumes_at_the_next_keyframe() -> None:
    buffer = MarkerJitterBuffer()
    tapped: list[int] = []
    buffer.tap = lambda _, timestamp: tapped.append(timestamp)
    buffer.add(packet(1, 3000, IDR, marker=True))
    buffer.tap = None
    # The decoder missed the frame at 3000: a P-frame would decode to a smeared picture.
    assert buffer.add(packet(2, 6000, P, marker=True)) == (False, None)
    assert buffer.withheld == 1
    frame = buffer.add(packet(3, 9000, IDR, marker=True))[1]
    assert frame is not None and (frame.data, frame.timestamp) == (IDR, 9000)
    frame = buffer.add(packet(4, 12000, P, marker=True))[1]  # and normal release from then on
    assert frame is not None and frame.data == P
    assert tapped == [3000] and buffer.withheld == 1


def test_a_failing_tap_costs_its_frame_only(caplog: pytest.LogCaptureFixture) -> None:
    buffer = MarkerJitterBuffer()

    def tap(data: bytes, timestamp: int) -> None:
        raise ValueError("owner bug")

    buffer.tap = tap
    assert buffer.add(packet(1, 3000, IDR, marker=True)) == (False, None)
    assert "tap failed" in caplog.text
    assert buffer.add(packet(2, 6000, P, marker=True)) == (False, None)


def test_install_says_when_aiortc_moved_the_buffer() -> None:
    assert install(object()) is None
    assert keyframe_request(object()) is None
    assert bitrate_request(object(), 1_000_000) is None


async def test_tapped_access_units_decode_and_a_keyframe_comes_on_request() -> None:
    """Real peers on loopback: aiortc's stock H.264 encoder sends the pattern, the receiver's
    frames go to the tap (none to its decoder), and a PLI from request_keyframe() brings an IDR
    within a few frames, where the encoder's own GOP is 250 frames."""
    loop = asyncio.get_running_loop()
    changes = Changes()
    sender_pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    receiver_pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        transceiver = sender_pc.addTransceiver(PatternTrack(), direction="sendonly")
        codecs = RTCRtpSender.getCapabilities("video").codecs
        transceiver.setCodecPreferences(
            [c for c in codecs if c.mimeType.lower() in ("video/h264", "video/rtx")]
        )
        sender = transceiver.sender
        plis: list[int] = []  # units tapped when each PLI reached the sender
        send_keyframe = sender._send_keyframe

        def on_pli() -> None:
            plis.append(len(units))
            send_keyframe()

        sender._send_keyframe = on_pli  # type: ignore[method-assign]  # watch PLIs arrive
        await sender_pc.setLocalDescription(await sender_pc.createOffer())
        await receiver_pc.setRemoteDescription(sender_pc.localDescription)
        receiver = receiver_pc.getTransceivers()[0].receiver
        buffer = install(receiver)
        assert buffer is not None
        units: list[tuple[bytes, int]] = []

        def tap(data: bytes, timestamp: int) -> None:
            assert asyncio.get_running_loop() is loop
            units.append((data, timestamp))
            changes.notify()

        buffer.tap = tap
        assert keyframe_request(receiver) is None  # no packet yet: no SSRC to ask
        await receiver_pc.setLocalDescription(await receiver_pc.createAnswer())
        await sender_pc.setRemoteDescription(receiver_pc.localDescription)

        await changes.until(lambda: len(units) >= 10, 20, "10 access units tapped")
        decoder = av.CodecContext.create("h264", "r")
        decoded = [frame for data, _ in units[:10] for frame in decoder.decode(av.Packet(data))]
        assert len(decoded) == 10
        assert all((frame.width, frame.height) == (WIDTH, HEIGHT) for frame in decoded)
        assert [is_idr(data) for data, _ in units[:10]] == [True] + [False] * 9
        assert all(b - a == 3000 for (_, a), (_, b) in pairwise(units[:10]))  # 30 fps, 90 kHz

        await ask_for_keyframe(receiver)
        await changes.until(lambda: bool(plis), 5, "the PLI at the sender")
        await changes.until(lambda: len(units) >= plis[0] + 5, 5, "5 more access units")
        assert any(is_idr(data) for data, _ in units[plis[0] : plis[0] + 5]), plis

        # Back to decoding: what the decoder would smear is withheld until the next keyframe.
        buffer.tap = None
        await ask_for_keyframe(receiver)
        frame = await asyncio.wait_for(receiver.track.recv(), 5)
        assert isinstance(frame, av.VideoFrame) and (frame.width, frame.height) == (WIDTH, HEIGHT)
        assert len(plis) == 2
    finally:
        await sender_pc.close()
        await receiver_pc.close()
