"""The decompressed view of gzip files: exact sizes, random reads, checkpoints, odd streams."""

from __future__ import annotations

import gzip
import json
import random
import subprocess
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio

from vapifs.errors import ProtocolError
from vapifs.gzview import GzipViews


@dataclass
class MemSource:
    data: bytes
    key: str = "call/logs@v1"
    reads: list[tuple[int, int]] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.data)

    async def read(self, offset: int, size: int) -> bytes:
        self.reads.append((offset, size))
        await trio.sleep(0)
        return self.data[offset : offset + size]


class DictSizes:
    def __init__(self) -> None:
        self.docs: dict[tuple[str, str], dict[str, Any]] = {}

    def get(self, ns: str, key: str) -> dict[str, Any] | None:
        return self.docs.get((ns, key))

    def put(self, ns: str, key: str, doc: dict[str, Any]) -> bool:
        self.docs[(ns, key)] = doc
        return True


def jsonl(lines: int, seed: int = 1) -> bytes:
    rng = random.Random(seed)
    out = []
    for i in range(lines):
        level = rng.choice(["INFO", "DEBUG", "WARN", "ERROR"])
        noise = "".join(rng.choice("abcdefghij0123456789") for _ in range(rng.randint(5, 60)))
        out.append(json.dumps({"seq": i, "level": level, "message": noise}))
    return ("\n".join(out) + "\n").encode()


def gunzip(data: bytes) -> bytes:
    """What `gunzip -c` writes (it may complain about trailing bytes: the output is what counts)."""
    return subprocess.run(["gunzip", "-c"], input=data, capture_output=True, check=False).stdout


PLAIN = jsonl(40_000)  # about 2 MB
GZ = gzip.compress(PLAIN, mtime=0)


async def test_random_reads_match_gunzip_and_size_is_exact() -> None:
    views = GzipViews(chunk_size=64 << 10, step=16 << 10)
    source = MemSource(GZ)
    assert await views.size(source) == len(PLAIN)
    assert views.known_size(source.key) == len(PLAIN)
    rng = random.Random(3)
    for _ in range(200):
        offset = rng.randrange(len(PLAIN) + 100)
        size = rng.choice([1, 100, 4096, 65536, 200_000])
        assert await views.read(source, offset, size) == PLAIN[offset : offset + size]
    assert await views.read(source, 0, len(PLAIN) + 10) == PLAIN


async def test_tail_first_then_head_reinflates_from_checkpoints_only() -> None:
    chunk = 64 << 10
    # Room for four chunks only: most of the output is evicted and rebuilt on demand.
    views = GzipViews(chunk_size=chunk, step=16 << 10, memory_bytes=4 * chunk)
    source = MemSource(GZ)
    size = await views.size(source)
    before = views.inflated_bytes
    assert await views.read(source, size - 1024, 1024) == PLAIN[-1024:]
    assert await views.read(source, 0, 1024) == PLAIN[:1024]
    # Checkpoints from the count: each read rebuilt one chunk, not the stream up to it.
    assert views.inflated_bytes - before <= 2 * chunk
    middle = size // 2
    before = views.inflated_bytes
    assert await views.read(source, middle, 10) == PLAIN[middle : middle + 10]
    assert views.inflated_bytes - before <= chunk


async def test_cold_read_of_the_end_then_the_start() -> None:
    views = GzipViews(chunk_size=64 << 10, step=16 << 10)
    source = MemSource(GZ)
    assert await views.read(source, len(PLAIN) - 1024, 4096) == PLAIN[-1024:]
    assert await views.read(source, 0, 1024) == PLAIN[:1024]
    assert await views.size(source) == len(PLAIN)


@pytest.mark.parametrize(
    "data",
    [
        gzip.compress(b"first member\n", mtime=0) + gzip.compress(b"second\n" * 999, mtime=0),
        GZ + b"\0" * 100,
        GZ + b"trailing garbage",
        gzip.compress(b"", mtime=0),
        gzip.compress(b"x", mtime=0),
        GZ[: len(GZ) // 2],  # truncated: gunzip writes what it could inflate
    ],
    ids=["two-members", "zero-padding", "garbage", "empty", "one-byte", "truncated"],
)
async def test_odd_streams_give_what_gunzip_gives(data: bytes) -> None:
    expected = gunzip(data)
    views = GzipViews(chunk_size=4096, step=1000)
    source = MemSource(data)
    assert await views.size(source) == len(expected)
    assert await views.read(source, 0, len(expected) + 1) == expected


async def test_corrupt_data_is_an_error() -> None:
    bad = bytearray(GZ)
    bad[100:200] = bytes(100)
    views = GzipViews(chunk_size=64 << 10)
    with pytest.raises(ProtocolError):
        await views.size(MemSource(bytes(bad)))


async def test_size_is_remembered_across_instances() -> None:
    sizes = DictSizes()
    first = MemSource(GZ)
    assert await GzipViews(sizes).size(first) == len(PLAIN)
    again = MemSource(GZ)
    assert await GzipViews(sizes).size(again) == len(PLAIN)
    assert again.reads == []  # no recount after a "remount"
    other_version = MemSource(GZ, key="call/logs@v2")
    await GzipViews(sizes).size(other_version)
    assert other_version.reads


async def test_trailer_size_is_used_for_large_files_then_checked() -> None:
    sizes = DictSizes()
    changed: list[str] = []
    async with trio.open_nursery() as nursery:
        views = GzipViews(
            sizes,
            nursery=nursery,
            chunk_size=64 << 10,
            count_below=1024,
            on_size_change=changed.append,
        )
        source = MemSource(GZ)
        assert await views.size(source) == len(PLAIN)
        assert source.reads == [(len(GZ) - 4, 4)]  # only the trailer before answering
        assert sizes.docs[("gzsize", source.key)]["exact"] is False
    assert sizes.docs[("gzsize", source.key)] == {"size": len(PLAIN), "exact": True}
    assert changed == []


async def test_trailer_size_of_several_members_is_corrected() -> None:
    data = GZ + gzip.compress(b"appended\n" * 10, mtime=0)
    sizes = DictSizes()
    changed: list[str] = []
    async with trio.open_nursery() as nursery:
        views = GzipViews(
            sizes,
            nursery=nursery,
            chunk_size=64 << 10,
            count_below=1024,
            on_size_change=changed.append,
        )
        source = MemSource(data)
        assert await views.size(source) == 90  # the last member's ISIZE: wrong, for now
    assert views.known_size(source.key) == len(PLAIN) + 90
    assert sizes.docs[("gzsize", source.key)] == {"size": len(PLAIN) + 90, "exact": True}
    assert changed == [source.key]


async def test_concurrent_readers_share_one_inflation() -> None:
    views = GzipViews(chunk_size=64 << 10, step=16 << 10)
    source = MemSource(GZ)
    results: list[bytes] = []

    async def reader() -> None:
        results.append(await views.read(source, 500_000, 1000))

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(reader)
    assert results == [PLAIN[500_000:501_000]] * 5
    assert views.inflated_bytes <= 600_000
