"""mount._serve's composition without a kernel mount: pyfuse3's init, main loop and close are
stood in for, so that what is released, and in which order, is seen from here."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
import trio

from vapifs import mount
from vapifs.core import Core
from vapifs.demo.server import FakeVapi
from vapifs.jobs import remove_file as real_remove


class Notes(mount._Notifier):
    def __init__(self) -> None:
        super().__init__(None)
        self.sent: list[str] = []

    def send(self, message: str) -> None:
        self.sent.append(message)


def options(fake: FakeVapi, tmp_path: Path, **more: Any) -> mount.MountOptions:
    (tmp_path / "mnt").mkdir(exist_ok=True)
    return mount.MountOptions(
        mountpoint=tmp_path / "mnt",
        api_url=fake.api_url,
        api_key=fake.api_key,
        cache_dir=tmp_path / "cache",
        cache_size=1 << 30,
        **more,
    )


@pytest.fixture
def steps(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What the mount does to FUSE and at exit, in order."""
    done: list[str] = []

    def init(ops: Any, mountpoint: str, options: set[str]) -> None:
        done.append("init")

    def close(unmount: bool = True) -> None:
        done.append(f"close unmount={unmount}")

    def remove_file(path: Path) -> None:
        done.append(f"remove {path.name} existed={path.exists()}")
        real_remove(path)

    async def flush_at_exit(core: Core) -> None:
        done.append("flush")
        await real_flush(core)
        done.append(f"flushed, tasks cancelled={core.nursery.cancel_scope.cancel_called}")

    real_flush = mount._flush_at_exit
    monkeypatch.setattr(pyfuse3, "init", init)
    monkeypatch.setattr(pyfuse3, "close", close)
    monkeypatch.setattr(mount, "remove_file", remove_file)
    monkeypatch.setattr(mount, "_flush_at_exit", flush_at_exit)
    # The mountpoint here is a plain directory of the test's disk: leave its read-ahead be.
    monkeypatch.setattr(mount, "_raise_read_ahead", lambda dev: done.append("announced"))
    return done


def main_loop(monkeypatch: pytest.MonkeyPatch, steps: list[str], until: Callable[[], bool]) -> None:
    async def main() -> None:
        steps.append("main")
        with trio.fail_after(10):
            while not until():
                await trio.sleep(0.01)
        steps.append("main returns")

    monkeypatch.setattr(pyfuse3, "main", main)


def test_a_mount_releases_fuse_then_the_stats_file_then_flushes_then_stops(
    fake: FakeVapi, tmp_path: Path, steps: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    opts = options(fake, tmp_path)
    stats = opts.cache_dir / "run" / f"{os.getpid()}.json"
    notes = Notes()
    main_loop(monkeypatch, steps, lambda: "ok" in notes.sent and stats.exists())
    assert trio.run(mount._serve, opts, notes, None) == 0
    assert notes.sent == ["ok"]
    assert steps == [
        "init",
        "main",
        "announced",
        "main returns",
        "close unmount=True",
        f"remove {stats.name} existed=True",
        "flush",
        "flushed, tasks cancelled=False",
    ]
    assert not stats.exists()


def test_a_failing_main_loop_still_unmounts_and_flushes(
    fake: FakeVapi, tmp_path: Path, steps: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> None:
        steps.append("main")
        raise RuntimeError("the FUSE loop broke")

    monkeypatch.setattr(pyfuse3, "main", main)
    with pytest.raises(BaseExceptionGroup) as raised:
        trio.run(mount._serve, options(fake, tmp_path), Notes(), None)
    assert raised.group_contains(RuntimeError, match="the FUSE loop broke")
    assert steps[:2] == ["init", "main"]
    assert steps[2:4] == ["close unmount=True", f"remove {os.getpid()}.json existed=False"]
    assert steps[4] == "flush"


def test_a_refused_init_mounts_nothing_and_says_why(
    fake: FakeVapi, tmp_path: Path, steps: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(ops: Any, mountpoint: str, options: set[str]) -> None:
        raise RuntimeError("fusermount3: option allow_other only allowed if ...")

    monkeypatch.setattr(pyfuse3, "init", refuse)
    opts = options(fake, tmp_path, fuse=mount.fuse_options(["allow_other"]))
    notes = Notes()
    assert trio.run(mount._serve, opts, notes, None) == 1
    assert notes.sent == [
        f"cannot mount {opts.mountpoint}: fusermount3: option allow_other only allowed "
        "if ... (check -o allow_other)"
    ]
    assert not any(step.startswith(("close", "main")) for step in steps)


def test_a_refused_key_opens_no_cache(
    fake: FakeVapi, tmp_path: Path, steps: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    opts = options(fake, tmp_path)
    opts.api_key = "not-the-key"
    notes = Notes()
    assert trio.run(mount._serve, opts, notes, None) == 1
    assert len(notes.sent) == 1 and "refused" in notes.sent[0]
    assert steps == []
    assert not opts.cache_dir.exists()
