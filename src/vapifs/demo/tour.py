"""`vapifs demo`: the fake Vapi, a real mount of it, and a short guided tour."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import wave
from pathlib import Path
from typing import IO, Any


def start_fake(*args: str) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    """Start `python -m vapifs.demo` and return it with the JSON line it announces."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "vapifs.demo", *args],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait(5)
        raise RuntimeError("the fake Vapi did not start")
    return proc, json.loads(line)


def _say(out: IO[str], text: str = "") -> None:
    out.write(text + "\n")
    out.flush()


def _run(out: IO[str], command: list[str], cwd: Path) -> None:
    shown = command[2] if command[:2] == ["sh", "-c"] else " ".join(command)
    _say(out, "  $ " + shown)
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
    for line in (result.stdout + result.stderr).rstrip("\n").splitlines()[:12]:
        _say(out, "    " + line)


def tour(mountpoint: Path, out: IO[str] = sys.stdout) -> None:
    """Show what is there, how to play a recording and how to grep the logs."""
    calls = sorted((mountpoint / "calls").iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    _say(out, f"\n{len(calls)} calls of the last 14 days under {mountpoint}/calls/, newest first:")
    _run(out, ["ls", "calls"], mountpoint)
    both = ("stereo.wav", "call-logs.jsonl.gz")
    sample = next(
        (c for c in calls if all((c / n).exists() for n in both)),
        next((c for c in calls if (c / "stereo.wav").exists()), calls[0]),
    )
    rel = sample.relative_to(mountpoint)
    _say(out, "\nOne call, as ordinary files (sizes are real before any read):")
    _run(out, ["ls", "-l", str(rel)], mountpoint)
    stereo = sample / "stereo.wav"
    if stereo.exists():
        with wave.open(str(stereo)) as w:
            seconds = w.getnframes() / w.getframerate()
            _say(
                out,
                f"\n{rel}/stereo.wav: {w.getnchannels()} channels (customer left, assistant "
                f"right), {w.getframerate()} Hz, {w.getsampwidth() * 8}-bit, {seconds:.1f} s",
            )
        _say(out, "Play or inspect it with any tool, for example:")
        _say(out, f"    ffprobe {mountpoint}/{rel}/stereo.wav")
        _say(out, f"    play {mountpoint}/{rel}/stereo.wav          # sox")
        _say(out, f"    audacity {mountpoint}/{rel}/stereo.wav")
    logs = sample / "call-logs.jsonl.gz"
    if logs.exists():
        _say(out, "\nSearch the call logs in place, compressed or as plain text:")
        _run(out, ["zgrep", "-c", "WARN", f"{rel}/call-logs.jsonl.gz"], mountpoint)
        _run(out, ["grep", "-c", "INFO", f"{rel}/call-logs.jsonl"], mountpoint)
        _run(out, ["sh", "-c", "zgrep -h ERROR calls/*/call-logs.jsonl.gz | head -n 3"], mountpoint)
    _say(out, "\nThe call object itself (signed URLs removed):")
    _run(out, ["head", "-n", "8", f"{rel}/call.json"], mountpoint)


def run_demo(mountpoint: Path, *, wait: bool, cache_dir: Path | None, tls: bool = False) -> int:
    mountpoint = mountpoint.expanduser().absolute()
    created = not mountpoint.exists()
    mountpoint.mkdir(parents=True, exist_ok=True)
    temp_cache = None
    if cache_dir is None:
        temp_cache = tempfile.mkdtemp(prefix="vapifs-demo-cache-")
        cache_dir = Path(temp_cache)
    fake, info = start_fake(*(["--tls"] if tls else []))
    mounted = False
    try:
        env = dict(os.environ, VAPI_PRIVATE_API_KEY=info["api_key"])
        trust = ["--ca-file", info["ca_file"]] if tls else []
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "vapifs.cli",
                "mount",
                str(mountpoint),
                "--api-url",
                info["api_url"],
                "--cache-dir",
                str(cache_dir),
                *trust,
            ],
            env=env,
            check=False,
        )
        if result.returncode != 0:
            return result.returncode
        mounted = True
        print(f"vapifs demo: the fake Vapi at {info['api_url']} is mounted on {mountpoint}")
        tour(mountpoint)
        if wait and sys.stdin.isatty():
            print(f"\nExplore {mountpoint} in another terminal. Press Ctrl-C here to unmount.")
            with contextlib.suppress(KeyboardInterrupt):
                signal.pause()
        return 0
    finally:
        if mounted:
            for _ in range(20):
                done = subprocess.run(
                    ["fusermount3", "-u", str(mountpoint)], capture_output=True, check=False
                )
                if done.returncode == 0:
                    break
                time.sleep(0.25)
            print(f"\nvapifs demo: unmounted {mountpoint}")
        fake.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            fake.wait(5)
        if temp_cache is not None:
            shutil.rmtree(temp_cache, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                mountpoint.rmdir()
