"""h264: NAL scanning, SPS and slice headers, parameter-set completion and the passthrough Qualifier, on
streams libx264 encodes here (Annex B, SPS/PPS in-band at every IDR)."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from functools import cache

import av
import pytest
from av.video.frame import PictureType

from relay_server.media.h264 import (
    NAL_AUD,
    NAL_IDR,
    NAL_PPS,
    NAL_SEI,
    NAL_SLICE,
    NAL_SPS,
    SLICE_B,
    SLICE_I,
    SLICE_P,
    ParameterSets,
    Qualifier,
    Verdict,
    declared_frame_rate,
    is_idr,
    nal_units,
    parse_sps,
    slice_type,
    with_frame_rate,
)
from relay_server.media.tsvideo import AccessUnit, VideoSplitter
from tests.media.clips import ClipSpec, make_clip, pattern, read_index

# No B-frames, one profile each: x264 picks the profile its tools need, up to `profile`.
BASELINE = {"profile": "baseline", "preset": "ultrafast", "tune": "zerolatency"}
MAIN = {"profile": "main", "preset": "fast", "tune": "zerolatency"}
HIGH = {"preset": "fast", "tune": "zerolatency"}
# Two B-frames between every two P-frames (b-adapt=0: whatever the content).
B_FRAMES = {"profile": "main", "preset": "medium", "bf": "2", "x264-params": "b-adapt=0"}


@dataclass(frozen=True)
class Unit:
    data: bytes
    pts: int | None
    dts: int | None
    keyframe: bool


def encode(
    width: int = 512,
    height: int = 512,
    pix_fmt: str = "yuv420p",
    frames: int = 8,
    gop: int = 250,
    **options: str,
) -> tuple[Unit, ...]:
    """Access units of a clip libx264 encodes with `options`, in decode order."""
    return _encode(width, height, pix_fmt, frames, gop, tuple(sorted(options.items())))


@cache
def _encode(
    width: int, height: int, pix_fmt: str, frames: int, gop: int, options: tuple[tuple[str, str], ...]
) -> tuple[Unit, ...]:
    context = av.CodecContext.create("libx264", "w")
    context.width, context.height, context.pix_fmt = width, height, pix_fmt
    context.time_base, context.framerate, context.gop_size = Fraction(1, 30), Fraction(30), gop
    # One slice per picture and keyframes only where `gop` puts them, unless `options` say otherwise.
    context.options = {"threads": "1", "sc_threshold": "0", **dict(options)}
    packets = []
    for index in range(frames):
        frame = pattern(width, height, index, detail=True)
        if pix_fmt != "yuv420p":
            frame = frame.reformat(format=pix_fmt)
        frame.pts = index
        packets += context.encode(frame)
    packets += context.encode(None)
    return tuple(Unit(bytes(p), p.pts, p.dts, p.is_keyframe) for p in packets)


def sps_of(unit: Unit) -> bytes:
    return next(nal for kind, nal in nal_units(unit.data) if kind == NAL_SPS)


def annex_b(nals: list[bytes]) -> bytes:
    return b"".join(b"\x00\x00\x00\x01" + nal for nal in nals)


def without(data: bytes, *kinds: int) -> bytes:
    """A real access unit with its NAL units of `kinds` left out."""
    return annex_b([nal for kind, nal in nal_units(data) if kind not in kinds])


def decode(units: list[bytes]) -> list[av.VideoFrame]:
    """Every frame a fresh libavcodec H.264 decoder makes of `units`."""
    decoder = av.CodecContext.create("h264", "r")
    frames = []
    for data in units:
        frames += decoder.decode(av.Packet(data))
    return frames + decoder.decode(None)


# NAL units


def test_nal_units_of_an_idr_with_both_start_code_lengths() -> None:
    data = encode(**BASELINE, **{"x264-params": "slices=2"}, frames=1)[0].data
    # x264 writes 4-byte start codes before SPS and PPS, 3-byte ones before the SEI and slices.
    assert data.startswith(b"\x00\x00\x00\x01\x67") and b"\x00\x00\x00\x01\x65" not in data
    nals = nal_units(data)
    assert [kind for kind, _ in nals] == [NAL_SPS, NAL_PPS, NAL_SEI, NAL_IDR, NAL_IDR]
    assert all(kind == nal[0] & 0x1F for kind, nal in nals)
    assert sum(len(nal) for _, nal in nals) == len(data) - 2 * 4 - 3 * 3
    assert data.endswith(nals[-1][1]) and nals[3][1] + b"\x00\x00\x01" + nals[4][1] in data
    # The same NAL units whatever the start codes' length.
    short = data.replace(b"\x00\x00\x00\x01", b"\x00\x00\x01")
    assert nal_units(short) == nal_units(data.replace(b"\x00\x00\x01", b"\x00\x00\x00\x01")) == nals
    assert nal_units(annex_b([nal for _, nal in nals])) == nals


def test_nal_units_drop_trailing_zero_bytes_and_empty_units() -> None:
    nals = nal_units(encode(**BASELINE)[0].data)
    padded = b"\x00\x00\x01".join([b"", *(nal + b"\x00\x00" for _, nal in nals)]) + b"\x00\x00\x01"
    assert nal_units(padded) == nals
    assert nal_units(b"") == nal_units(b"\x00\x00\x00") == []


def test_is_idr_follows_the_encoders_keyframes() -> None:
    units = encode(**BASELINE, frames=10, gop=4)
    assert [is_idr(unit.data) for unit in units] == [unit.keyframe for unit in units]
    assert [index for index, unit in enumerate(units) if unit.keyframe] == [0, 4, 8]
    assert not is_idr(without(units[0].data, NAL_IDR))  # parameter sets alone


# SPS


def test_sps_of_constrained_baseline() -> None:
    nal = sps_of(encode(**BASELINE, level="3.1")[0])
    sps = parse_sps(nal)
    assert (sps.profile_idc, sps.level_idc, sps.sps_id) == (66, 31, 0)
    assert sps.constraint_flags & 0xC0 == 0xC0  # constraint_set0 and 1: Constrained Baseline
    assert sps.profile_name == "Constrained Baseline"
    assert (sps.width, sps.height, sps.chroma_format_idc, sps.bit_depth) == (512, 512, 1, 8)
    assert sps.frame_mbs_only
    # Without B-frames x264 numbers pictures by decode order: POC type 2, nothing to reorder.
    assert sps.pic_order_cnt_type == 2 and sps.max_num_reorder_frames == 0
    assert sps.reorders is False
    # Without constraint_set1 (any Main decoder can decode it) it is plain Baseline: FMO, ASO allowed.
    assert parse_sps(nal[:2] + bytes([nal[2] & ~0x40]) + nal[3:]).profile_name == "Baseline"


def test_sps_of_high_720p_is_cropped() -> None:
    sps = parse_sps(sps_of(encode(1280, 720, **HIGH)[0]))
    assert (sps.profile_idc, sps.profile_name) == (100, "High")
    assert (sps.width, sps.height) == (1280, 720)  # coded as 80x46 macroblocks: 1280x736


def test_sps_of_main_at_an_odd_size_with_b_frames() -> None:
    sps = parse_sps(sps_of(encode(642, 362, **B_FRAMES)[0]))
    assert (sps.profile_idc, sps.profile_name, sps.constraint_flags & 0x40) == (77, "Main", 0x40)
    assert (sps.width, sps.height) == (642, 362)
    assert sps.pic_order_cnt_type == 0
    assert sps.max_num_reorder_frames == 2  # two B-frames wait for the P-frame after them
    assert sps.reorders is None


def test_sps_vui_with_every_optional_part() -> None:
    plain = sps_of(encode(**HIGH)[0])
    params = (
        "sar=64:45:overscan=show:videoformat=pal:fullrange=on:colorprim=bt709:transfer=bt709"
        ":colormatrix=bt709:chromaloc=1:nal-hrd=vbr:bitrate=1000:vbv-maxrate=1200:vbv-bufsize=1000"
    )
    nal = sps_of(encode(**HIGH, **{"x264-params": params})[0])
    assert len(nal) > len(plain) + 15  # Extended_SAR, overscan, colours, chroma location, NAL HRD
    # bitstream_restriction comes last in the VUI, after all of them, and the SPS must end right there.
    assert parse_sps(nal) == parse_sps(plain)


def test_sps_with_emulation_prevention() -> None:
    nal = sps_of(encode(**BASELINE)[0])
    # timing_info's num_units_in_tick (1) and time_scale (60) as 32 bits each: zeros that need escaping.
    assert nal.count(b"\x00\x00\x03") == 2
    sps = parse_sps(nal)
    assert (sps.width, sps.height, sps.max_num_reorder_frames) == (512, 512, 0)
    with pytest.raises(ValueError, match="SPS invalid"):  # a byte more after each: the VUI shifts
        parse_sps(nal.replace(b"\x00\x00\x03", b"\x00\x00\x03\x03"))


@pytest.mark.parametrize(
    ("pix_fmt", "profile", "name", "chroma", "depth"),
    [
        ("yuv422p", 122, "High 4:2:2", 2, 8),
        ("yuv444p", 244, "High 4:4:4 Predictive", 3, 8),
        ("yuv420p10le", 110, "High 10", 1, 10),
    ],
)
def test_sps_of_high_profiles(pix_fmt: str, profile: int, name: str, chroma: int, depth: int) -> None:
    sps = parse_sps(sps_of(encode_or_skip(642, 362, pix_fmt)[0]))
    assert (sps.profile_idc, sps.profile_name) == (profile, name)
    assert (sps.chroma_format_idc, sps.bit_depth) == (chroma, depth)
    assert (sps.width, sps.height) == (642, 362)  # the crop unit follows the chroma format


def encode_or_skip(width: int, height: int, pix_fmt: str) -> tuple[Unit, ...]:
    try:
        return encode(width, height, pix_fmt)
    except av.error.FFmpegError as error:
        pytest.skip(f"this libx264 does not encode {pix_fmt}: {error}")


def test_sps_of_interlaced_coding() -> None:
    # x264 codes fields of 4:2:0 in heights that are multiples of 4.
    sps = parse_sps(sps_of(encode(642, 364, **HIGH, **{"x264-params": "tff=1"})[0]))
    assert not sps.frame_mbs_only
    # 12 map units of 2 macroblock rows: 384 lines, less 10 of each field.
    assert (sps.width, sps.height) == (642, 364)


def test_truncated_or_foreign_sps_raises() -> None:
    nal = sps_of(encode(**HIGH)[0])
    for end in range(1, len(nal)):
        with pytest.raises(ValueError, match="SPS truncated"):
            parse_sps(nal[:end])
    with pytest.raises(ValueError, match=r"not an SPS NAL unit \(type 8\)"):
        parse_sps(next(nal for kind, nal in nal_units(encode(**HIGH)[0].data) if kind == NAL_PPS))
    with pytest.raises(ValueError, match="bits left at its end"):
        parse_sps(nal + b"\x80")


# Scaling matrices. x264 writes its CQMs in the PPS, never in the SPS, so these rewrite x264's SPS
# with seq_scaling_matrix_present_flag set; libavcodec decoding the stream with it proves it valid.

FLAT_4X4, FLAT_8X8 = [8] + [0] * 15, [8] + [0] * 63  # deltas from 8: every scale 16
FLAT_SHORT = [8, -16]  # 16, then a scale of 0: the rest repeat the last


def ue(value: int) -> str:
    code = bin(value + 1)[2:]
    return "0" * (len(code) - 1) + code


def se(value: int) -> str:
    return ue(2 * value - 1 if value > 0 else -2 * value)


def with_scaling_lists(nal: bytes, lists: list[list[int] | None]) -> bytes:
    """x264's High SPS `nal` with `lists` (delta_scale values; None: not present) in it."""
    rbsp = nal[1:].replace(b"\x00\x00\x03", b"\x00\x00")
    bits = bin(int.from_bytes(b"\x01" + rbsp, "big"))[3:]
    at = 24  # past profile_idc, constraint flags, level_idc

    def skip_ue() -> int:
        nonlocal at
        one = bits.index("1", at)
        value, at = int(bits[one : 2 * one - at + 1], 2) - 1, 2 * one - at + 1
        return value

    skip_ue()  # seq_parameter_set_id
    if skip_ue() == 3:  # chroma_format_idc 4:4:4: separate_colour_plane_flag
        at += 1
    skip_ue()  # bit_depth_luma_minus8
    skip_ue()  # bit_depth_chroma_minus8
    assert bits[at : at + 2] == "00"  # qpprime_y_zero_transform_bypass_flag, seq_scaling_matrix_present
    matrices = "".join("0" if deltas is None else "1" + "".join(map(se, deltas)) for deltas in lists)
    body = bits[at + 2 :].rstrip("0")  # ends with rbsp_stop_one_bit
    written = bits[:at] + "01" + matrices + body
    written += "0" * (-len(written) % 8)
    raw = int(written, 2).to_bytes(len(written) // 8, "big")
    escaped = bytearray(nal[:1])
    for byte in raw:
        if escaped[-2:] == b"\x00\x00" and byte <= 3:
            escaped.append(3)
        escaped.append(byte)
    return bytes(escaped)


def with_sps(units: tuple[Unit, ...], nal: bytes) -> list[bytes]:
    return [
        annex_b([nal if kind == NAL_SPS else other for kind, other in nal_units(unit.data)]) for unit in units
    ]


def test_sps_with_flat_scaling_lists_decodes_as_without() -> None:
    units = encode(**HIGH, frames=4)
    original = sps_of(units[0])
    lists: list[list[int] | None] = [FLAT_4X4, FLAT_SHORT] * 3 + [FLAT_8X8, FLAT_SHORT]
    nal = with_scaling_lists(original, lists)
    assert len(nal) > len(original) + 20
    assert parse_sps(nal) == parse_sps(original)
    # Flat 16s scale as no matrix at all: the decoder, reading them where the parser skipped them,
    # must give the very same pictures.
    expected = [frame.to_ndarray() for frame in decode([unit.data for unit in units])]
    got = [frame.to_ndarray() for frame in decode(with_sps(units, nal))]
    assert len(got) == len(expected) == 4
    assert all((a == b).all() for a, b in zip(got, expected, strict=True))


@pytest.mark.parametrize("pix_fmt", ["yuv420p", "yuv444p"])
def test_sps_with_scaling_lists_of_every_kind(pix_fmt: str) -> None:
    units = encode(642, 362, pix_fmt, frames=2, **HIGH)
    count = 12 if pix_fmt == "yuv444p" else 8
    # Not present, the default (a first scale of 0), partial and full lists of varied scales.
    varied = [None, [-8], [4, -3, 7, 0, 1, -2, -6, 3, -12], [3] * 15 + [-40], None, [-2, 5, -11]]
    varied += [[-8], [1, -1] * 32, *[[6, 2, -16], None, [2] * 64, [-8]][: count - 8]]
    original = sps_of(units[0])
    nal = with_scaling_lists(original, varied)
    assert parse_sps(nal) == parse_sps(original)
    frames = decode(with_sps(units, nal))
    assert [(frame.width, frame.height) for frame in frames] == [(642, 362)] * 2
    # The decoder used them: the pictures differ from what the encoder meant.
    assert not (frames[0].to_ndarray() == decode([units[0].data])[0].to_ndarray()).all()


# Slice headers


def test_slice_types_agree_with_the_decoder() -> None:
    units = encode(**B_FRAMES, frames=12)
    types = [
        {slice_type(nal) for kind, nal in nal_units(unit.data) if kind in (NAL_SLICE, NAL_IDR)}
        for unit in units
    ]
    by_pts = {unit.pts: kinds for unit, kinds in zip(units, types, strict=True)}
    expected = {PictureType.I: {SLICE_I}, PictureType.P: {SLICE_P}, PictureType.B: {SLICE_B}}
    frames = decode([unit.data for unit in units])
    assert [by_pts[read_index(frame)] for frame in frames] == [expected[frame.pict_type] for frame in frames]
    assert {SLICE_I} == types[0] and {SLICE_P} in types and {SLICE_B} in types


def test_slice_type_of_what_is_no_slice_raises() -> None:
    nals = nal_units(encode(**BASELINE)[0].data)
    sps, idr = nals[0][1], nals[-1][1]
    assert slice_type(idr) == SLICE_I
    with pytest.raises(ValueError, match=r"not a slice NAL unit \(type 7\)"):
        slice_type(sps)
    with pytest.raises(ValueError, match="slice header truncated"):
        slice_type(idr[:1])


# ParameterSets


def test_parameter_sets_complete_an_idr_that_lacks_them() -> None:
    units = encode(**HIGH, frames=10, gop=4)
    # As from a source that sends them once: the IDRs at 4 and 8 lose theirs.
    stream = [units[0].data] + [without(unit.data, NAL_SPS, NAL_PPS) for unit in units[1:]]
    with pytest.raises(av.error.InvalidDataError):  # joining at the second IDR: nothing to decode with
        decode(stream[4:])
    sets = ParameterSets()
    completed = [sets.complete(data) for data in stream]
    assert sets.inserted == 2
    assert nal_units(completed[4]) == nal_units(units[4].data)  # x264 repeats the same SPS and PPS
    assert nal_units(completed[8]) == nal_units(units[8].data)
    assert all(completed[i] is stream[i] for i in (0, 1, 2, 3, 5, 6, 7, 9))
    frames = decode(completed[4:])
    assert [read_index(frame) for frame in frames] == [4, 5, 6, 7, 8, 9]


def test_parameter_sets_go_after_the_aud_and_keep_sps_before_pps() -> None:
    data = encode(**BASELINE, **{"x264-params": "aud=1"}, frames=1)[0].data
    assert [kind for kind, _ in nal_units(data)][:3] == [NAL_AUD, NAL_SPS, NAL_PPS]
    # Both missing; the SPS only (it goes before the unit's own PPS); the PPS only (after its SPS).
    for missing in [(NAL_SPS, NAL_PPS), (NAL_SPS,), (NAL_PPS,)]:
        sets = ParameterSets()
        sets.complete(data)
        completed = sets.complete(without(data, *missing))
        assert nal_units(completed) == nal_units(data)
        assert sets.inserted == 1
        assert read_index(decode([completed])[0]) == 0


def test_parameter_sets_leave_complete_units_alone() -> None:
    units = encode(**HIGH, frames=6, gop=3)
    sets = ParameterSets()
    for unit in units:
        assert sets.complete(unit.data) is unit.data
    assert sets.inserted == 0
    # Nothing to insert before a stream's first SPS and PPS.
    bare = without(units[0].data, NAL_SPS, NAL_PPS)
    assert ParameterSets().complete(bare) is bare


# Qualifier


def verdicts(
    qualifier: Qualifier, units: list[Unit] | tuple[Unit, ...], timestamps: bool = True
) -> dict[int, Verdict]:
    """{index of the access unit: the verdict it brought}."""
    return {
        index: verdict
        for index, unit in enumerate(units)
        if (verdict := qualifier.check(unit.data, *((unit.pts, unit.dts) if timestamps else (None, None))))
        is not None
    }


@pytest.mark.parametrize(
    ("options", "name"), [(BASELINE, "Constrained Baseline"), (MAIN, "Main"), (HIGH, "High")]
)
def test_qualifies_without_b_frames_at_the_session_size(options: dict[str, str], name: str) -> None:
    qualifier = Qualifier(642, 362)
    units = encode(642, 362, frames=10, gop=4, **options)
    assert verdicts(qualifier, units) == {0: Verdict(True, f"H.264 {name} 642x362, no B-frames")}
    assert qualifier.verdict == Verdict(True, f"H.264 {name} 642x362, no B-frames")


def test_refuses_b_frames_by_their_timestamps() -> None:
    units = encode(**B_FRAMES, frames=12)
    assert units[0].dts != units[0].pts
    assert verdicts(Qualifier(512, 512), units) == {0: Verdict(False, "B-frames")}


def test_refuses_b_frames_by_their_slices_at_once() -> None:
    units = encode(**B_FRAMES, frames=12, gop=6)
    first_b = next(i for i in range(1, len(units)) if units[i].pts < units[i - 1].pts)
    qualifier = Qualifier(512, 512)
    # Without timestamps, only a B slice tells: the IDR qualified, the first B-frame refuses (and the
    # next IDR, with the same SPS, changes nothing).
    assert verdicts(qualifier, units, timestamps=False) == {
        0: Verdict(True, "H.264 Main 512x512, no B-frames"),
        first_b: Verdict(False, "B-frames"),
    }
    assert sum(unit.keyframe for unit in units[first_b:]) > 0


def test_b_frames_keep_a_stream_out_until_it_is_reconfigured() -> None:
    qualifier = Qualifier(512, 512)
    verdicts(qualifier, encode(**B_FRAMES, frames=12, gop=6), timestamps=False)
    assert qualifier.verdict == Verdict(False, "B-frames")
    clean = encode(**MAIN, frames=6, gop=3)
    # The new SPS alone (no IDR yet) does not let the stream in: forwarding begins at an IDR only.
    assert qualifier.check(without(clean[0].data, NAL_SEI, NAL_IDR), None, None) is None
    assert qualifier.check(clean[1].data, None, None) is None
    assert qualifier.verdict == Verdict(False, "B-frames")
    assert verdicts(qualifier, clean) == {0: Verdict(True, "H.264 Main 512x512, no B-frames")}


def test_requalifies_only_at_an_idr() -> None:
    qualifier = Qualifier(512, 512)
    assert verdicts(qualifier, encode(1280, 720, **HIGH, frames=3)) == {
        0: Verdict(False, "1280x720 input, the session is 512x512")
    }
    fitting = encode(**HIGH, frames=8, gop=4)
    # Its SPS comes in an access unit of its own, then a P-frame: still out until the IDR at 4.
    stream = [Unit(without(fitting[0].data, NAL_SEI, NAL_IDR), None, None, False), *fitting[1:]]
    assert verdicts(qualifier, stream) == {4: Verdict(True, "H.264 High 512x512, no B-frames")}


def test_refuses_the_wrong_size_at_once() -> None:
    qualifier = Qualifier(512, 512)
    verdicts(qualifier, encode(**HIGH, frames=3))
    assert qualifier.verdict is not None and qualifier.verdict.passthrough
    # A new SPS of another size, in a unit with no IDR: the change against is made there.
    other = without(encode(640, 480, **HIGH, frames=1)[0].data, NAL_SEI, NAL_IDR)
    assert qualifier.check(other, None, None) == Verdict(False, "640x480 input, the session is 512x512")


@pytest.mark.parametrize(
    ("pix_fmt", "options", "reason"),
    [
        ("yuv422p", HIGH, "High 4:2:2 profile, 4:2:2 chroma"),
        ("yuv420p10le", HIGH, "High 10 profile, 10-bit"),
        ("yuv420p", HIGH | {"x264-params": "tff=1"}, "interlaced"),
    ],
)
def test_refuses_what_webrtc_does_not_take(pix_fmt: str, options: dict[str, str], reason: str) -> None:
    try:
        units = encode(512, 512, pix_fmt, frames=3, **options)
    except av.error.FFmpegError as error:
        pytest.skip(f"this libx264 does not encode {pix_fmt}: {error}")
    assert verdicts(Qualifier(512, 512), units) == {0: Verdict(False, reason)}


def test_no_verdict_before_an_sps_and_an_idr() -> None:
    units = encode(**HIGH, frames=8, gop=4)
    qualifier = Qualifier(512, 512)
    # Joined mid-GOP; then an IDR whose parameter sets were lost; the next IDR has them.
    stream = [*units[1:4], Unit(without(units[4].data, NAL_SPS, NAL_PPS), 4, 4, True), *units[5:], units[0]]
    assert verdicts(qualifier, stream) == {7: Verdict(True, "H.264 High 512x512, no B-frames")}
    # An SPS without an IDR is not enough either.
    qualifier = Qualifier(512, 512)
    assert qualifier.check(without(units[0].data, NAL_IDR), 0, 0) is None
    assert qualifier.check(units[1].data, 1, 1) is None and qualifier.verdict is None


def test_an_unreadable_sps_is_refused() -> None:
    data = encode(**HIGH, frames=1)[0].data
    nals = nal_units(data)
    truncated = annex_b([nal[:6] if kind == NAL_SPS else nal for kind, nal in nals])  # a corrupt SPS
    verdict = Qualifier(512, 512).check(truncated, 0, 0)
    assert verdict is not None and not verdict.passthrough
    assert verdict.reason.startswith("unreadable SPS: SPS truncated")


@pytest.mark.parametrize(
    ("b_frames", "expected"),
    [(0, Verdict(True, "H.264 Constrained Baseline 512x512, no B-frames")), (2, Verdict(False, "B-frames"))],
)
def test_qualifier_on_mpeg_ts_input(b_frames: int, expected: Verdict) -> None:
    """Access units and timestamps as the relay gets them: cut from MPEG-TS by the VideoSplitter."""
    splitter = VideoSplitter()
    units = [
        event
        for event in splitter.feed(make_clip(ClipSpec(b_frames=b_frames)).data) + splitter.end()
        if isinstance(event, AccessUnit)
    ]
    assert len(units) == 30
    qualifier = Qualifier(512, 512)
    changes = {i: v for i, unit in enumerate(units) if (v := qualifier.check(unit.data, unit.pts, unit.dts))}
    assert changes == {0: expected}


# -- the frame rate the output declares ------------------------------------------------------------


def decoded_rate(units: list[bytes]) -> tuple[Fraction | None, int]:
    """The frame rate FFmpeg's decoder takes from the stream's SPS, and the frames it decodes."""
    context = av.CodecContext.create("h264", "r")
    frames = 0
    for data in units:
        frames += len(context.decode(av.Packet(data)))
    frames += len(context.decode(None))
    return context.framerate, frames


@pytest.mark.parametrize("rate", [Fraction(60), Fraction(30000, 1001), Fraction(25)])
@pytest.mark.parametrize("options", [BASELINE, HIGH, B_FRAMES], ids=["baseline", "high", "b_frames"])
def test_every_sps_is_made_to_declare_the_rate(rate: Fraction, options: dict[str, str]) -> None:
    units = encode(frames=12, gop=4, **options)
    assert declared_frame_rate(units[0].data) == 30  # what x264 was told
    retimed = [with_frame_rate(unit.data, rate) for unit in units]
    for before, after in zip(units, retimed, strict=True):
        if NAL_SPS in {kind for kind, _ in nal_units(before.data)}:
            sps, again = parse_sps(sps_of(before)), parse_sps(sps_of(Unit(after, None, None, True)))
            assert again.frame_rate == rate == declared_frame_rate(after)
            assert again == type(sps)(**{**sps.__dict__, "frame_rate": rate})  # nothing else changed
        else:
            assert after is before.data  # nothing to change: the same bytes, not a copy
    assert decoded_rate(retimed) == (rate, 12)  # and the stream still decodes, every picture


def test_a_rate_already_declared_leaves_the_unit_as_it_is() -> None:
    unit = encode(**HIGH)[0]
    assert with_frame_rate(unit.data, Fraction(30)) is unit.data


def rbsp_bits(nal: bytes) -> str:
    return bin(int.from_bytes(b"\x01" + nal[1:].replace(b"\x00\x00\x03", b"\x00\x00"), "big"))[3:]


def nal_of_bits(header: bytes, bits: str) -> bytes:
    """An SPS NAL of RBSP `bits` (stop bit and alignment added; no 00 00 0x in these, unescaped)."""
    bits = bits + "1"
    bits += "0" * (-len(bits) % 8)
    return header + int(bits, 2).to_bytes(len(bits) // 8, "big")


@pytest.mark.parametrize("cut", ["timing", "vui"])
def test_an_sps_without_timing_info_or_without_vui_gets_them(cut: str) -> None:
    units = encode(**BASELINE)
    real = sps_of(units[0])
    sps, bits = parse_sps(real), rbsp_bits(real).rstrip("0")[:-1]
    assert sps.timing_at is not None
    if cut == "timing":  # timing_info_present_flag 0, its 65 bits gone
        bits = bits[: sps.timing_at] + "0" + bits[sps.timing_at + 66 :]
    else:  # vui_parameters_present_flag 0, the whole VUI gone
        bits = bits[: sps.vui_at] + "0"
    bare = nal_of_bits(real[:1], bits)
    assert parse_sps(bare).frame_rate is None
    assert (parse_sps(bare).timing_at is None) == (cut == "vui")
    retimed = with_frame_rate(annex_b([bare]), Fraction(24))[4:]
    assert parse_sps(retimed).frame_rate == 24
    assert parse_sps(retimed).width == sps.width
    stream = [unit.data.replace(real, bare) for unit in units]
    assert decoded_rate(stream)[0] != 24
    stream = [unit.data.replace(real, retimed) for unit in units]
    assert decoded_rate(stream) == (Fraction(24), len(units))
