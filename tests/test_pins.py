"""The install is the locked one, and the tuning of httpcore it relies on still applies."""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import h11
import httpcore
import pytest
from httpcore._backends import trio as trio_backend
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from vapifs.core import SOCKET_READ, http_client
from vapifs.demo.server import FakeVapi
from vapifs.h11buffer import BodyBuffer
from vapifs.tlsstream import TLSStream

from .conftest import ROOT, over_tls

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)$")


def locked() -> dict[str, str]:
    """canonical name -> version, from constraints.txt."""
    pins: dict[str, str] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _PIN.match(line)
        assert match, f"constraints.txt: not a name==version pin: {line!r}"
        pins[canonicalize_name(match.group(1))] = match.group(2)
    return pins


def declared() -> list[Requirement]:
    project = tomllib.loads(Path(ROOT / "pyproject.toml").read_text())["project"]
    names = [*project["dependencies"], *project["optional-dependencies"]["test"]]
    return [Requirement(r) for r in names]


def test_every_declared_dependency_is_locked_within_its_range() -> None:
    pins = locked()
    for requirement in declared():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} is in pyproject.toml but not in constraints.txt"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {requirement.name}=={pins[name]}, outside {requirement}"
        )


def test_the_environment_holds_the_locked_versions() -> None:
    # scripts/setup installs with -c constraints.txt: what runs the suite is what is locked.
    wrong = []
    for name, pinned in locked().items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            wrong.append(f"{name}: not installed (locked {pinned})")
            continue
        if installed != pinned:
            wrong.append(f"{name}: {installed} installed, {pinned} locked")
    assert not wrong, "run scripts/setup (or scripts/lock to move the pins): " + "; ".join(wrong)


@over_tls
async def test_connections_read_a_mebibyte_at_a_time(
    fake: FakeVapi, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The client raises httpcore's per-read size (64 KiB by default): a release that renames
    # READ_NUM_BYTES, or reads some other way, must fail here rather than make reads slower.
    # Over https the reads must be TLSStream's, which replaces trio's SSLStream (one 16 KiB
    # record per read): a release that moves httpcore's start_tls must fail here too.
    sizes: list[int] = []
    readers: set[str] = set()
    for stream in (trio_backend.TrioStream, TLSStream):
        original = stream.read

        async def read(
            self: Any, max_bytes: int, timeout: float | None = None, original: Any = original
        ) -> bytes:
            sizes.append(max_bytes)
            readers.add(type(self).__name__)
            return await original(self, max_bytes, timeout)  # type: ignore[no-any-return]

        monkeypatch.setattr(stream, "read", read)
    ca = Path(fake.ca_file) if fake.ca_file else None
    async with http_client(read_timeout=10, stall_timeout=5, ca_file=ca) as client:
        response = await client.get(
            fake.api_url + "/call", headers={"Authorization": f"Bearer {fake.api_key}"}
        )
        assert response.status_code == 200 and len(response.content) > 64 * 1024
    assert httpcore.AsyncHTTP11Connection.READ_NUM_BYTES == SOCKET_READ
    assert sizes and set(sizes) == {SOCKET_READ}, sizes
    assert readers == ({"TLSStream"} if fake.ca_file else {"TrioStream"}), readers
    # And h11 hands bodies on uncopied: its connections get BodyBuffer.
    assert type(h11.Connection(h11.CLIENT)._receive_buffer) is BodyBuffer
