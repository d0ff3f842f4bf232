"""The frames of an audio PES, as the ffmpeg CLI's MPEG-TS muxer writes them."""

from __future__ import annotations

import io
import subprocess

import av
import pytest

from bench.liveinput import FFMPEG
from relay_server.media.audioframes import audio_frames

pytestmark = pytest.mark.skipif(FFMPEG is None, reason="the ffmpeg CLI is not installed")

SECONDS = 2.0
ENCODERS = {"aac": "aac", "opus": "libopus"}
FRAME_SECONDS = {"aac": 1024 / 48_000, "opus": 0.020}  # FFmpeg's encoders' defaults


def pes_payloads(encoder: str) -> list[bytes]:
    """The audio PES of a tone muxed by the ffmpeg CLI, each as one packet: how the relay's
    demuxer hands them over."""
    assert FFMPEG is not None
    tone = f"sine=frequency=440:sample_rate=48000:duration={SECONDS}"
    command = [FFMPEG, "-v", "error", "-f", "lavfi", "-i", tone, "-c:a", encoder, "-f", "mpegts", "pipe:1"]
    data = subprocess.run(command, capture_output=True, check=True).stdout
    options = {"fflags": "+noparse"}
    with av.open(io.BytesIO(data), format="mpegts", options=options) as container:
        return [bytes(packet) for packet in container.demux(audio=0) if packet.size]


@pytest.mark.parametrize("codec", list(ENCODERS))
def test_a_pes_is_cut_into_its_frames_end_to_end(codec: str) -> None:
    payloads = pes_payloads(ENCODERS[codec])
    cuts = [audio_frames(codec, payload) for payload in payloads]
    assert all(cut is not None for cut in cuts)
    assert any(len(cut or ()) > 1 for cut in cuts)  # several frames in a PES
    for payload, cut in zip(payloads, cuts, strict=True):
        assert cut is not None
        assert b"".join(payload[f.offset : f.offset + f.length] for f in cut) == payload
    frames = [frame for cut in cuts for frame in cut or ()]
    assert {frame.seconds for frame in frames} == {FRAME_SECONDS[codec]}
    # The whole tone, give or take the encoder's priming and last frames.
    assert sum(frame.seconds for frame in frames) == pytest.approx(SECONDS, abs=3 * FRAME_SECONDS[codec])


@pytest.mark.parametrize(
    ("codec", "encoder"), [("mp2", "mp2"), ("ac3", "ac3"), ("aac", "mp2"), ("opus", "aac")]
)
def test_other_frames_are_not_taken_for_these(codec: str, encoder: str) -> None:
    assert all(audio_frames(codec, payload) is None for payload in pes_payloads(encoder))


@pytest.mark.parametrize("codec", list(ENCODERS))
def test_a_cut_or_damaged_pes_goes_on_whole(codec: str) -> None:
    payload = next(p for p in pes_payloads(ENCODERS[codec]) if len(audio_frames(codec, p) or ()) > 1)
    assert audio_frames(codec, payload[:-5]) is None  # the last frame cut short
    assert audio_frames(codec, b"\x00" + payload) is None  # no frame begins where one should
    assert audio_frames(codec, b"") is None
