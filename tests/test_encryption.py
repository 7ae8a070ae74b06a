"""The encrypted cache (--encrypt-cache): sealed blocks and metadata, keys, refusals, mounts."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from vapifs.atrest import KEYCHECK_NAME, forget_encryption, stored_format
from vapifs.blocks import BlockCache
from vapifs.cachefiles import ENC_MAGIC
from vapifs.cachekey import cache_cipher
from vapifs.calls import artifact_files
from vapifs.crypto import CacheKeyError, Cipher, load_key
from vapifs.defaults import default_key_file
from vapifs.demo.server import FakeVapi
from vapifs.meta import MetaStore
from vapifs.version import Version

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


def block_files(root: Path) -> list[Path]:
    return sorted((root / "blocks").rglob("*.blk"))


def artifact_dir(root: Path, call_id: str = CALL, kind: str = KIND) -> Path:
    h = hashlib.sha256(f"{call_id}/{kind}".encode()).hexdigest()[:32]
    return root / "blocks" / h[:2] / h


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
    files = block_files(root)
    assert len(files) == 11
    everything = b"".join(p.read_bytes() for p in files)
    assert all(p.read_bytes().startswith(ENC_MAGIC) for p in files)
    for needle in (b"RIFF", b"WAVE", b"fmt ", CALL.encode(), b"call_id", b'"abc"', b"crc32"):
        assert needle not in everything, needle
    assert payload(V1, 3)[1000:1064] not in everything
    assert cache.bytes_used == sum(p.stat().st_size for p in files)  # the cap counts sealed size
    # Another instance (a remount) with the same key reads them all; the plain format still
    # starts with its own magic, so the two cannot be confused.
    again = make(root)
    assert [again.get(CALL, KIND, V1, i) for i in range(11)] == [payload(V1, i) for i in range(11)]
    assert again.verify().bad == 0


def tampered(good: bytes) -> dict[str, bytes]:
    flip = bytearray(good)
    flip[len(flip) // 2] ^= 0x01
    tag = bytearray(good)
    tag[-1] ^= 0x80
    nonce = bytearray(good)
    nonce[len(ENC_MAGIC)] ^= 0x01
    return {
        "flipped byte": bytes(flip),
        "flipped tag": bytes(tag),
        "flipped nonce": bytes(nonce),
        "truncated": good[:-1],
        "extra byte": good + b"x",
        "magic only": ENC_MAGIC,
        "empty": b"",
        "plain magic": b"VAPIFSB1" + good[len(ENC_MAGIC) :],
    }


def test_tampered_block_is_dropped_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "c"
    cache = make(root)
    assert cache.put(CALL, KIND, V1, 2, payload(V1, 2))
    (path,) = block_files(root)
    good = path.read_bytes()
    for name, raw in tampered(good).items():
        path.write_bytes(raw)
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
        good = path.read_bytes()


def test_a_sealed_block_never_opens_under_another_name(tmp_path: Path) -> None:
    """The associated data binds a blob to call, kind, version and index: swaps fail."""
    root = tmp_path / "c"
    cache = make(root)
    assert cache.put(CALL, KIND, V1, 0, payload(V1, 0))
    src = artifact_dir(root) / f"{V1.token()}-0.blk"
    asks = [
        (artifact_dir(root) / f"{V1.token()}-1.blk", (CALL, KIND, V1, 1)),
        (artifact_dir(root) / f"{V2.token()}-0.blk", (CALL, KIND, V2, 0)),
        (
            artifact_dir(root, kind="stereo-recording") / f"{V1.token()}-0.blk",
            (CALL, "stereo-recording", V1, 0),
        ),
        (artifact_dir(root, call_id=OTHER_CALL) / f"{V1.token()}-0.blk", (OTHER_CALL, KIND, V1, 0)),
    ]
    for target, _ask in asks:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)
    cache.open()
    for target, (call_id, kind, version, index) in asks:
        assert cache.has(call_id, kind, version, index)
        assert cache.get(call_id, kind, version, index) is None
        assert not target.exists()
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
    p1 = artifact_dir(root) / f"{V1.token()}-1.blk"
    raw = bytearray(p1.read_bytes())
    raw[100] ^= 0x04
    p1.write_bytes(bytes(raw))
    (artifact_dir(root) / f"{V1.token()}-2.blk").rename(artifact_dir(root) / f"{V1.token()}-7.blk")
    report = cache.verify()
    assert (report.checked, report.bad) == (4, 2)
    assert cache.verify().bad == 0
    # Counting needs no key: stats works from the file names and sizes.
    plain = BlockCache(root, max_bytes=1 << 30, block_size=BS)
    plain.open()
    assert plain.stats().blocks == 2


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
            if len(data) >= 256:
                found[f"bytes of {call_id}/{name} at {at}"] = data[at : at + 64]
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
    assert (m.cache_dir / "blocks").exists() and (m.cache_dir / "meta").exists()

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
    victims = sorted(artifact_dir(m.cache_dir, call_id, kind).glob("*.blk"))
    assert len(victims) >= 2
    victim = victims[len(victims) // 2]
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    victim.write_bytes(bytes(raw))
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
    # stats needs no key
    env = dict(os.environ, XDG_CONFIG_HOME=str(tmp_path / "nokey"))
    stats = cache_cmd("stats", m.cache_dir, env=env)
    assert stats.returncode == 0, stats.stderr
    assert f"blocks:      {len(on_disk)}\n" in stats.stdout
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
    assert f"checked {len(on_disk)} blocks: 1 bad" in verify.stdout
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
