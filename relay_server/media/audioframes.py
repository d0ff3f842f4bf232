"""The audio frames in a PES: where each begins and how long it plays (AAC, Opus, MP2/MP3, AC-3).

A TS muxer puts several audio frames in one PES (FFmpeg fills 2930 bytes, about 0.4 s of AAC at
96 kbit/s; Opus up to 120 ms) and stamps only the first, so a demuxer that does not parse hands
the PES over as one packet whose end is known only when the next one begins. The framing gives
each frame's length and duration, so the frames can go on one by one, each with its own
timestamp, as soon as the video reaches it (session/audio.py), not a PES later. Each frame keeps
its framing (the ADTS header, Opus's control header), which a TS muxer writes as it is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

ADTS_HEADER = 7  # bytes of an ADTS header without CRC (9 with)
# By the header's sampling_frequency_index (ISO/IEC 14496-3, 1.6.3.4); 13-15 are reserved.
SAMPLE_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350)
# An Opus frame's length by its TOC byte's configuration (RFC 6716, 3.1), in ms: SILK, hybrid, CELT.
OPUS_FRAME_MS: list[float] = [(10, 20, 40, 60)[c % 4] for c in range(12)]
OPUS_FRAME_MS += [(10, 20)[c % 2] for c in range(4)] + [(2.5, 5, 10, 20)[c % 4] for c in range(16)]
# MPEG audio (ISO/IEC 11172-3, 13818-3): kbit/s by bitrate index 1-14, for MPEG-1 layers I, II,
# III and MPEG-2/2.5 layers I and II/III; sample rates by index for MPEG-1 (halved for MPEG-2,
# quartered for 2.5).
MPEG_BITRATES = {
    (1, 1): (32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448),
    (1, 2): (32, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384),
    (1, 3): (32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    (2, 1): (32, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256),
    (2, 2): (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
MPEG_SAMPLE_RATES = (44100, 48000, 32000)
# AC-3 (ATSC A/52): kbit/s by frmsizecod // 2; sample rates by fscod; E-AC-3's reduced rates by
# fscod2, and its audio blocks by numblkscod (256 samples each).
AC3_BITRATES = (32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512, 576, 640)
AC3_SAMPLE_RATES = (48000, 44100, 32000)
EAC3_REDUCED_RATES = (24000, 22050, 16000)
EAC3_BLOCKS = (1, 2, 3, 6)


class AudioFrame(NamedTuple):
    offset: int  # bytes into the PES payload
    length: int  # bytes, its framing included
    seconds: float  # how long it plays


# A frame's header read at an offset: its length in bytes (framing included) and how long it
# plays, in seconds; None when no frame of the codec begins there.
Header = Callable[[bytes, int], tuple[int, float] | None]


def audio_frames(codec: str, data: bytes) -> list[AudioFrame] | None:
    """The frames that make up `data` end to end; None when this codec's frames are not cut
    here, or `data` is not only whole frames (a cut or damaged PES): it then goes on whole."""
    header = HEADERS.get(codec)
    if header is None:
        return None
    frames: list[AudioFrame] = []
    offset, size = 0, len(data)
    while offset < size:
        frame = header(data, offset)
        if frame is None or frame[0] <= 0 or offset + frame[0] > size:
            return None
        frames.append(AudioFrame(offset, *frame))
        offset += frame[0]
    return frames or None


def _adts(data: bytes, at: int) -> tuple[int, float] | None:
    """AAC in ADTS: the header gives the frame's length and sample count."""
    if len(data) - at < ADTS_HEADER or data[at] != 0xFF or data[at + 1] & 0xF6 != 0xF0:
        return None  # no syncword, or not layer 0
    rate_index = (data[at + 2] >> 2) & 0x0F
    length = ((data[at + 3] & 0x03) << 11) | (data[at + 4] << 3) | (data[at + 5] >> 5)
    if rate_index >= len(SAMPLE_RATES) or length < ADTS_HEADER:
        return None
    samples = 1024 * ((data[at + 6] & 0x03) + 1)  # raw data blocks in the frame
    return length, samples / SAMPLE_RATES[rate_index]


def _opus(data: bytes, at: int) -> tuple[int, float] | None:
    """Opus in MPEG-TS (ETSI TS 102 366, annex): a packet after a control header (an 11-bit
    prefix, flags, its size in 255-runs, trims and extension); its duration from its TOC byte."""
    size = len(data)
    if size - at < 3 or data[at] != 0x7F or data[at + 1] & 0xE0 != 0xE0:
        return None
    flags = data[at + 1]
    payload, packet = at + 2, 0
    while payload < size and data[payload] == 0xFF:
        packet += 0xFF
        payload += 1
    if payload >= size:
        return None
    packet += data[payload]
    payload += 1 + 2 * bool(flags & 0x10) + 2 * bool(flags & 0x08)  # start and end trim
    if flags & 0x04 and payload < size:
        payload += 1 + data[payload]  # the control extension, with its length
    if packet < 1 or payload + packet > size:
        return None
    toc = data[payload]
    count = (1, 2, 2, 0)[toc & 0x03]
    if count == 0:  # code 3: the count is in the next byte
        if packet < 2:
            return None
        count = data[payload + 1] & 0x3F
    return payload + packet - at, count * OPUS_FRAME_MS[toc >> 3] / 1000


def _mpeg_audio(data: bytes, at: int) -> tuple[int, float] | None:
    """MP2 and MP3: the header gives the frame's bitrate, sample rate and padding, so its length;
    free-format frames (bitrate index 0) are not cut."""
    if len(data) - at < 4 or data[at] != 0xFF or data[at + 1] & 0xE0 != 0xE0:
        return None
    version_bits, layer_bits = (data[at + 1] >> 3) & 0x03, (data[at + 1] >> 1) & 0x03
    bitrate_index, rate_index = data[at + 2] >> 4, (data[at + 2] >> 2) & 0x03
    if version_bits == 1 or layer_bits == 0 or not 0 < bitrate_index < 15 or rate_index == 3:
        return None  # reserved, free format or bad
    version = 1 if version_bits == 3 else 2  # MPEG-2.5 has MPEG-2's tables
    layer = 4 - layer_bits
    rate = MPEG_SAMPLE_RATES[rate_index] >> (0, 2, 1, 0)[version_bits]
    bitrate = 1000 * MPEG_BITRATES[(version, layer if version == 1 else min(layer, 2))][bitrate_index - 1]
    padding = (data[at + 2] >> 1) & 0x01
    if layer == 1:
        return (12 * bitrate // rate + padding) * 4, 384 / rate
    samples = 1152 if layer == 2 or version == 1 else 576
    return samples // 8 * bitrate // rate + padding, samples / rate


def _ac3(data: bytes, at: int) -> tuple[int, float] | None:
    """AC-3 and E-AC-3: a sync frame's length from its sample rate and frame size code (AC-3) or
    its frmsiz field (E-AC-3)."""
    if len(data) - at < 6 or data[at] != 0x0B or data[at + 1] != 0x77:
        return None
    bsid = data[at + 5] >> 3
    fscod = data[at + 4] >> 6
    if bsid <= 10:  # AC-3: 1536 samples
        code = data[at + 4] & 0x3F
        if fscod == 3 or code >= 2 * len(AC3_BITRATES):
            return None
        rate, kbits = AC3_SAMPLE_RATES[fscod], AC3_BITRATES[code // 2]
        words = kbits * 96_000 // rate + (code & 1 if rate == 44100 else 0)  # 1536 / 16 bits
        return 2 * words, 1536 / rate
    if bsid > 16:
        return None
    length = 2 * ((((data[at + 2] & 0x07) << 8) | data[at + 3]) + 1)  # E-AC-3
    blocks_code = (data[at + 4] >> 4) & 0x03
    if fscod < 3:
        return length, 256 * EAC3_BLOCKS[blocks_code] / AC3_SAMPLE_RATES[fscod]
    if blocks_code < 3:  # a reduced rate (fscod2 in numblkscod's place): 6 blocks
        return length, 1536 / EAC3_REDUCED_RATES[blocks_code]
    return None


# By decoder name, as the input's stream names it (a TS's MPEG audio is "mp3float" until parsed).
HEADERS: dict[str, Header] = {
    "aac": _adts,
    "opus": _opus,
    "ac3": _ac3,
    "eac3": _ac3,
    **{f"mp{layer}{kind}": _mpeg_audio for layer in (1, 2, 3) for kind in ("", "float")},
}
