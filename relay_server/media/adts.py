"""The AAC frames in an ADTS PES: where each begins and how long it plays.

A TS muxer puts several AAC frames in one PES (FFmpeg fills 2930 bytes, about 0.4 s at 96
kbit/s) and stamps only the first, so a demuxer that does not parse hands the PES over as one
packet whose end is known only when the next one begins. Each ADTS header gives its frame's
length and sample count, so the frames can go on one by one, each with its own timestamp, as
soon as the video reaches it (session/audio.py), not a PES later.
"""

from __future__ import annotations

from typing import NamedTuple

HEADER = 7  # bytes of an ADTS header without CRC (9 with)
# By the header's sampling_frequency_index (ISO/IEC 14496-3, 1.6.3.4); 13-15 are reserved.
SAMPLE_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350)


class AdtsFrame(NamedTuple):
    offset: int  # bytes into the PES payload
    length: int  # bytes, header included
    seconds: float  # how long it plays


def adts_frames(data: bytes) -> list[AdtsFrame] | None:
    """The ADTS frames that make up `data` end to end; None when it is not only whole ADTS
    frames (LATM, another codec, a cut or damaged PES): it then goes on as one packet."""
    frames: list[AdtsFrame] = []
    offset, size = 0, len(data)
    while offset < size:
        if size - offset < HEADER or data[offset] != 0xFF or data[offset + 1] & 0xF6 != 0xF0:
            return None  # no syncword, or not layer 0
        rate_index = (data[offset + 2] >> 2) & 0x0F
        length = ((data[offset + 3] & 0x03) << 11) | (data[offset + 4] << 3) | (data[offset + 5] >> 5)
        if rate_index >= len(SAMPLE_RATES) or length < HEADER or offset + length > size:
            return None
        samples = 1024 * ((data[offset + 6] & 0x03) + 1)  # raw data blocks in the frame
        frames.append(AdtsFrame(offset, length, samples / SAMPLE_RATES[rate_index]))
        offset += length
    return frames or None
