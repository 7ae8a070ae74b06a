"""The bench's mounts: vapifs, rclone and the FUSE ceiling, each on a new mountpoint, waited
for until mounted (and its read-ahead raised), with the cache directories they use."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any

from common import API_KEY, BENCH, VENV, BenchError
from probes import read_ahead_kib
from procs import Proc, wait_for
from stage import Stage
from world import OPEN_PREFIX


class Mounts:
    """Mounts on the stage's servers; each is stopped (and unmounted) by stop()."""

    def __init__(self, stage: Stage, rclone_opts: list[str], results: dict[str, Any]) -> None:
        self.stage = stage
        self.runner = stage.runner
        self.rclone_opts = rclone_opts
        self.results = results  # where the read-ahead of each kind of mount is noted
        self.seq = 0

    def _mp(self, name: str) -> Path:
        self.seq += 1
        mp = self.stage.run_dir / "mnt" / f"{self.seq:02d}-{name}"
        mp.mkdir()
        return mp

    def vapifs(self, name: str, cache: Path) -> Proc:
        mp = self._mp(name)
        env = dict(os.environ, VAPI_PRIVATE_API_KEY=API_KEY)
        env.pop("VAPI_API_URL", None)
        ca_file = self.stage.ca_file
        cmd = [
            str(VENV / "vapifs"),
            "mount",
            str(mp),
            "-f",
            "--api-url",
            self.stage.api_url,
            "--cache-dir",
            str(cache),
            "--since",
            "30d",
            *(["--ca-file", ca_file] if ca_file else []),
        ]
        proc = self.runner.start(f"vapifs-{self.seq:02d}-{name}", cmd, env=env, mountpoint=mp)
        self._wait_mounted(proc)
        return proc

    def rclone(self, name: str, cache: Path) -> Proc:
        mp = self._mp(name)
        ca_file = self.stage.ca_file
        cmd = [
            "rclone",
            "mount",
            ":http:",
            str(mp),
            "--http-url",
            self.stage.storage_url + OPEN_PREFIX,
            "--read-only",
            "--vfs-cache-mode",
            "full",
            "--cache-dir",
            str(cache),
            "--config",
            "/dev/null",
            *(["--ca-cert", ca_file] if ca_file else []),
            *self.rclone_opts,
        ]
        proc = self.runner.start(f"rclone-{self.seq:02d}-{name}", cmd, mountpoint=mp)
        self._wait_mounted(proc)
        return proc

    def fuse_ceiling(self, source: Path) -> Proc:
        """The minimal pyfuse3 file system serving source from memory."""
        mp = self._mp("fuse-ceiling")
        proc = self.runner.start(
            "fuse-ceiling",
            [str(VENV / "python"), str(BENCH / "fuse_ceiling.py"), str(source), str(mp)],
            mountpoint=mp,
        )
        self._wait_mounted(proc)
        return proc

    def _wait_mounted(self, proc: Proc) -> None:
        assert proc.mountpoint is not None
        mp = proc.mountpoint

        def up() -> bool:
            if proc.popen.poll() is not None:
                raise BenchError(f"{proc.name} exited: {self.runner.tail(proc)}")
            return os.path.ismount(mp)

        wait_for(up, 60, f"{proc.name} to mount")
        if not proc.name.startswith("rclone"):
            # vapifs (and the ceiling, like it) raise the mount's read-ahead once mounted:
            # measuring before that would measure the kernel default instead.
            with contextlib.suppress(BenchError):
                wait_for(lambda: read_ahead_kib(mp) >= 4096, 5, "read-ahead")
        proc.read_ahead_kib = read_ahead_kib(mp)
        kinds = self.results.setdefault("read_ahead_kib", {})
        kinds[proc.name.split("-")[0]] = proc.read_ahead_kib

    def stop(self, proc: Proc) -> None:
        self.runner.stop(proc)

    def cache_dir(self, name: str) -> Path:
        return self.stage.run_dir / "cache" / name

    def fresh_cache(self, name: str) -> Path:
        path = self.cache_dir(name)
        shutil.rmtree(path, ignore_errors=True)
        return path


def call_file(mount: Proc, call_id: str) -> Path:
    assert mount.mountpoint is not None
    return mount.mountpoint / "calls" / call_id / "stereo.wav"
