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
# By the decoder name the relay's demuxer gives the stream: MPEG audio is "mp3float", MP2 too.
ENCODERS = {
    "aac": "aac",
    "opus": "libopus",
    "mp3float": "mp2",
    "mp3": "libmp3lame",
    "ac3": "ac3",
    "eac3": "eac3",
}
MPEG_FRAME, AC3_FRAME = 1152 / 48_000, 1536 / 48_000
FRAME_SECONDS = {"aac": 1024 / 48_000, "opus": 0.020, "mp3float": MPEG_FRAME, "mp3": MPEG_FRAME}
FRAME_SECONDS |= {"ac3": AC3_FRAME, "eac3": AC3_FRAME}


def pes_payloads(encoder: str, rate: int = 48_000) -> list[bytes]:
    """The audio PES of a tone muxed by the ffmpeg CLI, each as one packet: how the relay's
    demuxer hands them over."""
    assert FFMPEG is not None
    tone = f"sine=frequency=440:sample_rate={rate}:duration={SECONDS}"
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
    ("codec", "encoder"),
    [("ac3", "mp2"), ("aac", "mp2"), ("opus", "aac"), ("mp3float", "ac3"), ("ac3", "aac")],
)
def test_other_frames_are_not_taken_for_these(codec: str, encoder: str) -> None:
    assert all(audio_frames(codec, payload) is None for payload in pes_payloads(encoder))


@pytest.mark.parametrize("codec", list(ENCODERS))
def test_a_cut_or_damaged_pes_goes_on_whole(codec: str) -> None:
    payload = next(p for p in pes_payloads(ENCODERS[codec]) if len(audio_frames(codec, p) or ()) > 1)
    assert audio_frames(codec, payload[:-5]) is None  # the last frame cut short
    assert audio_frames(codec, b"\x00" + payload) is None  # no frame begins where one should
    assert audio_frames(codec, b"") is None


def test_ac3_at_44_1_khz_has_frames_of_two_sizes() -> None:
    """At 44.1 kHz an AC-3 frame's size alternates by a word (its frame size code's low bit)."""
    cuts = [audio_frames("ac3", payload) for payload in pes_payloads("ac3", rate=44_100)]
    frames = [frame for cut in cuts for frame in cut or ()]
    assert all(cut is not None for cut in cuts) and len({frame.length for frame in frames}) == 2
    assert {frame.seconds for frame in frames} == {1536 / 44_100}
