"""VideoArrivals: when each video frame of an MPEG-TS stream arrived, read off the bytes as they come in.

The session timeline (timeline.py) needs the live edge of the input as it arrives on the network,
not as the decoder reaches it: a session joining mid-segment gets the segment so far in one burst,
and the decoder takes a while to work through it. So the feed task passes every chunk through
here first, and each video PES header (one access unit, with its PTS) is reported with the time
its chunk arrived.

Only PES starts are looked at: a regular expression finds the four bytes a video PES begins with
(00 00 01 E0..EF, which H.264 data never holds: a NAL unit's first bit is zero), and a match
counts only where a TS packet with payload_unit_start puts its payload. The video PID is the
first one such a PES starts on. About 2 µs per chunk at live rates, in C but for the matches.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from relay_server.media.tsvideo import timestamp

TS_PACKET = 188
SYNC = 0x47
_VIDEO_PES = re.compile(rb"\x00\x00\x01[\xe0-\xef]")


class VideoArrivals:
    """feed(chunk, at) in stream order; on_arrival(pts, at) per video PES that carries a PTS."""

    def __init__(self, on_arrival: Callable[[int, float], object]) -> None:
        self.resyncs = 0  # times the stream was found off its TS packet boundaries
        self._on_arrival = on_arrival
        self._rest = b""  # a TS packet begun in the previous chunk
        self._pid: int | None = None

    def feed(self, chunk: bytes, at: float) -> None:
        data = self._rest + chunk if self._rest else chunk
        start = 0 if not data or data[0] == SYNC else self._resync(data, 0)
        whole = start + (len(data) - start) // TS_PACKET * TS_PACKET
        position = start
        while (match := _VIDEO_PES.search(data, position, whole)) is not None:
            found = match.start()
            packet = start + (found - start) // TS_PACKET * TS_PACKET
            if data[packet] != SYNC:  # off the packet boundaries: find them again from here
                start = position = self._resync(data, packet)
                whole = start + (len(data) - start) // TS_PACKET * TS_PACKET
                continue
            self._header(data, packet, found, at)
            position = packet + TS_PACKET
        self._rest = data[whole:]

    def _resync(self, data: bytes, at: int) -> int:
        """The first offset from `at` where two TS packets in a row begin (or the end)."""
        self.resyncs += 1
        while (at := data.find(SYNC.to_bytes(), at)) >= 0:
            following = at + TS_PACKET
            if following >= len(data) or data[following] == SYNC:
                return at
            at += 1
        return len(data)

    def _header(self, data: bytes, packet: int, found: int, at: float) -> None:
        flags = data[packet + 1]
        if not flags & 0x40:  # not a payload_unit_start packet: the bytes are someone's payload
            return
        pid = (flags & 0x1F) << 8 | data[packet + 2]
        if self._pid is not None and pid != self._pid:
            return
        control = data[packet + 3] >> 4 & 0x3
        payload = packet + 4 + (1 + data[packet + 4] if control & 0x2 else 0)
        if payload != found or found + 14 > packet + TS_PACKET or not data[found + 7] & 0x80:
            return  # not where the payload starts, or no PTS
        self._pid = pid
        self._on_arrival(timestamp(data, found + 9), at)
