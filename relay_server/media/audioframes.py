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


def audio_frames(codec: str, data: bytes) -> list[AudioFrame] | None:
    """The frames that make up `data` end to end; None when this codec's frames are not cut
    here, or `data` is not only whole frames (a cut or damaged PES): it then goes on whole."""
    cut = CUTTERS.get(codec)
    return None if cut is None else cut(data)


def adts_frames(data: bytes) -> list[AudioFrame] | None:
    """AAC in ADTS: each header gives its frame's length and sample count."""
    frames: list[AudioFrame] = []
    offset, size = 0, len(data)
    while offset < size:
        if size - offset < ADTS_HEADER or data[offset] != 0xFF or data[offset + 1] & 0xF6 != 0xF0:
            return None  # no syncword, or not layer 0
        rate_index = (data[offset + 2] >> 2) & 0x0F
        length = ((data[offset + 3] & 0x03) << 11) | (data[offset + 4] << 3) | (data[offset + 5] >> 5)
        if rate_index >= len(SAMPLE_RATES) or length < ADTS_HEADER or offset + length > size:
            return None
        samples = 1024 * ((data[offset + 6] & 0x03) + 1)  # raw data blocks in the frame
        frames.append(AudioFrame(offset, length, samples / SAMPLE_RATES[rate_index]))
        offset += length
    return frames or None


def opus_frames(data: bytes) -> list[AudioFrame] | None:
    """Opus in MPEG-TS (ETSI TS 102 366, annex): each packet after a control header (an 11-bit
    prefix, flags, its size in 255-runs, trims and extension); its duration from its TOC byte."""
    frames: list[AudioFrame] = []
    offset, size = 0, len(data)
    while offset < size:
        if size - offset < 3 or data[offset] != 0x7F or data[offset + 1] & 0xE0 != 0xE0:
            return None
        flags = data[offset + 1]
        at, packet = offset + 2, 0
        while at < size and data[at] == 0xFF:
            packet += 0xFF
            at += 1
        if at >= size:
            return None
        packet += data[at]
        at += 1 + 2 * bool(flags & 0x10) + 2 * bool(flags & 0x08)  # start and end trim
        if flags & 0x04 and at < size:
            at += 1 + data[at]  # the control extension, with its length
        end = at + packet
        if packet < 1 or end > size:
            return None
        toc = data[at]
        count = (1, 2, 2, 0)[toc & 0x03]
        if count == 0:  # code 3: the count is in the next byte
            if packet < 2:
                return None
            count = data[at + 1] & 0x3F
        frames.append(AudioFrame(offset, end - offset, count * OPUS_FRAME_MS[toc >> 3] / 1000))
        offset = end
    return frames or None


def mpeg_audio_frames(data: bytes) -> list[AudioFrame] | None:
    """MP2 and MP3: each header gives its frame's bitrate, sample rate and padding, so its length;
    free-format frames (bitrate index 0) are not cut."""
    frames: list[AudioFrame] = []
    offset, size = 0, len(data)
    while offset < size:
        if size - offset < 4 or data[offset] != 0xFF or data[offset + 1] & 0xE0 != 0xE0:
            return None
        version_bits, layer_bits = (data[offset + 1] >> 3) & 0x03, (data[offset + 1] >> 1) & 0x03
        bitrate_index, rate_index = data[offset + 2] >> 4, (data[offset + 2] >> 2) & 0x03
        if version_bits == 1 or layer_bits == 0 or not 0 < bitrate_index < 15 or rate_index == 3:
            return None  # reserved, free format or bad
        version = 1 if version_bits == 3 else 2  # MPEG-2.5 has MPEG-2's tables
        layer = 4 - layer_bits
        rate = MPEG_SAMPLE_RATES[rate_index] >> (0, 2, 1, 0)[version_bits]
        bitrate = 1000 * MPEG_BITRATES[(version, layer if version == 1 else min(layer, 2))][bitrate_index - 1]
        padding = (data[offset + 2] >> 1) & 0x01
        if layer == 1:
            samples, length = 384, (12 * bitrate // rate + padding) * 4
        else:
            samples = 1152 if layer == 2 or version == 1 else 576
            length = samples // 8 * bitrate // rate + padding
        if offset + length > size:
            return None
        frames.append(AudioFrame(offset, length, samples / rate))
        offset += length
    return frames or None


def ac3_frames(data: bytes) -> list[AudioFrame] | None:
    """AC-3 and E-AC-3: each sync frame's length from its sample rate and frame size code (AC-3)
    or its frmsiz field (E-AC-3)."""
    frames: list[AudioFrame] = []
    offset, size = 0, len(data)
    while offset < size:
        if size - offset < 6 or data[offset] != 0x0B or data[offset + 1] != 0x77:
            return None
        bsid = data[offset + 5] >> 3
        fscod = data[offset + 4] >> 6
        if bsid <= 10:  # AC-3: 1536 samples
            code = data[offset + 4] & 0x3F
            if fscod == 3 or code >= 2 * len(AC3_BITRATES):
                return None
            rate, kbits = AC3_SAMPLE_RATES[fscod], AC3_BITRATES[code // 2]
            words = kbits * 96_000 // rate + (code & 1 if rate == 44100 else 0)  # 1536 / 16 bits
            length, samples = 2 * words, 1536
        elif bsid <= 16:  # E-AC-3
            length = 2 * ((((data[offset + 2] & 0x07) << 8) | data[offset + 3]) + 1)
            blocks_code = (data[offset + 4] >> 4) & 0x03
            if fscod < 3:
                rate, samples = AC3_SAMPLE_RATES[fscod], 256 * EAC3_BLOCKS[blocks_code]
            elif blocks_code < 3:  # a reduced rate (fscod2 in numblkscod's place): 6 blocks
                rate, samples = EAC3_REDUCED_RATES[blocks_code], 1536
            else:
                return None
        else:
            return None
        if offset + length > size:
            return None
        frames.append(AudioFrame(offset, length, samples / rate))
        offset += length
    return frames or None


# By decoder name, as the input's stream names it (a TS's MPEG audio is "mp3float" until parsed).
CUTTERS: dict[str, Callable[[bytes], list[AudioFrame] | None]] = {
    "aac": adts_frames,
    "opus": opus_frames,
    "ac3": ac3_frames,
    "eac3": ac3_frames,
    **{f"mp{layer}{kind}": mpeg_audio_frames for layer in (1, 2, 3) for kind in ("", "float")},
}
