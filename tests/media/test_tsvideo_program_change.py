"""VideoSplitter: a PMT that moves the video mid-stream ends the old stream's PES where the PMT is."""

from __future__ import annotations

from relay_server.media.tsvideo import PACKET, AccessUnit
from tests.media.test_tsvideo import VIDEO_PID, Muxer, au, fed_packetwise, pes_bytes, program

MOVED_PID = VIDEO_PID + 0x10


def test_a_new_video_pid_completes_the_pes_in_progress_at_the_pmts_packet() -> None:
    old, new = Muxer(), Muxer(MOVED_PID)
    # Many units first, so that the offsets are far from anything inside a PSI section.
    before = b"".join(old.pes(pes_bytes(au(700, seed), 90_000 + 3000 * seed)) for seed in range(40))
    # A PES whose packets are all payload: nothing tells its end but what comes next.
    unfinished = pes_bytes(au(184 * 2 - 14, 99), 300_000)
    data = program() + before + old.pes(unfinished)
    moved = program(pid=MOVED_PID)[PACKET:]  # the PMT alone: the PAT is unchanged
    pmt_end = len(data) + len(moved)
    data += moved + new.pes(pes_bytes(au(500, 100), 303_000))

    completed = [(fed, e) for fed, e in fed_packetwise(data) if isinstance(e, AccessUnit)]
    assert len(completed) == 42
    fed, unit = completed[40]
    assert (unit.pts, unit.rule, unit.data) == (300_000, "next", unfinished[14:])
    assert unit.end == fed == pmt_end > 1_000  # the input offset, not one inside the section
    assert completed[41][1].pts == 303_000 and completed[41][1].end == len(data)
