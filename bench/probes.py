"""Timed reads of a path, and what /proc and /sys tell of memory and read-ahead."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from common import BenchError


def read_all(path: Path, timeout: float = 300.0) -> float:
    """Seconds `dd bs=1M` takes to read path to /dev/null."""
    t0 = time.perf_counter()
    res = subprocess.run(
        ["dd", f"if={path}", "of=/dev/null", "bs=1M"],
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    seconds = time.perf_counter() - t0
    if res.returncode != 0:
        raise BenchError(f"dd {path}: {res.stderr.decode(errors='replace').strip()}")
    return seconds


def first_byte(path: Path) -> float:
    """Seconds from open() to the first byte read (lookups included)."""
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        if not os.read(fd, 1):
            raise BenchError(f"{path}: empty")
        return time.perf_counter() - t0
    finally:
        os.close(fd)


def random_reads(path: Path, offsets: list[int], size: int) -> float:
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        for off in offsets:
            if len(os.pread(fd, size, off)) != size:
                raise BenchError(f"{path}: short read at {off}")
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def available_memory() -> int:
    """Bytes of memory available (MemAvailable), 0 when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def vm_hwm_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def read_ahead_kib(mountpoint: Path) -> int:
    dev = os.stat(mountpoint).st_dev
    try:
        with open(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 0


def mb_s(size: int, seconds: float) -> float:
    return size / seconds / 1e6 if seconds > 0 else 0.0
