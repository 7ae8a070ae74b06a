"""`vapifs prefetch`: warm the cache, through a running mount or with the core itself."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import trio

from . import calls as C
from .api import describe
from .blocks import BlockCache
from .cachecmd import running_mounts
from .cachekey import cache_cipher
from .cachelock import CacheInUse, lock_cache
from .core import Core, opened_core
from .crypto import CacheKeyError
from .defaults import DEFAULT_API_RATE, DEFAULT_REVALIDATE, DEFAULT_STORAGE_CONNECTIONS
from .errors import KeyRejected, VapifsError
from .reader import MAX_RUN_BLOCKS
from .statscmd import NotAMount, mount_root, read_stats
from .tree import Tree
from .units import human_bytes, human_duration
from .version import Version

KINDS: tuple[str, ...] = tuple(kind for kind, _stem, _ext in C.ARTIFACTS)
# File name -> artifact kind, for every name a call directory can give an artifact.
KIND_BY_NAME: dict[str, str] = {}
for _kind, _stem, _ext in C.ARTIFACTS:
    KIND_BY_NAME[_stem + _ext] = _kind
    if _ext == ".wav":
        KIND_BY_NAME[_stem + ".mp3"] = _kind

READ_CHUNK = 1 << 20


class PrefetchError(Exception):
    """A reason to stop before or while prefetching: one line, exit status 1."""


@dataclass
class PrefetchOptions:
    paths: list[Path]
    since: float | None  # epoch seconds
    until: float | None
    kinds: frozenset[str]
    cache_dir: Path
    cache_size: int
    jobs: int
    api_url: str
    key: Callable[[], str]  # asked only when the core is needed
    read_timeout: float = 30.0
    stall_timeout: float = 10.0
    progress: bool = False
    api_rate: float = DEFAULT_API_RATE
    storage_connections: int = DEFAULT_STORAGE_CONNECTIONS
    encrypt_cache: bool = False
    cache_key_file: Path | None = None
    ca_file: Path | None = None


@dataclass
class _Job:
    label: str
    path: Path | None = None  # read through a mount
    call_id: str = ""  # or read with the core
    kind: str = ""
    size: int = 0
    version: Version | None = None
    missing: list[int] = field(default_factory=list)
    sized: bool = False


@dataclass
class Report:
    """Honest totals of one run."""

    through: list[str] = field(default_factory=list)  # mountpoints read through
    files: int = 0
    done: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    bytes_total: int = 0
    bytes_done: int = 0
    bytes_network: int = 0
    bytes_cached: int = 0
    bytes_on_disk: int | None = None
    bytes_through: int = 0  # read through mounts
    elapsed: float = 0.0
    interrupted: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "through_mounts": self.through,
            "files": self.files,
            "done": self.done,
            "failed": [{"file": f, "reason": r} for f, r in self.failed],
            "bytes_total": self.bytes_total,
            "bytes_network": self.bytes_network,
            "bytes_already_cached": self.bytes_cached,
            "bytes_on_disk": self.bytes_on_disk,
            "elapsed": self.elapsed,
            "interrupted": self.interrupted,
        }

    def lines(self) -> list[str]:
        state = "interrupted after" if self.interrupted else "done in"
        out = [
            f"{state} {human_duration(self.elapsed)}: {self.done} of {self.files} files "
            f"({human_bytes(self.bytes_total)}), {len(self.failed)} failed",
            f"  from the network: {human_bytes(self.bytes_network)} ({self.bytes_network:,} bytes)",
            f"  already cached:   {human_bytes(self.bytes_cached)} ({self.bytes_cached:,} bytes)",
        ]
        if self.bytes_on_disk is not None:
            out.append(
                f"  now on disk:      {human_bytes(self.bytes_on_disk)} of the selected files"
            )
        if self.through:
            out.append(f"  read through the mount at {', '.join(self.through)}")
        out += [f"  failed: {name}: {reason}" for name, reason in self.failed]
        return out


class Progress:
    """One carriage-returned line on a terminal: bytes, files, rate, ETA; silent elsewhere."""

    def __init__(self, report: Report, enabled: bool, stream: TextIO | None = None) -> None:
        self._report = report
        self._enabled = enabled
        self._stream = stream or sys.stderr
        self._started = time.monotonic()
        self._shown = 0.0
        self._width = 0
        self.phase = "listing"
        self.sized = 0

    def show(self, force: bool = False) -> None:
        if not self._enabled:
            return
        now = time.monotonic()
        if not force and now - self._shown < 0.1:
            return
        self._shown = now
        r = self._report
        if self.phase != "fetching":
            line = f"{self.phase}: {self.sized}/{r.files} files"
        else:
            fetched = r.bytes_done - r.bytes_cached
            elapsed = max(now - self._started, 1e-6)
            rate = fetched / elapsed
            left = r.bytes_total - r.bytes_done
            eta = human_duration(left / rate) if rate > 0 and left > 0 else "-"
            share = r.bytes_done / r.bytes_total if r.bytes_total else 1.0
            bar = "#" * int(20 * share)
            line = (
                f"[{bar:<20}] {human_bytes(r.bytes_done)}/{human_bytes(r.bytes_total)}  "
                f"{r.done + len(r.failed)}/{r.files} files  {human_bytes(rate)}/s  ETA {eta}"
            )
        pad = max(0, self._width - len(line))
        self._width = len(line)
        self._stream.write("\r" + line + " " * pad)
        self._stream.flush()

    def close(self) -> None:
        if self._enabled and self._width:
            self._stream.write("\r" + " " * self._width + "\r")
            self._stream.flush()


# -- choosing the files ------------------------------------------------------------------


def parse_kinds(text: str) -> frozenset[str]:
    kinds = frozenset(k.strip() for k in text.split(",") if k.strip())
    unknown = sorted(kinds - set(KINDS))
    if unknown or not kinds:
        raise ValueError(
            f"unknown artifact {', '.join(unknown) or text!r} (choose from {','.join(KINDS)})"
        )
    return kinds


def _vapifs_root(path: Path) -> Path | None:
    """The root of the running vapifs mount holding `path`, if any."""
    try:
        read_stats(path)
    except NotAMount:
        return None
    return mount_root(path)


def _tree_path(path: Path) -> tuple[str, str | None] | None:
    """(call id, file name or None) from '<id>', 'calls/<id>' or '.../calls/<id>/<name>'."""
    parts = path.parts
    if parts and C.is_call_id(parts[-1]):
        return parts[-1], None
    if len(parts) >= 2 and C.is_call_id(parts[-2]):
        return parts[-2], parts[-1]
    return None


def _walk(path: Path, kinds: frozenset[str], root: Path) -> list[_Job]:
    """Files under `path` inside a mount: a file is taken as named, a directory for the
    selected artifacts of the calls under it."""
    if not path.is_dir():
        return [_Job(str(path.relative_to(root)), path=path)]
    if C.is_call_id(path.name):
        return _call_dir(path, kinds, root)
    jobs = []
    for name in sorted(os.listdir(path)):
        if (path / name).is_dir():
            jobs += _walk(path / name, kinds, root)
    return jobs


def _call_dir(path: Path, kinds: frozenset[str], root: Path) -> list[_Job]:
    """The selected artifacts of one call directory, named from its call.json: listing the
    directory would make the mount size (and so fetch a block of) every artifact."""
    try:
        names = C.artifact_files(json.loads((path / "call.json").read_bytes()))
    except (OSError, ValueError, AttributeError):
        names = {name: KIND_BY_NAME.get(name, "") for name in os.listdir(path)}
    label = path.relative_to(root)
    return [
        _Job(str(label / name), path=path / name) for name, kind in names.items() if kind in kinds
    ]


def _window_through(root: Path, opts: PrefetchOptions) -> list[_Job]:
    """The selected artifacts of the calls a mount lists in calls/ within [since, until]."""
    calls = root / "calls"
    jobs = []
    for call_id in sorted(os.listdir(calls)):
        directory = calls / call_id
        try:
            created = directory.stat().st_mtime  # a call directory's mtime is its createdAt
        except OSError:
            continue
        if opts.since is not None and created < opts.since:
            continue
        if opts.until is not None and created > opts.until:
            continue
        jobs += _call_dir(directory, opts.kinds, root)
    return jobs


# -- running ------------------------------------------------------------------------------


def run_prefetch(opts: PrefetchOptions, as_json: bool = False) -> int:
    """Prefetch; print the totals; 0 when every file is cached, 1 otherwise, 130 if stopped."""
    report = Report()
    progress = Progress(report, opts.progress)
    started = time.monotonic()
    error: PrefetchError | None = None
    try:
        trio.run(_prefetch, opts, report, progress)
    except PrefetchError as exc:
        error = exc
    except BaseExceptionGroup as group:
        match, rest = group.split(PrefetchError)
        if match is None or rest is not None:
            raise
        error = _first(match)
    finally:
        report.elapsed = time.monotonic() - started
        progress.close()
    if error is not None:
        print(f"vapifs: {error}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print("\n".join(report.lines()))
    if report.interrupted:
        return 130
    return 1 if report.failed else 0


def _first(group: BaseExceptionGroup[PrefetchError]) -> PrefetchError:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    assert isinstance(exc, PrefetchError)
    return exc


async def _prefetch(opts: PrefetchOptions, report: Report, progress: Progress) -> None:
    # A live mount using this cache dir owns it: everything goes through that mount.
    owner: Path | None = None
    for doc in await trio.to_thread.run_sync(running_mounts, opts.cache_dir):
        mountpoint = Path(str(doc.get("mountpoint", "")))
        root = await trio.to_thread.run_sync(_vapifs_root, mountpoint)
        if root is not None and root == mountpoint:
            owner = root
            break
    # The network bytes of each mount before this run touches it.
    before: dict[Path, int] = {}
    if owner is not None:
        before[owner] = await _network_of(owner)
    mount_jobs: list[_Job] = []
    core_paths: list[tuple[str, str | None, Path]] = []
    for path in opts.paths:
        root = await trio.to_thread.run_sync(_vapifs_root, path)
        if root is not None:
            if root not in before:
                before[root] = await _network_of(root)
            mount_jobs += await trio.to_thread.run_sync(
                _walk, Path(os.path.abspath(path)), opts.kinds, root
            )
            continue
        spec = _tree_path(path)
        if spec is None:
            raise PrefetchError(f"{path}: neither a call id nor a path inside a vapifs mount")
        if owner is not None:
            inside = owner / "calls" / spec[0]
            if spec[1] is not None:
                inside = inside / spec[1]
            mount_jobs += await trio.to_thread.run_sync(_walk, inside, opts.kinds, owner)
        else:
            core_paths.append((spec[0], spec[1], path))
    if opts.since is not None and owner is not None:
        mount_jobs += await trio.to_thread.run_sync(_window_through, owner, opts)
    report.through = sorted(str(r) for r in before)
    if core_paths or (opts.since is not None and owner is None):
        await _with_core(opts, report, progress, mount_jobs, core_paths)
    else:
        await _run_jobs(opts, report, progress, _dedup(mount_jobs), None)
    # What a mount fetched is what its own counters say; the rest of what was read through it
    # came from its caches.
    fetched = 0
    for r, then in before.items():
        fetched += max(0, await _network_of(r) - then)
    report.bytes_network += fetched
    report.bytes_cached += max(0, report.bytes_through - fetched)


async def _network_of(root: Path) -> int:
    try:
        doc = await trio.to_thread.run_sync(read_stats, root)
    except NotAMount:
        return 0
    return int(doc.get("bytes", {}).get("network", 0))


def _dedup(jobs: list[_Job]) -> list[_Job]:
    seen: set[str] = set()
    out = []
    for job in jobs:
        key = os.path.realpath(job.path) if job.path else f"{job.call_id}/{job.kind}"
        if key not in seen:
            seen.add(key)
            out.append(job)
    return out


async def _with_core(
    opts: PrefetchOptions,
    report: Report,
    progress: Progress,
    mount_jobs: list[_Job],
    core_paths: list[tuple[str, str | None, Path]],
) -> None:
    """Open the FUSE-free core (as a mount does, without FUSE) and prefetch through it."""
    key = opts.key()
    try:
        cipher = await trio.to_thread.run_sync(
            cache_cipher, opts.cache_dir, opts.encrypt_cache, opts.cache_key_file
        )
    except CacheKeyError as exc:
        raise PrefetchError(str(exc)) from None
    try:
        lock = await trio.to_thread.run_sync(lock_cache, opts.cache_dir, "prefetch")
    except CacheInUse as exc:
        raise PrefetchError(str(exc)) from None
    jobs = list(mount_jobs)
    try:
        async with opened_core(opts, key, cipher, revalidate_after=DEFAULT_REVALIDATE) as core:
            tree = Tree(core.api, core.store, core.meta, changes=core.changes)
            with trio.CancelScope() as listing:
                async with trio.open_nursery() as watch:
                    watch.start_soon(_on_signal(listing, report))
                    jobs += await _core_jobs(tree, opts, core_paths)
                    watch.cancel_scope.cancel()
            if not report.interrupted:
                await _run_jobs(opts, report, progress, _dedup(jobs), core)
            # Every block received goes to disk before the store's tasks stop.
            with trio.move_on_after(5.0 if report.interrupted else math.inf):
                await core.store.flush()
    finally:
        lock.release()
    report.bytes_network += core.fetcher.bytes_received
    report.bytes_on_disk = await trio.to_thread.run_sync(_on_disk, core.cache, jobs)


def _on_disk(cache: BlockCache, jobs: list[_Job]) -> int:
    total = 0
    for job in jobs:
        if job.version is None or job.path is not None:
            continue
        for index in range(math.ceil(job.version.size / cache.block_size)):
            if cache.has(job.call_id, job.kind, job.version, index):
                total += cache.block_length(job.version, index)
    return total


async def _core_jobs(
    tree: Tree, opts: PrefetchOptions, core_paths: list[tuple[str, str | None, Path]]
) -> list[_Job]:
    jobs: list[_Job] = []

    def add(call: dict[str, Any], only: str | None) -> None:
        call_id = str(call["id"])
        for name, kind in C.artifact_files(call).items():
            if (only is None and kind in opts.kinds) or name == only:
                jobs.append(_Job(f"{call_id}/{name}", call_id=call_id, kind=kind))

    try:
        for call_id, name, path in core_paths:
            call = await tree.call_object(call_id)
            if name is not None and name not in C.artifact_files(call):
                raise PrefetchError(f"{path}: the call has no artifact named {name}")
            add(call, name)
        if opts.since is not None:
            for call in await tree.calls_between(opts.since, opts.until):
                add(call, None)
    except KeyRejected as exc:
        raise PrefetchError(describe(exc)) from None
    except VapifsError as exc:
        raise PrefetchError(f"cannot list the calls: {describe(exc)}") from None
    return jobs


def _on_signal(scope: trio.CancelScope, report: Report) -> Callable[[], Awaitable[None]]:
    async def watch() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                report.interrupted = True
                scope.cancel()
                return

    return watch


async def _run_jobs(
    opts: PrefetchOptions,
    report: Report,
    progress: Progress,
    jobs: list[_Job],
    core: Core | None,
) -> None:
    """Size every file, then read what is missing: N files at a time, each in order."""
    report.files = len(jobs)
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as watch:
            watch.start_soon(_on_signal(scope, report))
            progress.phase = "sizing"
            progress.show(force=True)
            await _pool(opts.jobs, jobs, lambda job: _size(job, report, progress, core))
            progress.phase = "fetching"
            progress.show(force=True)
            todo = [job for job in jobs if job.sized]
            await _pool(opts.jobs, todo, lambda job: _fetch(job, report, progress, core))
            watch.cancel_scope.cancel()
    progress.show(force=True)


async def _pool(n: int, jobs: list[_Job], work: Callable[[_Job], Awaitable[None]]) -> None:
    send, recv = trio.open_memory_channel[_Job](len(jobs) or 1)
    for job in jobs:
        send.send_nowait(job)
    send.close()

    async def worker() -> None:
        async for job in recv:
            await work(job)

    async with trio.open_nursery() as nursery:
        for _ in range(max(1, min(n, len(jobs)))):
            nursery.start_soon(worker)


def _fail(job: _Job, report: Report, reason: str) -> None:
    report.failed.append((job.label, reason))


async def _step(job: _Job, report: Report, work: Callable[[], Awaitable[None]]) -> bool:
    """Run one step of a job: False when it failed, the reason in the report. A rejected
    key ends the whole prefetch: every other job would fail the same way."""
    try:
        await work()
    except OSError as exc:
        _fail(job, report, exc.strerror or type(exc).__name__)
        return False
    except KeyRejected as exc:
        raise PrefetchError(describe(exc)) from None
    except VapifsError as exc:
        _fail(job, report, describe(exc))
        return False
    return True


async def _size(job: _Job, report: Report, progress: Progress, core: Core | None) -> None:
    async def measure() -> None:
        if job.path is not None:
            job.size = (await trio.to_thread.run_sync(os.stat, job.path)).st_size
            return
        assert core is not None
        version = await core.store.version(job.call_id, job.kind)
        job.version, job.size = version, version.size
        bs = core.cache.block_size
        cached = 0
        for index in range(math.ceil(version.size / bs)):
            if core.cache.has(job.call_id, job.kind, version, index):
                cached += core.cache.block_length(version, index)
            else:
                job.missing.append(index)
        report.bytes_cached += cached
        report.bytes_done += cached

    if not await _step(job, report, measure):
        return
    job.sized = True
    report.bytes_total += job.size
    progress.sized += 1
    progress.show()


async def _fetch(job: _Job, report: Report, progress: Progress, core: Core | None) -> None:
    async def read() -> None:
        if job.path is not None:
            await _read_through(job, report, progress)
        else:
            assert core is not None
            await _read_core(job, report, progress, core)

    if not await _step(job, report, read):
        return
    report.done += 1
    progress.show()


async def _read_core(job: _Job, report: Report, progress: Progress, core: Core) -> None:
    """Read the missing blocks in order, a run of adjacent ones per request."""
    bs = core.cache.block_size
    runs: list[list[int]] = []
    for index in job.missing:
        if runs and index == runs[-1][-1] + 1 and len(runs[-1]) < MAX_RUN_BLOCKS:
            runs[-1].append(index)
        else:
            runs.append([index])
    for run in runs:
        data = await core.store.read(job.call_id, job.kind, run[0] * bs, len(run) * bs)
        report.bytes_done += len(data)
        progress.show()


async def _read_through(job: _Job, report: Report, progress: Progress) -> None:
    """Read a file of a mount to its end, so that the mount caches every block of it."""
    assert job.path is not None
    fd = await trio.to_thread.run_sync(os.open, job.path, os.O_RDONLY)
    try:
        # Pages the kernel already holds would never reach the mount: drop them first.
        await trio.to_thread.run_sync(os.posix_fadvise, fd, 0, 0, os.POSIX_FADV_DONTNEED)
        while True:
            data = await trio.to_thread.run_sync(os.read, fd, READ_CHUNK)
            if not data:
                break
            report.bytes_done += len(data)
            report.bytes_through += len(data)
            progress.show()
    finally:
        os.close(fd)
