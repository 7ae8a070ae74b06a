"""The encrypted cache (--encrypt-cache): sealed blocks and metadata, keys, refusals, mounts."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import time
import zlib
from pathlib import Path

import pytest

from vapifs.atrest import KEYCHECK_NAME, forget_encryption, stored_format
from vapifs.blocks import BlockCache
from vapifs.cachefiles import BLOCK_HEADER_AT, ENC_MAGIC
from vapifs.cachekey import cache_cipher
from vapifs.calls import artifact_files
from vapifs.crypto import CacheKeyError, Cipher, load_key
from vapifs.defaults import default_key_file
from vapifs.demo.server import FakeVapi
from vapifs.meta import MetaStore
from vapifs.version import Version

from .blockfiles import (
    block_count,
    block_file,
    block_files,
    clear_record,
    disk_bytes,
    files_of,
    patch,
    records,
    slot,
    slot_offset,
    write_record,
)
from .conftest import VAPIFS, Mount, MountFactory, force_unmount

BS = 4096
CALL = "3f2b8c1e-0d4a-4c55-9a51-2f7f1a9a0e11"
OTHER_CALL = "11111111-2222-3333-4444-555555555555"
KIND = "mono-recording"
V1 = Version(size=10 * BS + 100, etag='"abc"', last_modified="Tue, 01 Oct 2024 10:00:00 GMT")
V2 = Version(size=10 * BS + 100, etag='"def"')
KEY = bytes(range(32))
WAV = b"RIFF\x24\x08\x00\x00WAVEfmt \x10\x00\x00\x00"


def payload(version: Version, index: int) -> bytes:
    length = min(BS, version.size - index * BS)
    seed = hashlib.sha256(f"{version.token()}/{index}".encode()).digest()
    return (WAV + seed * (length // len(seed) + 1))[:length]


def make(root: Path, key: bytes | None = KEY) -> BlockCache:
    cache = BlockCache(root, max_bytes=1 << 30, block_size=BS, cipher=Cipher(key) if key else None)
    cache.open()
    return cache


def all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# -- blocks -----------------------------------------------------------------------------------


def test_sealed_blocks_round_trip_and_reveal_nothing(tmp_path: Path) -> None:
    root = tmp_path / "c"
    cache = make(root)
    for i in range(11):
        assert cache.put(CALL, KIND, V1, i, payload(V1, i))
    for i in range(11):
        assert cache.get(CALL, KIND, V1, i) == payload(V1, i)
    (path,) = block_files(root)
    everything = path.read_bytes()
    assert everything[BLOCK_HEADER_AT : BLOCK_HEADER_AT + len(ENC_MAGIC)] == ENC_MAGIC
    for needle in (b"RIFF", b"WAVE", b"fmt ", CALL.encode(), b"call_id", b'"abc"', b"crc32"):
        assert needle not in everything, needle
    assert payload(V1, 3)[1000:1064] not in everything
    # The cap counts sealed sizes: nonce and tag included.
    assert {i: stored for i, (stored, _crc) in records(path).items()} == {
        i: len(payload(V1, i)) + 28 for i in range(11)
    }
    assert disk_bytes(root) <= cache.bytes_used
    # Another instance (a remount) with the same key reads them all; the plain format's
    # header is JSON where this one's starts with ENC_MAGIC, so the two cannot be confused.
    again = make(root)
    assert [again.get(CALL, KIND, V1, i) for i in range(11)] == [payload(V1, i) for i in range(11)]
    assert again.verify().bad == 0


def tampered(path: Path, index: int) -> dict[str, tuple[int, bytes] | int]:
    """Ways a sealed block's slot can be wrong: (offset, bytes) to write, or where to cut."""
    at = slot_offset(path, index)
    sealed = slot(path, index)
    return {
        "flipped byte": (at + len(sealed) // 2, bytes([sealed[len(sealed) // 2] ^ 0x01])),
        "flipped tag": (at + len(sealed) - 1, bytes([sealed[-1] ^ 0x80])),
        "flipped nonce": (at, bytes([sealed[0] ^ 0x01])),
        "zeroed": (at, bytes(len(sealed))),
        "truncated": at + len(sealed) - 1,
        "cut at the slot": at,
    }


def test_tampered_block_is_dropped_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "c"
    cache = make(root)
    assert cache.put(CALL, KIND, V1, 2, payload(V1, 2))
    (path,) = block_files(root)
    for name, damage in tampered(path, 2).items():
        if isinstance(damage, int):
            os.truncate(path, damage)
        else:
            patch(path, *damage)
        cache.open()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="vapifs.cache"):
            assert cache.get(CALL, KIND, V1, 2) is None, name
        assert not path.exists(), name
        assert cache.bytes_used == 0, name
        assert warnings_of(caplog) == [
            f"cache: dropped a damaged block of {CALL}/{KIND} #2; fetching it again"
        ], name
        assert cache.put(CALL, KIND, V1, 2, payload(V1, 2))  # fetched again: served again
        assert cache.get(CALL, KIND, V1, 2) == payload(V1, 2), name
    # A plain block with a sound record in a sealed block's place is no block either.
    patch(path, slot_offset(path, 2), payload(V1, 2))
    write_record(path, 2, BS, zlib.crc32(payload(V1, 2)))
    cache.open()
    assert cache.get(CALL, KIND, V1, 2) is None


def test_a_sealed_block_never_opens_under_another_name(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The associated data binds a blob to call, kind, version and index: swaps fail."""
    root = tmp_path / "c"
    cache = make(root)
    assert cache.put(CALL, KIND, V1, 0, payload(V1, 0))
    src = block_file(root, CALL, KIND, V1)
    asks = [
        (CALL, KIND, V2),
        (CALL, "stereo-recording", V1),
        (OTHER_CALL, KIND, V1),
    ]
    targets = [block_file(root, *ask) for ask in asks]
    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)
    copied = src.stat().st_size
    # Within the file: block 0's sealed bytes in block 1's slot, under a sound record.
    sealed = slot(src, 0)
    patch(src, slot_offset(src, 1), sealed)
    write_record(src, 1, len(sealed), zlib.crc32(sealed))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vapifs.cache"):
        cache.open()
        for target, (call_id, kind, version) in zip(targets, asks, strict=True):
            assert not cache.has(call_id, kind, version, 0)
            assert cache.get(call_id, kind, version, 0) is None
            assert not target.exists()
        assert cache.get(CALL, KIND, V1, 1) is None
    assert warnings_of(caplog) == [f"cache: dropped a damaged block file ({copied} bytes)"] * 3 + [
        f"cache: dropped a damaged block of {CALL}/{KIND} #1; fetching it again"
    ]
    report = make(root).verify()
    assert (report.checked, report.bad) == (1, 0)
    assert cache.get(CALL, KIND, V1, 0) == payload(V1, 0)


def test_blocks_of_another_key_or_format_are_dropped(tmp_path: Path) -> None:
    root = tmp_path / "c"
    assert make(root).put(CALL, KIND, V1, 0, payload(V1, 0))
    assert make(root, key=os.urandom(32)).get(CALL, KIND, V1, 0) is None
    assert block_files(root) == []
    assert make(root).put(CALL, KIND, V1, 0, payload(V1, 0))
    assert make(root, key=None).get(CALL, KIND, V1, 0) is None  # a sealed file is not plain
    assert make(root, key=None).put(CALL, KIND, V1, 0, payload(V1, 0))
    assert make(root).get(CALL, KIND, V1, 0) is None  # nor a plain file sealed


def test_verify_with_a_cipher(tmp_path: Path) -> None:
    root = tmp_path / "c"
    cache = make(root)
    for i in range(4):
        assert cache.put(CALL, KIND, V1, i, payload(V1, i))
    assert cache.verify().bad == 0
    (path,) = block_files(root)
    patch(path, slot_offset(path, 1) + 100, bytes([slot(path, 1)[100] ^ 0x04]))
    # Block 2 moved to index 7, with a sound record there.
    sealed = slot(path, 2)
    clear_record(path, 2)
    patch(path, slot_offset(path, 7), sealed)
    write_record(path, 7, len(sealed), zlib.crc32(sealed))
    report = cache.verify()
    assert (report.checked, report.bad) == (4, 2)
    assert cache.verify().bad == 0
    # Counting needs no key: stats works from the records, which are not sealed.
    plain = BlockCache(root, max_bytes=1 << 30, block_size=BS)
    plain.open()
    assert plain.stats().blocks == 2
    assert block_files(root) == [path]  # and a cache opened without the key deletes nothing
    assert [make(root).get(CALL, KIND, V1, i) for i in (0, 3)] == [payload(V1, 0), payload(V1, 3)]


def test_sealing_a_large_block_is_cheap(tmp_path: Path) -> None:
    v = Version(size=8 << 20)
    cache = BlockCache(tmp_path / "c", max_bytes=64 << 20, cipher=Cipher(KEY))
    cache.open()
    data = os.urandom(1 << 20)
    t0 = time.perf_counter()
    for i in range(8):
        assert cache.put(CALL, KIND, v, i, data)
    for _ in range(3):
        for i in range(8):
            assert cache.get(CALL, KIND, v, i) == data
    assert time.perf_counter() - t0 < 5


# -- metadata ---------------------------------------------------------------------------------


def test_sealed_metadata_round_trip_and_reveals_nothing(tmp_path: Path) -> None:
    root = tmp_path / "c"
    meta = MetaStore(root, cipher=Cipher(KEY))
    doc = {"call": {"id": CALL, "customer": {"number": "+15550592652"}, "t": "My package"}}
    assert meta.put("call", CALL, doc)
    assert meta.put("artifact", f"{CALL}/{KIND}", {"version": V1.to_json()})
    assert MetaStore(root, cipher=Cipher(KEY)).get("call", CALL) == doc
    assert sorted(k for k, _d in meta.items("call")) == [CALL]
    everything = b"".join(p.read_bytes() for p in all_files(root))
    for needle in (CALL.encode(), b"+15550592652", b"My package", b'"abc"', b"customer"):
        assert needle not in everything, needle
    assert all(p.read_bytes().startswith(ENC_MAGIC) for p in all_files(root / "meta"))


def test_tampered_or_swapped_metadata_is_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "c"
    meta = MetaStore(root, cipher=Cipher(KEY))
    assert meta.put("call", CALL, {"n": 1})
    assert meta.put("call", OTHER_CALL, {"n": 2})
    (p1, p2) = sorted((root / "meta" / "call").iterdir())
    shutil.copyfile(p1, p2)  # one call's document under the other's name
    with caplog.at_level(logging.WARNING, logger="vapifs.cache"):
        assert len(meta.items("call")) == 1
    assert warnings_of(caplog) == ["cache: dropped a damaged call document; fetching it again"]
    assert not p2.exists()
    raw = bytearray(p1.read_bytes())
    raw[-3] ^= 0x10
    p1.write_bytes(bytes(raw))
    assert meta.items("call") == []
    assert not p1.exists()
    # Another key, or no key at all, opens nothing either.
    assert meta.put("call", CALL, {"n": 1})
    assert MetaStore(root, cipher=Cipher(os.urandom(32))).get("call", CALL) is None
    assert meta.put("call", CALL, {"n": 1})
    assert MetaStore(root).get("call", CALL) is None


# -- keys and the choice of format ------------------------------------------------------------


def test_key_file_is_made_0600_on_first_use_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "vapifs" / "cache.key"
    key = load_key(path, create=True)
    assert len(key) == 32
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert re.fullmatch(rb"[0-9a-f]{64}\n", path.read_bytes())
    assert load_key(path, create=True) == key
    assert not [p for p in path.parent.iterdir() if p != path]  # no temp file left
    os.chmod(path, 0o640)
    with pytest.raises(CacheKeyError, match="readable by others: chmod 600"):
        load_key(path, create=False)
    os.chmod(path, 0o600)
    path.write_text("not a key\n")
    with pytest.raises(CacheKeyError, match="not 64 hex digits"):
        load_key(path, create=False)
    with pytest.raises(CacheKeyError, match="does not exist"):
        load_key(tmp_path / "absent", create=False)


def test_default_key_file_honours_xdg_config_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert default_key_file() == tmp_path / "xdg" / "vapifs" / "cache.key"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_key_file() == tmp_path / "home" / ".config" / "vapifs" / "cache.key"
    c = cache_cipher(tmp_path / "cache", True)
    assert c is not None
    assert (tmp_path / "home" / ".config" / "vapifs" / "cache.key").exists()


def test_cache_cipher_refuses_mixing_and_other_keys(tmp_path: Path) -> None:
    root, key_file, other = tmp_path / "c", tmp_path / "k", tmp_path / "other"
    assert stored_format(root) == "empty"
    assert cache_cipher(root, False) is None
    c = cache_cipher(root, True, key_file)
    assert c is not None
    assert stored_format(root) == "encrypted"
    assert os.stat(root / KEYCHECK_NAME).st_mode & 0o777 == 0o600
    assert cache_cipher(root, True, key_file) is not None  # the same key, again
    load_key(other, create=True)
    with pytest.raises(
        CacheKeyError, match=re.escape(f"the cache in {root} was encrypted with another key")
    ):
        cache_cipher(root, True, other)
    with pytest.raises(CacheKeyError, match=r"another key .* does not exist"):
        cache_cipher(root, True, tmp_path / "missing")
    assert not (tmp_path / "missing").exists()  # never a new key for an encrypted cache
    with pytest.raises(
        CacheKeyError, match=re.escape(f"the cache in {root} is encrypted: use --encrypt")
    ):
        cache_cipher(root, False)
    # Encrypted data without its key check (deleted by hand) is still recognised.
    MetaStore(root, cipher=c).put("call", CALL, {"n": 1})
    os.unlink(root / KEYCHECK_NAME)
    assert stored_format(root) == "encrypted"
    # After a clear, the cache may start again either way.
    MetaStore(root).clear()
    forget_encryption(root)
    assert stored_format(root) == "empty"
    plain = make(root, key=None)
    assert plain.put(CALL, KIND, V1, 0, payload(V1, 0))
    assert stored_format(root) == "plain"
    with pytest.raises(CacheKeyError, match=re.escape(f"the cache in {root} is not encrypted")):
        cache_cipher(root, True, key_file)
    assert not (root / KEYCHECK_NAME).exists()
    assert cache_cipher(root, False) is None


# -- real mounts ------------------------------------------------------------------------------


def sources(fake: FakeVapi) -> list[tuple[str, str, bytes]]:
    return [
        (call_id, name, fc.artifacts[kind])
        for call_id, fc in fake.calls.items()
        for name, kind in artifact_files(fc.call).items()
    ]


def read_everything(m: Mount, fake: FakeVapi) -> None:
    for call_id, name, data in sources(fake):
        assert (m.calls / call_id / name).read_bytes() == data, name
    for call_id in fake.calls:
        for name in os.listdir(m.calls / call_id):
            (m.calls / call_id / name).read_bytes()  # call.json, transcript, call-logs.jsonl


def needles(fake: FakeVapi) -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    for call_id, fc in fake.calls.items():
        found[f"call id {call_id}"] = call_id.encode()
        number = (fc.call.get("customer") or {}).get("number")
        if number:
            found[f"number of {call_id}"] = number.encode()
        transcript = (fc.call.get("artifact") or {}).get("transcript") or ""
        for line in transcript.splitlines()[:3]:
            if len(line) >= 16:
                found[f"transcript of {call_id}"] = line.encode()
    for call_id, name, data in sources(fake):
        for k in (1, 2, 3):
            at = len(data) * k // 4
            chunk = data[at : at + 64]
            # A run of one byte value (silence) says nothing, and holes in sparse block files
            # read as zeros: such a needle would find the file system, not the recording.
            if len(data) >= 256 and len(set(chunk)) > 1:
                found[f"bytes of {call_id}/{name} at {at}"] = chunk
    return found


def assert_nothing_readable(cache_dir: Path, fake: FakeVapi) -> None:
    files = all_files(cache_dir)
    assert files
    blobs = {p: p.read_bytes() for p in files}
    for path, blob in blobs.items():
        # Four bytes alone would match random ciphertext now and then in tens of MB: a WAV
        # header is these together.
        assert not re.search(rb"RIFF.{4}WAVE", blob, re.DOTALL), path
        assert b"WAVEfmt " not in blob, path
        for what, needle in needles(fake).items():
            assert needle not in blob, (what, path)
    for call_id in fake.calls:
        assert not [p for p in cache_dir.rglob("*") if call_id in str(p)]


def storage_gets(fake: FakeVapi) -> int:
    return sum(v for k, v in fake.counters().items() if k.startswith("storage.get:"))


@pytest.mark.mount
def test_encrypted_mount_stores_nothing_readable_and_remounts_offline(
    fake: FakeVapi, mount_factory: MountFactory, tmp_path: Path
) -> None:
    key_file = tmp_path / "cache.key"
    enc = ("--encrypt-cache", "--cache-key-file", str(key_file))
    m = mount_factory(*enc)
    read_everything(m, fake)
    assert os.stat(key_file).st_mode & 0o777 == 0o600
    m.stop()
    assert_nothing_readable(m.cache_dir, fake)
    assert (m.cache_dir / "store").exists() and (m.cache_dir / "meta").exists()

    fake.reset_counters()
    m2 = mount_factory(*enc, cache_dir=m.cache_dir)
    read_everything(m2, fake)
    assert fake.counters()["storage.requests"] == 0
    m2.stop()
    assert [line for line in m.log_text().splitlines() if " WARNING " in line] == []
    assert [line for line in m2.log_text().splitlines() if " WARNING " in line] == []


@pytest.mark.mount
def test_the_same_search_finds_patient_data_in_a_plain_cache(
    fake: FakeVapi, mount_factory: MountFactory
) -> None:
    """Guards the test above: its search is not blind."""
    m = mount_factory()
    read_everything(m, fake)
    m.stop()
    blob = b"".join(p.read_bytes() for p in all_files(m.cache_dir))
    assert re.search(rb"RIFF.{4}WAVE", blob, re.DOTALL)
    missing = [what for what, needle in needles(fake).items() if needle not in blob]
    assert missing == []


def refused_mount(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run a mount that should be refused; should it mount after all, do not leave it there."""
    try:
        return subprocess.run(args, env=env, capture_output=True, text=True, timeout=30)
    finally:
        force_unmount(Path(args[len(VAPIFS) + 1]))


def mount_cmd(fake: FakeVapi, mountpoint: Path, cache_dir: Path, *extra: str) -> list[str]:
    return [
        *VAPIFS,
        "mount",
        str(mountpoint),
        "--api-url",
        fake.api_url,
        "--cache-dir",
        str(cache_dir),
        "--log-file",
        str(mountpoint.parent / "refused.log"),
        *extra,
    ]


@pytest.mark.mount
def test_wrong_key_or_mixing_refuses_before_mounting(
    fake: FakeVapi, mount_factory: MountFactory, tmp_path: Path
) -> None:
    key_file = tmp_path / "cache.key"
    m = mount_factory("--encrypt-cache", "--cache-key-file", str(key_file))
    call_id, name, data = sources(fake)[0]
    assert (m.calls / call_id / name).read_bytes() == data
    m.stop()
    other = tmp_path / "other.key"
    other.write_text(os.urandom(32).hex() + "\n")
    os.chmod(other, 0o600)
    env = dict(os.environ, VAPI_PRIVATE_API_KEY=fake.api_key)
    mountpoint = tmp_path / "refused"
    mountpoint.mkdir()
    cases = {
        "was encrypted with another key": ["--encrypt-cache", "--cache-key-file", str(other)],
        "was encrypted with another key (": [
            "--encrypt-cache",
            "--cache-key-file",
            str(tmp_path / "absent.key"),
        ],
        "is encrypted: use --encrypt-cache": [],
    }
    for expected, extra in cases.items():
        for fg in ([], ["-f"]):
            done = refused_mount(mount_cmd(fake, mountpoint, m.cache_dir, *extra, *fg), env)
            assert done.returncode == 1, (extra, fg, done.stderr)
            assert done.stderr.count("\n") == 1, done.stderr
            assert done.stderr.startswith(f"vapifs: the cache in {m.cache_dir} "), done.stderr
            assert expected in done.stderr
            assert not os.path.ismount(mountpoint)
    assert not (tmp_path / "absent.key").exists()
    # A plain cache is not silently mixed with sealed blocks either.
    plain = mount_factory(cache_dir=tmp_path / "plain", name="plainmnt")
    assert (plain.calls / call_id / name).read_bytes() == data
    plain.stop()
    assert stored_format(tmp_path / "plain") == "plain"
    done = refused_mount(
        mount_cmd(
            fake,
            mountpoint,
            tmp_path / "plain",
            "-f",
            "--encrypt-cache",
            "--cache-key-file",
            str(key_file),
        ),
        env,
    )
    assert done.returncode == 1
    assert done.stderr == (
        f"vapifs: the cache in {tmp_path / 'plain'} is not encrypted: clear it first "
        f"(vapifs cache clear --cache-dir {tmp_path / 'plain'}) or use another --cache-dir\n"
    )
    assert not os.path.ismount(mountpoint)


@pytest.mark.mount
def test_tampered_encrypted_block_is_fetched_again(
    fake: FakeVapi, mount_factory: MountFactory, tmp_path: Path
) -> None:
    enc = ("--encrypt-cache", "--cache-key-file", str(tmp_path / "cache.key"))
    call_id, name, data = max(sources(fake), key=lambda s: len(s[2]))
    m = mount_factory(*enc)
    assert (m.calls / call_id / name).read_bytes() == data
    m.stop()
    kind = artifact_files(fake.calls[call_id].call)[name]
    (victim,) = files_of(m.cache_dir, call_id, kind)
    present = sorted(records(victim))
    assert len(present) >= 2
    index = present[len(present) // 2]
    at = slot_offset(victim, index) + 1000
    patch(victim, at, bytes([victim.read_bytes()[at] ^ 0x01]))
    fake.reset_counters()
    m2 = mount_factory(*enc, cache_dir=m.cache_dir)
    assert (m2.calls / call_id / name).read_bytes() == data
    assert fake.counters()["storage.requests"] == 1
    assert fake.counters()[f"storage.get:{call_id}/{kind}"] == 1
    m2.stop()
    lines = [line for line in m2.log_text().splitlines() if " WARNING " in line]
    assert len(lines) == 1, lines
    assert "dropped a damaged block" in lines[0]


def cache_cmd(
    action: str, cache_dir: Path, *extra: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*VAPIFS, "cache", action, "--cache-dir", str(cache_dir), *extra],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


@pytest.mark.mount
def test_cache_commands_on_an_encrypted_cache(
    fake: FakeVapi, mount_factory: MountFactory, tmp_path: Path
) -> None:
    key_file = tmp_path / "cache.key"
    m = mount_factory("--encrypt-cache", "--cache-key-file", str(key_file))
    call_id, name, data = max(sources(fake), key=lambda s: len(s[2]))
    assert (m.calls / call_id / name).read_bytes() == data
    m.stop()
    on_disk = block_files(m.cache_dir)
    blocks = block_count(m.cache_dir)
    assert blocks >= 2
    # stats needs no key
    env = dict(os.environ, XDG_CONFIG_HOME=str(tmp_path / "nokey"))
    stats = cache_cmd("stats", m.cache_dir, env=env)
    assert stats.returncode == 0, stats.stderr
    assert f"blocks:      {blocks}\n" in stats.stdout
    assert "encrypted:   yes\n" in stats.stdout
    # verify does, and says so in one line when it is not there
    refused = cache_cmd("verify", m.cache_dir, env=env)
    assert refused.returncode == 1
    assert refused.stderr.count("\n") == 1 and "another key" in refused.stderr
    assert not (tmp_path / "nokey").exists()
    raw = bytearray(on_disk[0].read_bytes())
    raw[-5] ^= 0x01
    on_disk[0].write_bytes(bytes(raw))
    verify = cache_cmd("verify", m.cache_dir, "--cache-key-file", str(key_file))
    assert verify.returncode == 0, verify.stderr
    assert f"checked {blocks} blocks: 1 bad" in verify.stdout
    # clear needs nothing, and leaves a cache that either kind of mount may take
    cleared = cache_cmd("clear", m.cache_dir, env=env)
    assert cleared.returncode == 0, cleared.stderr
    assert block_files(m.cache_dir) == []
    assert not (m.cache_dir / KEYCHECK_NAME).exists()
    assert stored_format(m.cache_dir) == "empty"
    plain = mount_factory(cache_dir=m.cache_dir)
    assert (plain.calls / call_id / name).read_bytes() == data
    plain.stop()


@pytest.mark.mount
def test_prefetch_into_an_encrypted_cache(fake: FakeVapi, tmp_path: Path) -> None:
    key_file = tmp_path / "cache.key"
    cache_dir = tmp_path / "cache"
    env = dict(os.environ, VAPI_PRIVATE_API_KEY=fake.api_key)
    base = [*VAPIFS, "prefetch", "--since", "1d", "--api-url", fake.api_url]
    base += ["--cache-dir", str(cache_dir)]
    done = subprocess.run(
        [*base, "--encrypt-cache", "--cache-key-file", str(key_file)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert block_files(cache_dir)
    assert stored_format(cache_dir) == "encrypted"
    refused = subprocess.run(base, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1
    assert refused.stderr == (
        f"vapifs: the cache in {cache_dir} is encrypted: use --encrypt-cache (with its "
        "--cache-key-file), or another --cache-dir\n"
    )
