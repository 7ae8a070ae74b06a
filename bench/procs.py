"""The bench's processes: each started in its own session, logged, and stopped at the end."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from common import BenchError, log


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    mountpoint: Path | None = None
    read_ahead_kib: int = 0


@dataclass
class Runner:
    """Starts processes in their own sessions and stops every one of them at the end."""

    run_dir: Path
    procs: list[Proc] = field(default_factory=list)

    def start(
        self,
        name: str,
        cmd: list[str],
        *,
        env: dict[str, str] | None = None,
        mountpoint: Path | None = None,
        stdout_pipe: bool = False,
    ) -> Proc:
        out = self.run_dir / f"{name}.out"
        with open(out, "ab") as sink:
            popen = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if stdout_pipe else sink,
                stderr=sink,
                env=env,
                start_new_session=True,  # a Ctrl-C reaches us, and we stop them in order
            )
        with open(self.run_dir / "pids", "a") as f:
            f.write(f"{popen.pid} {mountpoint or '-'}\n")
        proc = Proc(name, popen, mountpoint)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc, timeout: float = 20.0) -> None:
        if proc.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.popen.send_signal(signal.SIGTERM)
            try:
                proc.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"{proc.name} did not stop on SIGTERM: killing it")
                proc.popen.kill()
                proc.popen.wait(5)
        if proc.mountpoint is not None and os.path.ismount(proc.mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(proc.mountpoint)], check=False)
        if proc.popen.stdout is not None:
            proc.popen.stdout.close()
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        # Mounts first (they talk to the servers), then everything else, newest first.
        for proc in sorted(reversed(self.procs), key=lambda p: p.mountpoint is None):
            try:
                self.stop(proc)
            except Exception as exc:  # keep stopping the others
                log(f"stopping {proc.name}: {exc}")

    def tail(self, proc: Proc, lines: int = 15) -> str:
        try:
            text = (self.run_dir / f"{proc.name}.out").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def wait_for(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out waiting for {what}")
        time.sleep(0.05)
