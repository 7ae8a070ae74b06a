"""The tools analysts use, run on the mount as on local files: ffprobe, ffmpeg, sox."""

from __future__ import annotations

import io
import json
import subprocess
import wave
from pathlib import Path

import pytest

from vapifs.calls import artifact_files
from vapifs.demo.server import FakeVapi

from .conftest import MountFactory

pytestmark = pytest.mark.mount


def run(*command: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result


def stereo_calls(fake: FakeVapi) -> list[str]:
    return [c for c, fc in fake.calls.items() if "stereo.wav" in artifact_files(fc.call)]


def test_ffprobe_reads_channels_rate_and_duration(
    fake: FakeVapi, mount_factory: MountFactory
) -> None:
    m = mount_factory()
    for call_id in stereo_calls(fake)[:4]:
        source = fake.calls[call_id].artifacts["stereo"]
        with wave.open(io.BytesIO(source)) as w:
            rate, frames = w.getframerate(), w.getnframes()
        probe = run(
            "ffprobe",
            "-v",
            "error",
            "-show_streams",
            "-of",
            "json",
            str(m.calls / call_id / "stereo.wav"),
        )
        (stream,) = json.loads(probe.stdout)["streams"]
        assert stream["channels"] == 2
        assert int(stream["sample_rate"]) == rate
        assert float(stream["duration"]) == pytest.approx(frames / rate, abs=0.01)


def test_sox_splits_the_customer_channel_out_of_the_stereo_file(
    fake: FakeVapi, mount_factory: MountFactory, tmp_path: Path
) -> None:
    m = mount_factory()
    call_id = next(c for c in stereo_calls(fake) if "customer" in fake.calls[c].artifacts)
    left = tmp_path / "left.wav"
    run("sox", str(m.calls / call_id / "stereo.wav"), str(left), "remix", "1")
    with (
        wave.open(str(left)) as got,
        wave.open(io.BytesIO(fake.calls[call_id].artifacts["customer"])) as want,
    ):
        assert got.readframes(got.getnframes()) == want.readframes(want.getnframes())


def test_ffmpeg_seeks_into_a_recording_and_decodes_an_mp3(
    fake: FakeVapi, mount_factory: MountFactory
) -> None:
    m = mount_factory()
    call_id = next(c for c in stereo_calls(fake))
    run(
        "ffmpeg",
        "-v",
        "error",
        "-ss",
        "1",
        "-t",
        "1",
        "-i",
        str(m.calls / call_id / "stereo.wav"),
        "-f",
        "null",
        "-",
    )
    mp3 = [
        (c, name)
        for c, fc in fake.calls.items()
        for name in artifact_files(fc.call)
        if name.endswith(".mp3")
    ]
    assert mp3, "the fake has an MP3 call"
    call_id, name = mp3[0]
    probe = run(
        "ffprobe", "-v", "error", "-show_format", "-of", "json", str(m.calls / call_id / name)
    )
    assert json.loads(probe.stdout)["format"]["format_name"] == "mp3"
