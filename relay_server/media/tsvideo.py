"""VideoSplitter: the H.264 access units of a live MPEG-TS, each as soon as its last TS packet is in.

libavformat's MPEG-TS demuxer knows a video PES is complete only when the next one starts, because
real muxers leave a video PES's length out (PES_packet_length 0: FFmpeg's default,
omit_video_pes_length=1): so every frame would leave it one frame interval after its last byte
arrived. This splitter follows only the video PID (found from the PAT and PMT) and ends each PES at
the earliest point where its end is sure:

1. its PES_packet_length, when the muxer wrote one;
2. else the TS packet whose adaptation field pads it. A muxer pads a packet only when the PES has
   too few bytes left to fill it: FFmpeg's muxer, and every common one, packs a PES's payload into
   full packets and stuffs the last (a PES that fits in one packet is stuffed in its first). An
   adaptation field is not enough by itself: the first packet of a PES often has one for its PCR or
   random_access_indicator, and a muxer may put a PCR in any packet. So only a field that pads
   counts: one with stuffing bytes beyond what its flags call for, or one that says nothing (length
   0: a single byte; all flags clear: FFmpeg pads 2 bytes with a length of 1 and a flags byte of
   0), and only in a packet that carries payload (a PCR-only packet has none). Should a muxer ever
   stuff a packet that is not a PES's last, the next packet on the PID continues the PES with no
   payload_unit_start: the splitter then counts the mistake (`false_ends`; the frame it cut short
   goes out damaged) and trusts stuffing no more in that stream;
3. else when the next PES starts on the PID (libavformat's rule), or the input ends.

The PES headers give each unit its PTS and DTS (33-bit, 90 kHz; DTS = PTS when only PTS is
written), as libavformat gives them, wrap correction included. A PES damaged in transit is
dropped and reported (a Damage event): a continuity_counter gap or a transport_error_indicator in
its packets, lost TS sync, a PES cut short of its PES_packet_length, a payload that does not start
with a PES header. A gap just before a payload_unit_start is not held against the PES before it:
trickle segments each come from a fresh muxer, whose counters start again at 0 (libavformat
delivers that PES too); if it was in fact cut short, the decoder sees it. Nothing the input holds
makes the splitter raise, and what it holds between feeds is bounded (MAX_HELD): a PES that
grows past MAX_PES is dropped as damaged.

Plain Python on bytes, with a fast path for the packets in the middle of a PES: 2.4–3.8 ms of CPU
per MB (0.45–0.7 µs a TS packet, fed 64 KiB or 188 bytes at a time), 0.04 ms per 1280×720 frame at
3.5 Mbit/s (2,300 TS packets a second).
"""

from __future__ import annotations

from dataclasses import dataclass, field

PACKET = 188
SYNC = 0x47
H264 = 0x1B  # stream_type of H.264 video in a PMT
# Video stream types in a PMT: MPEG-1/2, MPEG-4 part 2, H.264, HEVC, CAVS, VVC, Dirac, VC-1.
VIDEO_TYPES = frozenset({0x01, 0x02, 0x10, 0x1B, 0x24, 0x33, 0x42, 0xD1, 0xEA})
WRAP = 1 << 33  # PTS and DTS are 33-bit
WRAP_MARGIN = 60 * 90_000  # libavformat: the wrap reference is 60 s before the first timestamp
# A video PES longer than this is dropped (Damage "PES over ... bytes"): a PES of unknown length
# otherwise grows for as long as packets continue it. 8 MiB is several times an IDR of a 4K
# stream at a broadcast bitrate; libavformat itself cuts an unbounded PES at 200 KiB.
MAX_PES = 8 << 20
MAX_SECTION = 3 + 0xFFF  # a PSI section's header and its 12-bit section_length
# What a splitter holds between feeds at most (held_bytes): the PES in progress, with the packet
# that overran it; a section in progress and the last one kept, for the PAT and for the PMT; an
# incomplete TS packet and the packet kept to check the next feed's sync.
MAX_HELD = MAX_PES + PACKET + 4 * MAX_SECTION + 2 * PACKET
# stream_ids whose PES has no optional header (program_stream_map, padding, private_stream_2, ECM,
# EMM, DSMCC, H.222.1 type E, program_stream_directory): the payload follows the 6-byte header.
_NO_HEADER_IDS = frozenset({0xBC, 0xBE, 0xBF, 0xF0, 0xF1, 0xF2, 0xF8, 0xFF})


@dataclass(frozen=True, slots=True)
class AccessUnit:
    """One video PES's payload: an H.264 access unit in Annex B, as the demuxer would give it."""

    data: bytes
    pts: int | None
    dts: int | None
    random_access: bool  # random_access_indicator set on its first TS packet
    end: int  # offset in the input just past the TS packet that completed it
    rule: str  # what told it complete: "length", "stuffing", "next" (PES) or "end" (of the input)


@dataclass(frozen=True, slots=True)
class Damage:
    """A video PES dropped because it was damaged in transit (or, `false_end`, cut short earlier)."""

    reason: str
    end: int  # offset in the input just past the TS packet that showed the damage


@dataclass(frozen=True, slots=True)
class Program:
    """What the PMT says: the video stream (the first one) and every elementary stream's PID and type."""

    pmt_pid: int
    video_pid: int | None
    video_type: int | None
    streams: tuple[tuple[int, int], ...]  # (pid, stream_type) in PMT order

    @property
    def h264(self) -> bool:
        return self.video_type == H264

    @property
    def others(self) -> tuple[tuple[int, int], ...]:
        """The streams besides the video (audio, data, ...)."""
        return tuple(stream for stream in self.streams if stream[0] != self.video_pid)


@dataclass
class SplitterStats:
    bytes: int = 0  # fed
    packets: int = 0  # TS packets read (all PIDs)
    units: int = 0  # access units completed
    by_length: int = 0  # ... by rule 1, 2, 3 and at the end of the input
    by_stuffing: int = 0
    by_next: int = 0
    by_end: int = 0
    damaged: int = 0  # PES dropped (Damage events)
    false_ends: int = 0  # stuffing taken for a PES's end that was not (then stuffing is not trusted)
    sync_losses: int = 0  # times TS sync was lost and searched for again
    skipped_bytes: int = 0  # bytes passed over while searching for sync
    program_changes: int = 0  # PMTs that changed the video PID or type after the first


@dataclass(slots=True)
class _Pes:
    """A video PES being reassembled."""

    data: bytearray
    random_access: bool
    length: int = -1  # PES_packet_length + 6 once the header says so (0 in the header: -1, unknown)
    header: int = -1  # bytes of PES header before the payload, once known
    pts: int | None = None
    dts: int | None = None

    def parse_header(self) -> str | None:
        """Read the PES header once enough bytes are in; a reason when it is not a PES header."""
        data = self.data
        if self.header >= 0 or len(data) < 6:
            return None
        if data[0] != 0 or data[1] != 0 or data[2] != 1:
            return "no PES start code"
        if self.length < 0:
            length = data[4] << 8 | data[5]
            self.length = length + 6 if length else -2  # -2: told unknown
        if data[3] in _NO_HEADER_IDS:
            self.header = 6
            return None
        if len(data) < 9:
            return None
        end = 9 + data[8]
        if len(data) < end:
            return None
        flags = data[7] >> 6
        if flags & 2 and end >= 14:
            self.pts = self.dts = timestamp(data, 9)
            if flags == 3 and end >= 19:
                self.dts = timestamp(data, 14)
        self.header = end
        return None


@dataclass
class _Section:
    """A PSI section being reassembled from the packets of one PID."""

    data: bytearray = field(default_factory=bytearray)
    started: bool = False


class VideoSplitter:
    """Feed the input's bytes in order, in pieces of any size: feed() returns what they completed."""

    def __init__(self) -> None:
        self.stats = SplitterStats()
        self.program: Program | None = None  # from the latest PMT (the first program's)
        self._rest = b""  # an incomplete TS packet (or an unconfirmed resync) kept for the next feed
        self._last = b""  # the packet that ended the last feed, taken before the next sync byte came
        self._offset = 0  # input offset of _rest[0]
        self._in_sync = True
        self._pmt_pid: int | None = None
        self._sections: dict[int, _Section] = {}
        self._last_sections: dict[int, bytes] = {}  # the last valid section per PID, to skip repeats
        self._video_pid: int | None = None  # only while the video is H.264
        self._pes: _Pes | None = None
        self._cc: int | None = None  # the video PID's last continuity_counter
        self._previous: tuple[bytes, int] | None = None  # (buffer, offset) of its last packet with payload
        # No PES in progress, and a packet continuing one is no news: at the start (the input may
        # begin inside a PES) and once a damaged PES was dropped, until the next payload_unit_start.
        self._skipping = True
        self._cut_by_stuffing = False  # the last PES ended on stuffing, and no packet followed yet
        self.trust_stuffing = True
        self._wrap_reference: int | None = None  # libavformat's wrap correction, from the first timestamp
        self._wrap_add = True
        self._out: list[AccessUnit | Damage] = []

    @property
    def held_bytes(self) -> int:
        """The bytes the splitter holds between feeds (at most MAX_HELD)."""
        return (
            len(self._rest)
            + len(self._last)
            + (len(self._pes.data) if self._pes is not None else 0)
            + sum(len(section.data) for section in self._sections.values())
            + sum(len(raw) for raw in self._last_sections.values())
        )

    # -- input -------------------------------------------------------------------------------

    def feed(self, data: bytes) -> list[AccessUnit | Damage]:
        """Split `data`, the input's next bytes; the units completed (or dropped) by them, in order."""
        self.stats.bytes += len(data)
        buf = self._rest + data if self._rest else data
        base = self._offset
        last, self._last = self._last, b""
        if last and data and data[0] != SYNC:
            # The last packet before these bytes was taken with nothing after it to check: it may
            # have been cut short, and the sync it lost be inside it. Search from there.
            buf = last + buf
            base -= PACKET
        size = len(buf)
        at = 0
        while size - at >= PACKET:
            if buf[at] == SYNC and (at + PACKET >= size or buf[at + PACKET] == SYNC):
                # In sync; a packet followed by something else than a sync byte may be one cut short
                # (its missing bytes replaced by the next packet's): it is not trusted.
                self._in_sync = True
                self.stats.packets += 1
                pid = (buf[at + 1] & 0x1F) << 8 | buf[at + 2]
                if pid == self._video_pid:
                    control = buf[at + 3]
                    pes = self._pes
                    if (
                        control & 0x30 == 0x10  # payload, no adaptation field
                        and not buf[at + 1] & 0xC0  # no error, no unit start
                        and pes is not None
                        and pes.length == -2  # in a PES of unknown length, past its header
                        and pes.header >= 0
                        and control & 0x0F == (self._cc + 1) & 0x0F  # type: ignore[operator]
                        and len(pes.data) < MAX_PES
                    ):
                        # The bulk of the packets, the middle of a PES: its payload, nothing to decide.
                        self._cc = control & 0x0F
                        self._previous = (buf, at)
                        pes.data += buf[at + 4 : at + PACKET]
                    else:
                        self._video(buf, at, base + at + PACKET)
                elif pid == 0 or pid == self._pmt_pid:
                    self._psi(buf, at, pid, base + at + PACKET)
                at += PACKET
                if at == size:
                    self._last = buf[at - PACKET :]
                continue
            found = self._resync(buf, at, base)
            if found < 0:  # no confirmed sync byte yet: wait for more bytes from the last candidate
                at = -found - 1
                break
            at = found
        self._rest = buf[at:]
        self._offset = base + at
        out, self._out = self._out, []
        return out

    def end(self) -> list[AccessUnit | Damage]:
        """The input has ended: the PES in progress is complete (as libavformat takes it)."""
        rest = self._rest
        self._last = b""
        if len(rest) >= PACKET and rest[0] == SYNC:  # a last packet whose follower never came
            self._packet(rest, 0, self._offset + PACKET)
            self._offset += PACKET
            rest = rest[PACKET:]
        end = self._offset + len(rest)
        self.stats.skipped_bytes += len(rest)
        self._rest = b""
        self._offset = end
        if self._pes is not None:
            self._complete("end", end)
        out, self._out = self._out, []
        return out

    # -- TS packets ----------------------------------------------------------------------------

    def _resync(self, buf: bytes, at: int, base: int) -> int:
        """The next packet start from `at` confirmed by the sync byte a packet later; when the
        bytes run out first, -(start of the bytes to keep) - 1."""
        if self._in_sync:
            self._in_sync = False
            self.stats.sync_losses += 1
            self._drop("TS sync lost", base + at)
        size = len(buf)
        start = at + 1
        while True:
            found = buf.find(b"\x47", start)
            if found < 0:
                self.stats.skipped_bytes += size - at
                return -size - 1
            if found + PACKET >= size:
                self.stats.skipped_bytes += found - at
                return -found - 1
            if buf[found + PACKET] == SYNC:
                self.stats.skipped_bytes += found - at
                return found
            start = found + 1

    def _packet(self, buf: bytes, at: int, end: int) -> None:
        self.stats.packets += 1
        pid = (buf[at + 1] & 0x1F) << 8 | buf[at + 2]
        if pid == self._video_pid:
            self._video(buf, at, end)
        elif pid == 0 or pid == self._pmt_pid:
            self._psi(buf, at, pid, end)

    def _video(self, buf: bytes, at: int, end: int) -> None:
        flags = buf[at + 1]
        control = buf[at + 3]
        afc = control >> 4 & 3
        stuffed = random_access = discontinuity = False
        start = at + 4
        if afc & 2:
            length = buf[at + 4]
            if length > (183 if afc == 2 else 182):
                self._drop("invalid adaptation field", end)
                return
            if length:
                af_flags = buf[at + 5]
                discontinuity = bool(af_flags & 0x80)
                random_access = bool(af_flags & 0x40)
                stuffed = _stuffing(buf, at + 5, length)
            else:
                stuffed = True  # a field of length 0 is a single stuffing byte
            start = at + 5 + length
        if flags & 0x80:  # transport_error_indicator: the packet is known to be damaged
            self._drop("transport error", end)
            return
        if not afc & 1:
            return  # no payload (a PCR-only packet): its counter does not advance
        cc = control & 0x0F
        last, self._cc = self._cc, cc
        gap = False
        previous, self._previous = self._previous, (buf, at)
        if last is not None and not discontinuity and cc != (last + 1) & 0x0F:
            if cc == last and previous is not None:
                other, other_at = previous
                if buf[at : at + PACKET] == other[other_at : other_at + PACKET]:
                    return  # a duplicate packet, which the standard allows once
            gap = True
        if flags & 0x40:  # payload_unit_start: a new PES
            if self._pes is not None:
                self._complete("next", end)
            self._cut_by_stuffing = False
            self._skipping = False
            pes = self._pes = _Pes(bytearray(buf[start : at + PACKET]), random_access)
        elif self._pes is not None:
            pes = self._pes
            if gap:
                self._drop("continuity gap", end)
                return
            pes.data += buf[start : at + PACKET]
            if len(pes.data) > MAX_PES:
                self._drop(f"PES over {MAX_PES} bytes", end)
                return
        else:
            if self._cut_by_stuffing and not gap:
                # Stuffing in a packet that was not the PES's last: the unit went out cut short.
                self.trust_stuffing = False
                self.stats.false_ends += 1
                self._damage("stuffing before the end of a PES (stuffing no longer trusted)", end)
            elif not self._skipping:
                self._damage("PES continued without its start", end)  # its first packet was lost
            self._cut_by_stuffing = False
            self._skipping = True
            return
        if pes.header < 0:
            wrong = pes.parse_header()
            if wrong is not None:
                self._drop(wrong, end)
                return
        if pes.length > 0:
            if len(pes.data) >= pes.length:
                self._complete("length", end)
                self._skipping = False
        elif stuffed and self.trust_stuffing:
            self._complete("stuffing", end)
            self._cut_by_stuffing = True
            self._skipping = False

    def _complete(self, rule: str, end: int) -> None:
        pes = self._pes
        assert pes is not None
        self._pes = None
        if pes.header < 0:  # the input ended (or the next PES began) inside the PES header
            self._damage("PES header cut short", end)
            return
        if pes.length > 0:
            if len(pes.data) < pes.length:
                self._damage("PES shorter than its PES_packet_length", end)
                return
            del pes.data[pes.length :]
        data = bytes(memoryview(pes.data)[pes.header :])
        if not data:
            return
        stats = self.stats
        stats.units += 1
        if rule == "length":
            stats.by_length += 1
        elif rule == "stuffing":
            stats.by_stuffing += 1
        elif rule == "next":
            stats.by_next += 1
        else:
            stats.by_end += 1
        dts = self._unwrap(pes.dts)  # the first DTS (else PTS) sets the wrap reference, as in libavformat
        pts = self._unwrap(pes.pts)
        self._out.append(AccessUnit(data, pts, dts, pes.random_access, end, rule))

    def _drop(self, reason: str, end: int) -> None:
        """The PES in progress is damaged: drop it and skip to the next PES start. Between PESs
        nothing is lost yet: a PES the damage swallowed the start of shows when it continues."""
        if self._pes is not None:
            self._pes = None
            self._damage(reason, end)
            self._skipping = True
        self._cut_by_stuffing = False

    def _damage(self, reason: str, end: int) -> None:
        self.stats.damaged += 1
        self._out.append(Damage(reason, end))

    def _unwrap(self, value: int | None) -> int | None:
        """libavformat's wrap correction (demux.c, wrap_timestamp), so that video timestamps stay
        on the same line as the audio's: the reference is 60 s before the first timestamp; when that
        is more than 60 s (and an eighth of the range) from the wrap, timestamps below it are moved
        up by 2^33, else timestamps at or above it are moved down."""
        if value is None:
            return None
        if self._wrap_reference is None:
            self._wrap_reference = value - WRAP_MARGIN
            self._wrap_add = value < WRAP - (WRAP >> 3) or value < WRAP - WRAP_MARGIN
        if self._wrap_add:
            return value + WRAP if value < self._wrap_reference else value
        return value - WRAP if value >= self._wrap_reference else value

    # -- PAT and PMT -----------------------------------------------------------------------------

    def _psi(self, buf: bytes, at: int, pid: int, end: int) -> None:
        flags = buf[at + 1]
        afc = buf[at + 3] >> 4 & 3
        if flags & 0x80 or not afc & 1:
            return
        start = at + 4
        if afc & 2:
            start += buf[at + 4] + 1
        stop = at + PACKET
        if start >= stop:
            return
        section = self._sections.setdefault(pid, _Section())
        if flags & 0x40:
            pointer = buf[start]
            start += 1
            if section.started and pointer:  # the tail of the section in progress
                section.data += buf[start : min(start + pointer, stop)]
                self._sections_done(pid, section, end)
            section.data = bytearray(buf[start + pointer : stop])
            section.started = True
        elif section.started:
            section.data += buf[start:stop]
        else:
            return
        self._sections_done(pid, section, end)

    def _sections_done(self, pid: int, section: _Section, end: int) -> None:
        """Read the complete sections at the start of `section`; the rest waits for more packets."""
        data = section.data
        while data and data[0] != 0xFF:  # 0xFF: stuffing after the last section
            if len(data) < 3:
                return
            length = 3 + ((data[1] & 0x0F) << 8 | data[2])
            if len(data) < length:
                return
            raw = bytes(data[:length])
            del data[:length]
            # A repeat of the last one is skipped before its CRC is even computed.
            if self._last_sections.get(pid) != raw and length >= 12 and _crc32(raw) == 0:
                self._last_sections[pid] = raw
                self._table(pid, raw, end)
        section.started = False
        data.clear()

    def _table(self, pid: int, section: bytes, end: int) -> None:
        if not section[5] & 0x01:
            return  # current_next_indicator 0: a table that applies later
        table = section[0]
        if pid == 0 and table == 0x00:  # PAT: the first program's PMT PID
            for at in range(8, len(section) - 4 - 3, 4):
                number = section[at] << 8 | section[at + 1]
                if number:
                    pmt_pid = (section[at + 2] & 0x1F) << 8 | section[at + 3]
                    if pmt_pid != self._pmt_pid:
                        # Only the PAT's and the current PMT's sections are kept: a PAT that
                        # points somewhere new each time must not pile up the old ones.
                        old, self._pmt_pid = self._pmt_pid, pmt_pid
                        for stale in (old, pmt_pid):
                            if stale:  # never PID 0, the PAT's own
                                self._sections.pop(stale, None)
                                self._last_sections.pop(stale, None)
                    return
        elif pid == self._pmt_pid and table == 0x02:
            self._pmt(pid, section, end)

    def _pmt(self, pid: int, section: bytes, end: int) -> None:
        streams_end = len(section) - 4  # the CRC_32 follows the stream loop
        at = 12 + ((section[10] & 0x0F) << 8 | section[11])
        streams: list[tuple[int, int]] = []
        while at + 5 <= streams_end:
            stream_type = section[at]
            es_pid = (section[at + 1] & 0x1F) << 8 | section[at + 2]
            streams.append((es_pid, stream_type))
            at += 5 + ((section[at + 3] & 0x0F) << 8 | section[at + 4])
        video = next(((p, t) for p, t in streams if t in VIDEO_TYPES), None)
        program = Program(pid, video[0] if video else None, video[1] if video else None, tuple(streams))
        previous = self.program
        self.program = program
        if previous is not None and (previous.video_pid, previous.video_type) != (
            program.video_pid,
            program.video_type,
        ):
            self.stats.program_changes += 1
        video_pid = program.video_pid if program.h264 else None
        if video_pid != self._video_pid:
            if self._pes is not None:
                self._complete("next", end)  # the old stream's last PES
            self._video_pid = video_pid
            self._cc = None
            self._skipping = True
            self._cut_by_stuffing = False


def timestamp(data: bytes | bytearray, at: int) -> int:
    """A 33-bit PTS or DTS as a PES header codes it in 5 bytes."""
    return (
        (data[at] >> 1 & 0x07) << 30
        | data[at + 1] << 22
        | (data[at + 2] >> 1) << 15
        | data[at + 3] << 7
        | data[at + 4] >> 1
    )


def _stuffing(buf: bytes, at: int, length: int) -> bool:
    """Whether an adaptation field of `length` bytes from its flags at `at` pads the packet: it holds
    more bytes than its flags call for, or its flags are all clear (it says nothing, so it is there
    only to take room: FFmpeg pads 2 bytes so, a length of 1 and a flags byte of 0)."""
    flags = buf[at]
    if not flags:
        return True
    need = 1
    if flags & 0x10:  # PCR
        need += 6
    if flags & 0x08:  # OPCR
        need += 6
    if flags & 0x04:  # splice_countdown
        need += 1
    if flags & 0x02:  # transport_private_data
        if need >= length:
            return False
        need += 1 + buf[at + need]
    if flags & 0x01:  # adaptation_field_extension
        if need >= length:
            return False
        need += 1 + buf[at + need]
    return need < length


def _crc_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 24
        for _ in range(8):
            crc = (crc << 1) ^ 0x04C11DB7 if crc & 0x80000000 else crc << 1
        table.append(crc & 0xFFFFFFFF)
    return table


_CRC_TABLE = _crc_table()


def _crc32(data: bytes) -> int:
    """CRC-32/MPEG-2 of `data`; 0 over a whole PSI section (its CRC_32 included) when it is intact."""
    crc = 0xFFFFFFFF
    table = _CRC_TABLE
    for byte in data:
        crc = (crc << 8 & 0xFFFFFFFF) ^ table[(crc >> 24) ^ byte]
    return crc
