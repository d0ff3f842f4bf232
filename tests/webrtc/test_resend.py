"""Which sent packets go again when the processor's returns stall (those of the frames out), and
after a NACK is answered (the newest, once per frame behind the gap)."""

from __future__ import annotations

from aiortc.jitterbuffer import JitterBuffer
from aiortc.rtp import RtpPacket

from relay_server.webrtc.resend import MAX_PACKETS, Resender, frames_after, packets_of_last_frames
from relay_server.webrtc.roundtrip import RoundTrip
from relay_server.webrtc.sendtrack import SendStats

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


def test_the_frames_sent_after_a_lost_packet_and_the_newest_packet() -> None:
    sent = history([3, 2, 1, 4], first=100)  # 100-102, 103-104, 105, 106-109
    assert frames_after(sent, 101) == (109, 3)  # frames 1, 2, 3 came after frame 0's packet
    assert frames_after(sent, 105) == (109, 1)
    assert frames_after(sent, 109) == (109, 0)
    assert frames_after(sent, 99) == (None, 0)  # no longer kept: nothing to say
    assert frames_after(history([2, 2], first=65534), 65534) == (1, 1)  # 65534-65535, 0-1


class LoopbackSender:
    """Stands in for aiortc's RTCRtpSender and the network: what it sends again goes straight into
    the processor's receiver, aiortc's own JitterBuffer (no peer connection is needed for that)."""

    def __init__(self, sent: dict[int, RtpPacket], receiver: JitterBuffer, released: list[int]) -> None:
        self._RTCRtpSender__rtp_history = sent
        self.receiver = receiver
        self.released = released

    async def _retransmit(self, sequence_number: int) -> None:
        sent = self._RTCRtpSender__rtp_history.values()
        self.receive(next(packet for packet in sent if packet.sequence_number == sequence_number))

    def receive(self, packet: RtpPacket) -> None:
        copy = RtpPacket(sequence_number=packet.sequence_number, timestamp=packet.timestamp)
        copy._data = b"\x00\x00\x00\x01\x41"  # type: ignore[attr-defined]
        _, frame = self.receiver.add(copy)
        if frame is not None:
            self.released.append(frame.timestamp)


async def test_after_a_nack_is_answered_no_frame_waits_for_a_packet_to_let_it_out() -> None:
    """Frames of one packet each, the third lost: aiortc's jitter buffer holds the frames behind
    the gap, and once the retransmission fills it lets out one per packet it gets. Answering the
    NACK, the relay sends the newest packet again once per frame behind the gap: every complete
    frame is out at once, not a frame later each, for good."""
    sent = history([1] * 6, first=0)  # frames 0-5, one packet each, timestamp = frame
    released: list[int] = []
    sender = LoopbackSender(sent, JitterBuffer(capacity=128, is_video=True), released)
    for seq in (0, 1, 3, 4, 5):  # 2 is lost on the way
        sender.receive(sent[seq])
    assert released == [0]  # frame 1 ends where the gap begins: it waits with the rest
    resender = Resender(sender, RoundTrip(), stats := SendStats())
    await sender._retransmit(2)  # aiortc's sender answers the receiver's NACK for 2
    assert released == [0, 1, 2, 3, 4]  # all but the newest, whose end the next frame shows
    assert stats.pushed == 3
    await resender.stop()
