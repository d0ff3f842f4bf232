"""`make demo` keeps working: the whole job runs through the gRPC API and leaves files to look at."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import av
import numpy as np
import pytest


async def test_demo_writes_a_playable_output_and_a_comparison(tmp_path: Path) -> None:
    from relay_server.demo import run_demo

    assert await run_demo(tmp_path, seconds=2.0) == 0
    with av.open(str(tmp_path / "output.ts")) as container:
        frames = [frame for frame in container.decode(video=0)]
    assert len(frames) >= 30  # of 60; the demo itself checks every missing frame is accounted for
    assert (frames[0].width, frames[0].height) == (512, 512)
    # The demo's prompt inverts: the letterbox bars, black going in, come out white.
    assert frames[-1].to_ndarray(format="gray")[:100].mean() > 200
    with av.open(str(tmp_path / "compare.png")) as container:
        picture = next(container.decode(video=0)).to_ndarray(format="rgb24")
    assert picture.shape[0] == 512 and picture.shape[1] > 2 * 512
    assert np.ptp(picture) > 100  # not a blank image


@pytest.mark.skipif(shutil.which("ffprobe") is None, reason="ffprobe (Debian's ffmpeg) is not installed")
def test_ffprobe_reads_every_frame_of_the_demo_output(tmp_path: Path) -> None:
    from relay_server.demo import run_demo

    assert asyncio.run(run_demo(tmp_path, seconds=1.0)) == 0
    with av.open(str(tmp_path / "output.ts")) as container:
        decoded = sum(1 for _ in container.decode(video=0))
    probe = subprocess.run(
        [
            "ffprobe",
            "-v",
            "error",
            "-count_frames",
            "-select_streams",
            "v:0",
            "-show_entries",
            "stream=codec_name,width,height,nb_read_frames",
            "-of",
            "default=nw=1",
            str(tmp_path / "output.ts"),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    fields = dict(line.split("=", 1) for line in probe.stdout.split())
    assert fields == {"codec_name": "h264", "width": "512", "height": "512", "nb_read_frames": str(decoded)}
