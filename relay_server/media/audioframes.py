"""The audio frames in a PES: where each begins and how long it plays (AAC in ADTS, Opus).

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


CUTTERS: dict[str, Callable[[bytes], list[AudioFrame] | None]] = {"aac": adts_frames, "opus": opus_frames}
