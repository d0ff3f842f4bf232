"""The AAC frames of an ADTS PES, as FFmpeg's MPEG-TS muxer writes them."""

from __future__ import annotations

import io
import subprocess

import av
import pytest

from bench.liveinput import FFMPEG
from relay_server.media.adts import adts_frames

pytestmark = pytest.mark.skipif(FFMPEG is None, reason="the ffmpeg CLI is not installed")


def pes_payloads(codec: str) -> list[bytes]:
    """The audio PES of 2 s of a tone muxed by the ffmpeg CLI, each as one packet: how the
    relay's demuxer hands them over."""
    assert FFMPEG is not None
    command = [FFMPEG, "-v", "error", "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000:duration=2"]
    command += ["-c:a", codec, "-f", "mpegts", "pipe:1"]
    data = subprocess.run(command, capture_output=True, check=True).stdout
    options = {"fflags": "+noparse"}
    with av.open(io.BytesIO(data), format="mpegts", options=options) as container:
        return [bytes(packet) for packet in container.demux(audio=0) if packet.size]


def test_a_pes_is_cut_into_its_frames_end_to_end() -> None:
    payloads = pes_payloads("aac")
    assert any(len(adts_frames(payload) or ()) > 1 for payload in payloads)  # several per PES
    frames = [frame for payload in payloads for frame in adts_frames(payload) or ()]
    for payload in payloads:
        cut = adts_frames(payload)
        assert cut is not None
        assert b"".join(payload[f.offset : f.offset + f.length] for f in cut) == payload
    # Every frame of the clip (48 kHz, 1024 samples each; the encoder's priming one too).
    assert {frame.seconds for frame in frames} == {1024 / 48_000}
    assert len(frames) == pytest.approx(2.0 * 48_000 / 1024, abs=2)


@pytest.mark.parametrize("codec", ["mp2", "ac3"])
def test_other_codecs_are_not_taken_for_adts(codec: str) -> None:
    assert all(adts_frames(payload) is None for payload in pes_payloads(codec))


def test_a_cut_or_damaged_pes_goes_on_whole() -> None:
    payload = next(p for p in pes_payloads("aac") if len(adts_frames(p) or ()) > 1)
    assert adts_frames(payload[:-5]) is None  # the last frame cut short
    assert adts_frames(b"\x00" + payload) is None  # no syncword where a frame should begin
    assert adts_frames(b"") is None
