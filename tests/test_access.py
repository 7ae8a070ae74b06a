"""Who may read a mount: the owner only, unless allow_other and uid/gid/umask say more."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from vapifs.demo.server import FakeVapi

from .conftest import MountFactory

pytestmark = pytest.mark.mount

NOBODY = 65534


@pytest.fixture
def open_dir() -> Iterator[Path]:
    # pytest's tmp dirs are 0700: another user could not even reach a mount inside them.
    path = Path(tempfile.mkdtemp(prefix="vapifs-access-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def read_as_nobody(path: Path) -> tuple[int, str]:
    result = subprocess.run(
        ["head", "-c", "16", str(path)],
        user=NOBODY,
        group=NOBODY,
        capture_output=True,
        text=True,
        timeout=30,
    )
    return result.returncode, result.stderr


def a_file(fake: FakeVapi, mountpoint: Path) -> Path:
    call_id = next(c for c, fc in fake.calls.items() if "stereo" in fc.artifacts)
    return mountpoint / "calls" / call_id / "call.json"


def test_another_user_gets_eacces_without_allow_other(
    fake: FakeVapi, mount_factory: MountFactory, open_dir: Path
) -> None:
    m = mount_factory(cache_dir=open_dir / "cache", base=open_dir)
    path = a_file(fake, m.mountpoint)
    assert path.read_bytes()
    code, err = read_as_nobody(path)
    assert code != 0 and "Permission denied" in err, err


def test_allow_other_follows_umask(
    fake: FakeVapi, mount_factory: MountFactory, open_dir: Path
) -> None:
    m = mount_factory("-o", "allow_other", cache_dir=open_dir / "cache", base=open_dir)
    path = a_file(fake, m.mountpoint)
    assert os.stat(path).st_mode & 0o777 == 0o440
    code, err = read_as_nobody(path)
    assert code != 0 and "Permission denied" in err, err
    m.stop()
    m = mount_factory(
        "-o",
        "allow_other,umask=0222",
        cache_dir=open_dir / "cache",
        base=open_dir,
    )
    assert os.stat(path).st_mode & 0o777 == 0o444
    code, err = read_as_nobody(path)
    assert code == 0, err
