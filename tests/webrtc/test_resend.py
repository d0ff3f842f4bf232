"""Which sent packets go again when the processor's returns stall: those of the frames out."""

from __future__ import annotations

from aiortc.rtp import RtpPacket

from relay_server.webrtc.resend import MAX_PACKETS, packets_of_last_frames

HISTORY_SIZE = 128  # as aiortc's sender keeps them: by sequence number modulo 128


def history(frames: list[int], first: int) -> dict[int, RtpPacket]:
    """Packets from sequence number `first` on, `frames[i]` of them with timestamp i."""
    kept: dict[int, RtpPacket] = {}
    seq = first
    for timestamp, count in enumerate(frames):
        for _ in range(count):
            kept[seq % HISTORY_SIZE] = RtpPacket(sequence_number=seq, timestamp=timestamp)
            seq = (seq + 1) & 0xFFFF
    return kept


def test_the_packets_of_the_last_frames_oldest_first() -> None:
    sent = history([3, 2, 1, 4], first=100)  # 100-102, 103-104, 105, 106-109
    assert packets_of_last_frames(sent, 2) == [105, 106, 107, 108, 109]
    assert packets_of_last_frames(sent, 10) == list(range(100, 110))
    assert packets_of_last_frames(sent, 0) == []
    assert packets_of_last_frames({}, 3) == []


def test_sequence_numbers_wrap() -> None:
    sent = history([2, 2, 2], first=65533)  # 65533-65534, 65535-0, 1-2
    assert packets_of_last_frames(sent, 2) == [65535, 0, 1, 2]


def test_only_the_newest_packets_go_where_the_receiver_would_start_again() -> None:
    """aiortc's receiver drops everything and starts again on a packet 100 behind its newest."""
    sent = history([60, 60, 5], first=0)  # the history keeps the last 128: 37-124
    chosen = packets_of_last_frames(sent, 3)
    assert chosen == list(range(125 - MAX_PACKETS, 125))
