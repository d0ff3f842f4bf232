"""Fuzzing what parses network bytes into access units: the VideoSplitter (MPEG-TS) and the H.264
inspection run on what it cuts out (h264: Qualifier, ParameterSets, sps_in, with_frame_rate).

Whatever the bytes, in pieces of any size: nothing raises but the documented ValueError of
parse_sps and slice_type, and what the splitter holds between feeds stays within MAX_HELD. The
bounded runs are part of `make test`; the long ones are marked slow (`make soak`).
"""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from relay_server.media.h264 import (
    NAL_SPS,
    ParameterSets,
    Qualifier,
    declared_frame_rate,
    is_idr,
    nal_units,
    parse_sps,
    slice_type,
    sps_in,
    with_frame_rate,
)
from relay_server.media.tsvideo import MAX_HELD, MAX_PES, PACKET, AccessUnit, Damage, VideoSplitter
from tests.media.clips import ClipSpec, make_clip
from tests.media.test_tsvideo import PMT_PID, VIDEO_PID, Muxer, au, pes_bytes, program, psi_packet, section

# No example database: nothing is written into the working tree.
UNTIMED = {"deadline": None, "database": None, "suppress_health_check": [HealthCheck.too_slow]}
BOUNDED = settings(max_examples=150, **UNTIMED)
LONG = settings(max_examples=5000, **UNTIMED)
# A small clip with B-frames and audio: every kind of packet a real input has.
CLIP = ClipSpec(128, 128, fps=30, frames=12, gop=6, b_frames=2, audio="aac")
# A PAT that points at a new PMT PID each time, each followed by the start of a PMT section that
# never completes.
WANDERING_PMT = b"".join(
    psi_packet(0, section(0x00, (1).to_bytes(2, "big") + (0xE000 | pid).to_bytes(2, "big")), cc=pid & 0x0F)
    + psi_packet(pid, b"\x02\xb3\xff" + bytes(180))  # section_length 1023: it needs more packets
    for pid in range(0x20, 0x60)
)


def clip() -> bytes:
    return make_clip(CLIP).data


def split_checked(data: bytes, cuts: list[int]) -> list[AccessUnit | Damage]:
    """`data` fed in the pieces `cuts` makes of it, checking the splitter's bound after each."""
    splitter = VideoSplitter()
    events: list[AccessUnit | Damage] = []
    last = 0
    for cut in [*sorted(cut % (len(data) + 1) for cut in cuts), len(data)]:
        events += splitter.feed(data[last:cut])
        last = cut
        assert splitter.held_bytes <= MAX_HELD
        assert len(splitter._rest) <= PACKET and len(splitter._last) <= PACKET
        assert len(splitter._sections) <= 2 and len(splitter._last_sections) <= 2  # PAT and PMT
    events += splitter.end()
    units = [event for event in events if isinstance(event, AccessUnit)]
    assert splitter.stats.units == len(units) and all(unit.data for unit in units)
    assert [event.end for event in events] == sorted(event.end for event in events)
    assert all(0 < event.end <= len(data) for event in events)
    for unit in units:
        inspect(unit.data, unit.pts, unit.dts)
    return events


def inspect(data: bytes, pts: int | None = None, dts: int | None = None) -> None:
    """What the session runs on an access unit; only parse_sps and slice_type may raise ValueError."""
    Qualifier(128, 128).check(data, pts, dts)
    assert len(ParameterSets().complete(data)) >= len(data)
    is_idr(data)
    sps_in(data)
    declared_frame_rate(data)
    retimed = with_frame_rate(data, Fraction(30))
    assert sps_in(retimed) is None or sps_in(retimed).frame_rate == Fraction(30)  # type: ignore[union-attr]
    for kind, nal in nal_units(data):
        try:
            if kind == NAL_SPS:
                parse_sps(nal)
            elif 1 <= kind <= 5:
                slice_type(nal)
        except ValueError:
            pass


cuts = st.lists(st.integers(min_value=0, max_value=1 << 20), max_size=12)


@st.composite
def damaged_clip(draw: st.DrawFn) -> bytes:
    """The clip with bit flips, deletions, insertions and a truncation at random places."""
    data = bytearray(clip())
    for _ in range(draw(st.integers(0, 12))):
        at = draw(st.integers(0, len(data) - 1))
        kind = draw(st.sampled_from(["flip", "delete", "insert", "sync"]))
        if kind == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 400))]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=400))
        else:
            data[at] = 0x47  # a false sync byte
        if not data:
            break
    return bytes(data[: draw(st.integers(0, len(data)))])


@st.composite
def ts_packets(draw: st.DrawFn) -> bytes:
    """TS packets with a sync byte, on the PIDs the splitter reads (PAT, PMT, video) or another,
    with random headers, adaptation fields and payloads: past the sync check, into every branch."""
    out = bytearray(program(audio=draw(st.booleans())))
    for _ in range(draw(st.integers(1, 40))):
        pid = draw(st.sampled_from([0, PMT_PID, VIDEO_PID, VIDEO_PID, VIDEO_PID, 0x1FFF]))
        flags = draw(st.integers(0, 7)) << 5
        control = draw(st.integers(0, 255))
        body = draw(st.binary(min_size=184, max_size=184))
        if draw(st.booleans()):  # a PES header at the payload's start
            body = (pes_bytes(b"\x00\x00\x01\x09\xf0", draw(st.integers(0, (1 << 33) - 1))) + body)[:184]
        out += bytes([0x47, flags | pid >> 8, pid & 0xFF, control]) + body
    return bytes(out)


@given(data=st.binary(max_size=6000), cuts=cuts)
@BOUNDED
def test_arbitrary_bytes(data: bytes, cuts: list[int]) -> None:
    split_checked(data, cuts)


@given(data=damaged_clip(), cuts=cuts)
@BOUNDED
def test_a_damaged_stream(data: bytes, cuts: list[int]) -> None:
    split_checked(data, cuts)


@given(data=ts_packets(), cuts=cuts)
@example(data=WANDERING_PMT, cuts=[])  # the sections of every PMT PID once pointed at were kept
@BOUNDED
def test_random_ts_packets(data: bytes, cuts: list[int]) -> None:
    split_checked(data, cuts)


@given(nals=st.lists(st.tuples(st.integers(0, 31), st.binary(max_size=60)), max_size=8))
@example(nals=[(7, b"")])  # with_frame_rate raised on an SPS that does not parse
@example(nals=[(7, b"\x00\x00\x02")])
@BOUNDED
def test_random_nal_units(nals: list[tuple[int, bytes]]) -> None:
    inspect(b"".join(b"\x00\x00\x00\x01" + bytes([0x60 | kind]) + body for kind, body in nals))


def test_an_endless_pes_is_dropped_at_its_bound() -> None:
    """A PES of unknown length that packets keep continuing: dropped once past MAX_PES, and what
    follows is split as usual."""
    mux = Muxer()
    head = pes_bytes(au(170, 1), 90_000)
    endless = mux.packet(head, start=True) + b"".join(
        mux.packet(bytes(184)) for _ in range(MAX_PES // 184 + 2)
    )
    after = mux.pes(pes_bytes(au(300, 2), 93_000))
    events = split_checked(program() + endless + after, list(range(0, len(endless), 1 << 20)))
    assert [getattr(e, "reason", None) for e in events] == [f"PES over {MAX_PES} bytes", None]
    assert [e.pts for e in events if isinstance(e, AccessUnit)] == [93_000]


@pytest.mark.slow
@given(data=st.one_of(st.binary(max_size=20000), damaged_clip(), ts_packets()), cuts=cuts)
@LONG
def test_long_fuzz(data: bytes, cuts: list[int]) -> None:
    split_checked(data, cuts)


@pytest.mark.slow
@given(nals=st.lists(st.tuples(st.integers(0, 31), st.binary(max_size=200)), max_size=16))
@LONG
def test_long_nal_fuzz(nals: list[tuple[int, bytes]]) -> None:
    inspect(b"".join(b"\x00\x00\x00\x01" + bytes([0x60 | kind]) + body for kind, body in nals))
