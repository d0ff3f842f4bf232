"""VideoSplitter: libavformat's access units, each at its own last TS packet; damage dropped and counted."""

from __future__ import annotations

import io
import random
import time
from dataclasses import dataclass

import av
import pytest

from relay_server.media.tsvideo import (
    H264,
    PACKET,
    WRAP,
    AccessUnit,
    Damage,
    VideoSplitter,
    _crc32,
)
from tests.media.clips import ClipSpec, make_clip
from tests.media.test_encoder import timeline
from tests.media.test_segmenter import audio_source, run

VIDEO_PID = 0x100  # FFmpeg's muxer numbers streams from 0x100; video is the first
PMT_PID = 0x1000

CLIPS = [
    ClipSpec(512, 512, fps=30, frames=60, gop=30),
    ClipSpec(512, 512, fps=24, frames=36, gop=12, b_frames=2, audio="aac", cut="mid_gop"),
    ClipSpec(512, 512, fps=60, frames=60, gop=30, audio="opus"),  # many one-packet PESs
    ClipSpec(512, 512, fps=25, frames=50, gop=25, b_frames=3, variable_fps=True, cut="mid_gop"),
    ClipSpec(1280, 720, fps=30, frames=60, gop=30, audio="aac"),
]


def describe(spec: ClipSpec) -> str:
    return f"{spec.width}x{spec.height}-bf{spec.b_frames}-{spec.audio or 'silent'}-{spec.cut}"


def libavformat_units(data: bytes) -> list[tuple[bytes, int | None, int | None]]:
    """The video packets libavformat demuxes (without its parser, as the Decoder ran it)."""
    with av.open(io.BytesIO(data), format="mpegts", options={"fflags": "+noparse"}) as container:
        video = container.streams.video[0]
        return [(bytes(p), p.pts, p.dts) for p in container.demux(video) if p.size]


def split(data: bytes, step: int) -> tuple[VideoSplitter, list[AccessUnit | Damage]]:
    splitter = VideoSplitter()
    events: list[AccessUnit | Damage] = []
    for offset in range(0, len(data), step):
        events += splitter.feed(data[offset : offset + step])
    events += splitter.end()
    return splitter, events


def units(events: list[AccessUnit | Damage]) -> list[AccessUnit]:
    return [event for event in events if isinstance(event, AccessUnit)]


@dataclass(frozen=True)
class Pes:
    """Where a video PES lies in a TS: its packets' offsets, and whether its last packet is full."""

    first: int  # offset of its first TS packet
    end: int  # offset just past its last TS packet
    last_full: bool  # its last packet is all payload (nothing to stuff: its end shows only later)


def padded(packet: bytes) -> bool:
    """Whether FFmpeg's muxer padded this packet (its adaptation fields hold at most a PCR)."""
    if not packet[3] & 0x20:
        return False
    length = packet[4]
    return length == 0 or packet[5] == 0 or length > 1 + (6 if packet[5] & 0x10 else 0)


def video_pes(data: bytes, pid: int = VIDEO_PID) -> list[Pes]:
    found: list[Pes] = []
    first = last = -1
    last_full = False
    for at in range(0, len(data) - PACKET + 1, PACKET):
        if (data[at + 1] & 0x1F) << 8 | data[at + 2] != pid:
            continue
        if data[at + 1] & 0x40:
            if first >= 0:
                found.append(Pes(first, last + PACKET, last_full))
            first = at
        last, last_full = at, not padded(data[at : at + PACKET])
    found.append(Pes(first, last + PACKET, last_full))
    return found


# -- the clips: what libavformat demuxes, sooner ----------------------------------------------------


@pytest.mark.parametrize("step", [188, 1000, 65536])
@pytest.mark.parametrize("spec", CLIPS, ids=describe)
def test_units_are_libavformats(spec: ClipSpec, step: int) -> None:
    clip = make_clip(spec)
    splitter, events = split(clip.data, step)
    assert splitter.program is not None and splitter.program.h264
    assert splitter.program.video_pid == VIDEO_PID
    assert [(u.data, u.pts, u.dts) for u in units(events)] == libavformat_units(clip.data)
    assert sorted(u.pts for u in units(events)) == list(clip.video_pts)
    # Keyframes carry random_access_indicator.
    assert {u.pts for u in units(events) if u.random_access} == set(clip.video_pts[:: spec.gop])
    stats = splitter.stats
    assert stats.damaged == stats.sync_losses == stats.skipped_bytes == stats.false_ends == 0
    assert stats.bytes == len(clip.data) and stats.packets == len(clip.data) // PACKET
    assert stats.units == spec.frames == stats.by_stuffing + stats.by_next + stats.by_end


@pytest.mark.parametrize("spec", CLIPS, ids=describe)
def test_each_unit_completes_with_its_last_ts_packet(spec: ClipSpec) -> None:
    """Fed one TS packet at a time: a unit comes out of the very packet that ends its PES, before a
    byte of the next PES, unless that packet is all payload (nothing to stuff), about 1 in 184."""
    data = make_clip(spec).data
    splitter = VideoSplitter()
    out: list[tuple[int, AccessUnit]] = []  # (bytes fed, unit)
    for offset in range(0, len(data), PACKET):
        out += [(offset + PACKET, u) for u in units(splitter.feed(data[offset : offset + PACKET]))]
    out += [(len(data), u) for u in units(splitter.end())]
    pes = video_pes(data)
    assert len(out) == len(pes) == spec.frames
    late = 0
    for index, ((fed, unit), own) in enumerate(zip(out, pes, strict=True)):
        assert unit.end == fed
        if own.last_full:  # known complete when the next PES starts (or the input ends)
            late += 1
            following = pes[index + 1].first + PACKET if index + 1 < len(pes) else len(data)
            assert fed == following and unit.rule in ("next", "end")
        else:
            assert fed == own.end and unit.rule == "stuffing"
    assert late <= 1


def test_segmenter_output_completes_on_its_pes_length() -> None:
    """Our own Segmenter's output (FFmpeg's muxer, flush_packets, with AAC) writes each video PES's
    length: every unit completes with its last TS packet, also the ones that fill it (which a
    length-less PES could end only when the next one starts)."""
    result = run(timeline("30fps", seconds=3.0), audio=audio_source("aac", seconds=3.0))
    data = b"".join(result.sink.ended())
    splitter, events = split(data, PACKET)
    pes = video_pes(data)
    assert [u.end for u in units(events)] == [p.end for p in pes]
    assert [(u.data, u.pts, u.dts) for u in units(events)] == libavformat_units(data)
    stats = splitter.stats
    assert stats.by_length == len(pes) and stats.damaged == 0


def test_splitter_cost() -> None:
    """Plain Python, and cheap: under 20 ms of CPU per MB (measured: 2.4–3.3 ms, 0.45–0.6 µs a TS
    packet; 0.04 ms per 720p frame at 3.5 Mbit/s)."""
    data = make_clip(CLIPS[-1]).data
    best = float("inf")
    for _ in range(3):
        splitter = VideoSplitter()
        started = time.thread_time()
        for offset in range(0, len(data), 1880):
            splitter.feed(data[offset : offset + 1880])
        splitter.end()
        best = min(best, time.thread_time() - started)
    assert best / (len(data) / 1e6) < 0.020


# -- synthetic streams: the rules one by one --------------------------------------------------------


def section(table: int, body: bytes, extension: int = 1) -> bytes:
    """A PSI section with its CRC_32."""
    head = bytes([table]) + (0xB000 | (len(body) + 9)).to_bytes(2, "big")
    head += extension.to_bytes(2, "big") + bytes([0xC1, 0, 0])
    data = head + body
    return data + _crc32(data).to_bytes(4, "big")


def psi_packet(pid: int, data: bytes, cc: int = 0) -> bytes:
    payload = b"\x00" + data
    return bytes([0x47, 0x40 | pid >> 8, pid & 0xFF, 0x10 | cc]) + payload.ljust(184, b"\xff")


def program(stream_type: int = H264, pid: int = VIDEO_PID, audio: bool = False) -> bytes:
    """PAT and PMT: one program, the video (and AAC at pid + 1)."""
    pat = section(0x00, (1).to_bytes(2, "big") + (0xE000 | PMT_PID).to_bytes(2, "big"))
    streams = bytes([stream_type]) + (0xE000 | pid).to_bytes(2, "big") + b"\xf0\x00"
    if audio:
        streams += bytes([0x0F]) + (0xE000 | pid + 1).to_bytes(2, "big") + b"\xf0\x00"
    pmt = section(0x02, (0xE000 | pid).to_bytes(2, "big") + b"\xf0\x00" + streams, extension=1)
    return psi_packet(0, pat) + psi_packet(PMT_PID, pmt)


def timestamp(prefix: int, value: int) -> bytes:
    return bytes(
        [
            prefix << 4 | (value >> 29 & 0x0E) | 1,
            value >> 22 & 0xFF,
            (value >> 14 & 0xFE) | 1,
            value >> 7 & 0xFF,
            (value << 1 & 0xFE) | 1,
        ]
    )


def pes_bytes(payload: bytes, pts: int, dts: int | None = None, length: bool = False) -> bytes:
    header = timestamp(3 if dts is not None else 2, pts)
    if dts is not None:
        header += timestamp(1, dts)
    optional = bytes([0x80, 0xC0 if dts is not None else 0x80, len(header)]) + header
    size = len(optional) + len(payload) if length else 0
    return b"\x00\x00\x01\xe0" + size.to_bytes(2, "big") + optional + payload


class Muxer:
    """TS packets of one PID by hand, with the adaptation fields a test asks for."""

    def __init__(self, pid: int = VIDEO_PID) -> None:
        self.pid = pid
        self.cc = 0

    def packet(
        self, payload: bytes, *, start: bool = False, field: bytes | None = None, cc: int | None = None
    ) -> bytes:
        """`field`: the adaptation field after its length byte (flags and the rest); it is padded
        with stuffing bytes to fill the packet."""
        room = 184
        control = 0x10 if payload else 0x00
        adaptation = b""
        if field is not None or len(payload) < room:
            field = field if field is not None else b""
            stuffing = room - 1 - len(field) - len(payload)
            assert stuffing >= 0
            if field == b"" and stuffing > 0:
                field = b"\x00"  # flags byte, all clear
                stuffing -= 1
            adaptation = bytes([len(field) + stuffing]) + field + b"\xff" * stuffing
            control |= 0x20
        assert len(adaptation) + len(payload) == room, "payload does not fill the packet"
        number = self.cc if cc is None else cc
        if payload:
            self.cc = (number + 1) & 0x0F
        head = bytes([0x47, (0x40 if start else 0) | self.pid >> 8, self.pid & 0xFF, control | number])
        return head + adaptation + payload

    def pes(self, data: bytes, *, first_field: bytes | None = None) -> bytes:
        """A PES as FFmpeg's muxer writes it: full packets, the last one stuffed."""
        out = b""
        start = True
        while data:
            field = first_field if start else None
            room = 184 - (1 + len(field) if field is not None else 0)
            chunk, data = data[:room], data[room:]
            out += self.packet(chunk, start=start, field=field)
            start = False
        return out


PCR = b"\x10" + bytes(6)  # flags: PCR, and its 6 bytes
PCR_RAI = b"\x50" + bytes(6)


def au(size: int, seed: int) -> bytes:
    rng = random.Random(seed)
    return b"\x00\x00\x00\x01\x09\xf0" + rng.randbytes(size - 6)


def fed_packetwise(data: bytes) -> list[tuple[int, AccessUnit | Damage]]:
    splitter = VideoSplitter()
    out: list[tuple[int, AccessUnit | Damage]] = []
    for offset in range(0, len(data), PACKET):
        out += [(offset + PACKET, e) for e in splitter.feed(data[offset : offset + PACKET])]
    out += [(len(data), e) for e in splitter.end()]
    return out


def test_an_adaptation_field_without_stuffing_does_not_end_a_pes() -> None:
    mux = Muxer()
    first = pes_bytes(au(600, 1), 90_000)
    # The PES's first packet has PCR and random_access_indicator, a middle one a PCR of its own, a
    # PCR-only packet (no payload, the rest stuffed) comes mid-PES; the last packet is stuffed.
    body = mux.packet(first[:176], start=True, field=PCR_RAI)
    body += mux.packet(first[176:352], field=PCR)
    body += mux.packet(b"", field=PCR)
    body += mux.packet(first[352:536])
    body += mux.packet(first[536:])
    second = pes_bytes(au(100, 2), 93_000)
    body += mux.packet(second, start=True, field=PCR)  # all in one packet: PCR, then stuffing
    data = program() + body
    out = fed_packetwise(data)
    assert [(fed, e.rule, e.pts, e.random_access) for fed, e in out if isinstance(e, AccessUnit)] == [
        (len(data) - PACKET, "stuffing", 90_000, True),
        (len(data), "stuffing", 93_000, False),
    ]
    assert [e.data for _, e in out if isinstance(e, AccessUnit)] == [first[14:], second[14:]]


@pytest.mark.parametrize("padding", [1, 2, 3, 100])
def test_any_padding_ends_a_pes(padding: int) -> None:
    """1 byte: an adaptation field of length 0; 2: length 1 and all flags clear (FFmpeg); more:
    stuffing bytes."""
    mux = Muxer()
    unit = pes_bytes(au(184 * 3 - padding - 14, 3), 90_000)
    assert len(unit) == 184 * 3 - padding
    data = program() + mux.pes(unit)
    assert data[-PACKET + 4] == padding - 1  # adaptation_field_length of the last packet
    (fed, event), *rest = fed_packetwise(data)
    assert not rest and isinstance(event, AccessUnit)
    assert fed == len(data) and event.rule == "stuffing" and event.data == unit[14:]


def test_a_full_last_packet_waits_for_the_next_pes() -> None:
    mux = Muxer()
    exact = pes_bytes(au(184 * 2 - 14, 4), 90_000)  # fills its two packets: nothing to stuff
    later = pes_bytes(au(300, 5), 93_000, 90_000)
    data = program() + mux.pes(exact) + mux.pes(later)
    events = fed_packetwise(data)
    assert [(fed, e.rule, e.pts, e.dts) for fed, e in events if isinstance(e, AccessUnit)] == [
        (len(program()) + 3 * PACKET, "next", 90_000, 90_000),  # the next PES's first packet
        (len(data), "stuffing", 93_000, 90_000),
    ]


def test_pes_packet_length_ends_a_pes_without_stuffing() -> None:
    mux = Muxer()
    exact = pes_bytes(au(184 * 2 - 14, 6), 90_000, length=True)
    data = program() + mux.pes(exact)
    ((fed, event),) = fed_packetwise(data)
    assert isinstance(event, AccessUnit) and (fed, event.rule) == (len(data), "length")


def test_stuffing_before_the_end_is_caught_and_then_not_trusted() -> None:
    """A muxer that stuffs a packet in the middle of a PES: the cut-short unit is reported, and
    from then on PESs end at the next PES's start."""
    mux = Muxer()
    first = pes_bytes(au(500, 7), 90_000)
    odd = mux.packet(first[:150], start=True) + mux.packet(first[150:334]) + mux.packet(first[334:])
    data = program() + odd + mux.pes(pes_bytes(au(400, 8), 93_000)) + mux.pes(pes_bytes(au(400, 9), 96_000))
    splitter, events = split(data, PACKET)
    kinds = [(type(e).__name__, getattr(e, "rule", None)) for e in events]
    assert kinds == [
        ("AccessUnit", "stuffing"),  # the first 136 bytes, sent on as if they were the unit
        ("Damage", None),
        ("AccessUnit", "next"),
        ("AccessUnit", "end"),
    ]
    assert splitter.stats.false_ends == 1 and not splitter.trust_stuffing


def test_damage_drops_the_pes_and_the_stream_goes_on() -> None:
    mux = Muxer()
    good = [pes_bytes(au(600, seed), 90_000 + 3000 * seed) for seed in range(7)]
    streams = [mux.pes(unit) for unit in good]
    lost = streams[1][: 2 * PACKET] + streams[1][3 * PACKET :]  # a packet lost mid-PES
    broken = bytearray(streams[3])
    broken[PACKET + 1] |= 0x80  # transport_error_indicator
    headless = streams[5][PACKET:]  # its first packet lost: the rest continues no PES
    data = program() + streams[0] + lost + streams[2] + bytes(broken) + streams[4] + headless + streams[6]
    splitter, events = split(data, 1000)
    kept = [(90_000 + 3000 * index, good[index][14:]) for index in (0, 2, 4, 6)]
    assert [(e.pts, e.data) for e in units(events)] == kept
    assert [e.reason for e in events if isinstance(e, Damage)] == [
        "continuity gap",
        "transport error",
        "PES continued without its start",
    ]
    assert splitter.stats.damaged == 3


def test_a_duplicate_packet_is_skipped_and_a_counter_restart_is_not_one() -> None:
    mux = Muxer()
    unit = pes_bytes(au(600, 10), 90_000)
    packets = mux.pes(unit)
    twice = packets[: 2 * PACKET] + packets[PACKET : 2 * PACKET] + packets[2 * PACKET :]
    # The next segment's muxer starts its counters again: the same counter, but another packet.
    restarted = Muxer()
    restarted.cc = (mux.cc - 1) & 0x0F
    other = pes_bytes(au(600, 11), 93_000)
    splitter, events = split(program() + twice + program() + restarted.pes(other), PACKET)
    assert [(e.pts, e.data) for e in units(events)] == [(90_000, unit[14:]), (93_000, other[14:])]
    assert splitter.stats.damaged == 0


def test_sync_lost_and_found_again() -> None:
    mux = Muxer()
    good = [mux.pes(pes_bytes(au(700, seed), 90_000 + 3000 * seed)) for seed in range(5)]
    # A PES cut off mid-packet, then the stream goes on; a run of garbage in the middle of a PES.
    cut = good[1][: 2 * PACKET + 77]
    garbage = random.Random(1).randbytes(1000).replace(b"\x47", b"\x46")
    spoiled = good[3][: 2 * PACKET] + garbage + good[3][2 * PACKET :]
    data = program() + good[0] + cut + good[2] + spoiled + good[4]
    for step in (PACKET, 1000, len(data)):
        splitter, events = split(data, step)
        assert [e.pts for e in units(events)] == [90_000, 96_000, 102_000], step
        assert [e.reason for e in events if isinstance(e, Damage)] == ["TS sync lost"] * 2
        assert splitter.stats.sync_losses == 2
        assert splitter.stats.skipped_bytes >= 1000


@pytest.mark.parametrize("seed", range(20))
def test_random_damage_never_raises(seed: int) -> None:
    rng = random.Random(seed)
    data = bytearray(make_clip(CLIPS[1]).segments[1])
    for _ in range(rng.randrange(1, 40)):
        kind = rng.randrange(3)
        at = rng.randrange(len(data))
        if kind == 0:
            data[at] ^= 1 << rng.randrange(8)
        elif kind == 1:
            del data[at : at + rng.randrange(1, 400)]
        else:
            data[at:at] = rng.randbytes(rng.randrange(1, 400))
    splitter, events = split(bytes(data), rng.choice([188, 700, 65536]))
    assert splitter.stats.units == len(units(events))
    assert all(u.data for u in units(events))


def test_program_other_than_h264_gives_no_units() -> None:
    mux = Muxer()
    data = program(stream_type=0x24) + mux.pes(pes_bytes(au(300, 12), 90_000))  # HEVC
    splitter, events = split(data, PACKET)
    assert events == []
    assert splitter.program is not None and splitter.program.video_type == 0x24
    assert not splitter.program.h264 and splitter.program.others == ()
    with_audio = VideoSplitter()
    with_audio.feed(program(audio=True))
    assert with_audio.program is not None and with_audio.program.others == ((VIDEO_PID + 1, 0x0F),)


def test_a_pmt_with_a_bad_crc_is_ignored() -> None:
    damaged = bytearray(program())
    damaged[PACKET + 20] ^= 0x01
    splitter = VideoSplitter()
    splitter.feed(bytes(damaged))
    assert splitter.program is None


@pytest.mark.parametrize(
    ("first", "step"),
    [
        (2 * 3600 * 90_000, 5 * 3600 * 90_000),  # wrapped values are moved up by 2^33 (not all)
        (WRAP - 120 * 90_000, 30 * 90_000),  # the same
        (WRAP - 30 * 90_000, 30 * 90_000),  # so close to the wrap that earlier values move down
    ],
)
def test_timestamps_wrap_as_libavformat_wraps_them(first: int, step: int) -> None:
    """33-bit timestamps across the wrap, corrected (or not) exactly as libavformat does: the video
    stays on the line of the audio, which libavformat demuxes."""
    mux = Muxer()
    stamps = [(first + index * step) % WRAP for index in range(6)]
    assert stamps != sorted(stamps)  # it wraps
    data = program()
    for index, value in enumerate(stamps):
        data += mux.pes(pes_bytes(au(300, 20 + index), value, (value - 3000) % WRAP))
    _, events = split(data, PACKET)
    expected = [(pts, dts) for _, pts, dts in libavformat_units(data)]
    assert [(u.pts, u.dts) for u in units(events)] == expected
    assert len(expected) == 6
    assert any(pts != raw for (pts, _), raw in zip(expected, stamps, strict=True))  # corrected somewhere
