"""MarkerJitterBuffer: a frame leaves as soon as its marked last packet is in."""

from __future__ import annotations

from aiortc.jitterbuffer import JitterBuffer
from aiortc.rtp import RtpPacket

from relay_server.webrtc.jitter import MarkerJitterBuffer


def packet(seq: int, timestamp: int, data: bytes, *, marker: bool = False) -> RtpPacket:
    rtp = RtpPacket(sequence_number=seq, timestamp=timestamp, marker=int(marker))
    rtp._data = data  # type: ignore[attr-defined]  # what aiortc's depayloader sets
    return rtp


def test_a_frame_leaves_with_its_marked_packet_where_aiortc_waits_for_the_next_frame() -> None:
    ours, stock = MarkerJitterBuffer(), JitterBuffer(capacity=512, is_video=True)
    first = [packet(10, 3000, b"a"), packet(11, 3000, b"b", marker=True)]
    for rtp in first[:-1]:
        assert ours.add(rtp)[1] is None
        assert stock.add(rtp)[1] is None
    frame = ours.add(first[-1])[1]
    assert frame is not None and (frame.data, frame.timestamp) == (b"ab", 3000)
    assert stock.add(first[-1])[1] is None  # aiortc: only once the next frame begins
    assert stock.add(packet(12, 6000, b"c"))[1] is not None
    assert ours.add(packet(12, 6000, b"c"))[1] is None  # not complete yet
    frame = ours.add(packet(13, 6000, b"d", marker=True))[1]
    assert frame is not None and (frame.data, frame.timestamp) == (b"cd", 6000)


def test_a_gap_holds_the_frame_until_the_missing_packet_comes() -> None:
    buffer = MarkerJitterBuffer()
    assert buffer.add(packet(1, 90, b"x"))[1] is None
    assert buffer.add(packet(3, 90, b"z", marker=True))[1] is None  # 2 is missing
    frame = buffer.add(packet(2, 90, b"y"))[1]
    assert frame is not None and frame.data == b"xyz"


def test_a_frame_whose_marked_packet_was_lost_leaves_when_the_next_one_starts() -> None:
    buffer = MarkerJitterBuffer()
    assert buffer.add(packet(1, 90, b"x"))[1] is None
    frame = buffer.add(packet(2, 180, b"next"))[1]  # the marked packet of ts 90 never came
    assert frame is not None and (frame.data, frame.timestamp) == (b"x", 90)
    frame = buffer.add(packet(3, 180, b"!", marker=True))[1]
    assert frame is not None and frame.data == b"next!"
