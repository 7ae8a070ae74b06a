"""Mount lifecycle: checks, logging, daemonising, the trio/pyfuse3 main loop, clean unmount."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import resource
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from zoneinfo import ZoneInfo

import pyfuse3
import trio

from . import __version__
from .api import VapiClient, describe
from .cachekey import cache_cipher
from .cachelock import CacheInUse, lock_cache
from .core import Core, opened_core
from .crypto import CacheKeyError, Cipher
from .defaults import (
    DEFAULT_API_RATE,
    DEFAULT_REVALIDATE,
    DEFAULT_STORAGE_CONNECTIONS,
    default_log_file,
)
from .errors import CertificateError, KeyRejected, VapifsError
from .fs import Operations
from .jobs import Expiry, Jobs, SignalWatcher, StatsPublisher, UnmountWatcher, remove_file
from .redact import RedactingFilter
from .sdnotify import notify as sd_notify
from .stats import Sources, snapshot
from .stats import encode as encode_stats
from .tree import Tree

log = logging.getLogger("vapifs")

# Between answering every request EIO and leaving the FUSE loop (seconds).
STOP_GRACE = 0.3
# At exit, blocks already fetched get this long to reach the disk (seconds).
FLUSH_AT_EXIT = 2.0


class MountError(Exception):
    """A reason not to mount, printed as one line; exit status 1."""


@dataclass
class MountOptions:
    mountpoint: Path
    api_url: str
    api_key: str
    cache_dir: Path
    cache_size: int
    foreground: bool = False
    fuse: FuseOptions | None = None  # -o, read by fuse_options(); None: no -o given
    debug: bool = False
    log_file: Path | None = None
    revalidate: float = DEFAULT_REVALIDATE
    max_cache_age: float | None = None  # cached data older than this is dropped (seconds)
    dir_ttl: float = 60.0
    window_days: float = 14.0
    since: float | None = None  # a fixed start of the window (else window_days back)
    until: float | None = None
    assistants: list[str] = field(default_factory=list)
    timezone: str = "UTC"
    read_timeout: float = 30.0
    stall_timeout: float = 10.0
    api_rate: float = DEFAULT_API_RATE
    storage_connections: int = DEFAULT_STORAGE_CONNECTIONS
    encrypt_cache: bool = False
    cache_key_file: Path | None = None  # None: crypto.default_key_file()
    ca_file: Path | None = None  # trusted besides the system's CAs and SSL_CERT_FILE


def setup_logging(debug: bool, log_file: Path | None, to_stderr: bool) -> None:
    handlers: list[logging.Handler] = []
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid() and st.st_mode & 0o077:
            os.fchmod(fd, 0o600)  # call ids and errors are nobody else's business
        handlers.append(logging.StreamHandler(os.fdopen(fd, "a", buffering=1)))
    if to_stderr:
        handlers.append(logging.StreamHandler(sys.stderr))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    for handler in handlers:
        handler.addFilter(RedactingFilter())
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    # These log full request URLs, signatures included: keep them quiet whatever the level.
    for noisy in ("httpx", "httpcore", "hpack"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not debug:
        logging.getLogger("pyfuse3").setLevel(logging.WARNING)


def check_mountpoint(mountpoint: Path) -> None:
    if not mountpoint.exists():
        raise MountError(f"mountpoint {mountpoint} does not exist")
    if not mountpoint.is_dir():
        raise MountError(f"mountpoint {mountpoint} is not a directory")
    if os.path.ismount(mountpoint):
        raise MountError(f"{mountpoint} is already a mount point (try: vapifs umount {mountpoint})")
    if not os.path.exists("/dev/fuse"):
        raise MountError("FUSE is not available: /dev/fuse is missing (install fuse3, load 'fuse')")
    if shutil.which("fusermount3") is None and os.getuid() != 0:
        raise MountError("fusermount3 is missing: install the fuse3 package")


@dataclass(frozen=True)
class Ownership:
    """Who the files seem to belong to, and their permission bits (from -o uid/gid/umask)."""

    uid: int
    gid: int
    umask: int


# Recordings are patient data: even with allow_other, only the owner and group may read
# unless -o umask= says otherwise.
DEFAULT_UMASK = 0o027


@dataclass(frozen=True)
class FuseOptions:
    """-o as given, read once: the kernel's mount options and what vapifs applies itself."""

    given: tuple[str, ...]
    kernel: frozenset[str]
    owner: Ownership


def fuse_options(given: list[str]) -> FuseOptions:
    """Kernel mount options, and the uid/gid/umask options that vapifs applies itself."""
    options = set(pyfuse3.default_options)
    options |= {"fsname=vapifs", "subtype=vapifs", "ro", "default_permissions"}
    uid, gid, umask = os.getuid(), os.getgid(), DEFAULT_UMASK
    for chunk in given:
        for option in (o.strip() for o in chunk.split(",")):
            name, _, value = option.partition("=")
            try:
                if name == "uid":
                    uid = int(value)
                elif name == "gid":
                    gid = int(value)
                elif name == "umask":
                    umask = int(value, 8) & 0o777
                elif option:
                    options.add(option)
            except ValueError:
                raise MountError(f"-o {option}: expected a number") from None
    return FuseOptions(tuple(given), frozenset(options), Ownership(uid, gid, umask))


PR_SET_DUMPABLE = 4


def _harden_process() -> None:
    """Secrets live in our memory: keep them out of core dumps, ptrace and child processes."""
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    # Not dumpable: no core even if a limit is raised again, no ptrace or /proc/<pid>/mem,
    # environ or fd by other processes of the same user (root can still look).
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    # The key is in opts now; programs we start (fusermount3, umount) need not inherit it.
    os.environ.pop("VAPI_PRIVATE_API_KEY", None)


class _Notifier:
    """Tells the parent of a daemon (or nobody, in the foreground) how the mount went."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd

    def send(self, message: str) -> None:
        if self._fd is None:
            if message != "ok":
                print(f"vapifs: {message}", file=sys.stderr)
            return
        with contextlib.suppress(OSError):
            os.write(self._fd, (message + "\n").encode())
            os.close(self._fd)
        self._fd = None


class _Refused(Exception):
    """The API refused the key, or its certificate does not verify: nothing is mounted."""


async def _check_key(api: VapiClient, read_timeout: float) -> None:
    """One request before mounting: a refused key is an error, no network only a warning."""
    try:
        with trio.fail_after(read_timeout):
            await api.check_key()
    except (KeyRejected, CertificateError) as exc:
        raise _Refused(describe(exc)) from None
    except (VapifsError, trio.TooSlowError) as exc:
        log.warning(
            "the Vapi API is unreachable (%s); mounting anyway and serving the cache",
            describe(exc),
        )


async def _serve(opts: MountOptions, notifier: _Notifier, cipher: Cipher | None = None) -> int:
    """Mount and serve until unmounted or signalled: 0, or 1 when nothing was mounted.

    Every resource is entered into one exit stack as it is made, so that it is released in
    the reverse order whatever ends the mount: the FUSE session closes (unmounting), the
    stats file goes, the blocks already fetched get FLUSH_AT_EXIT to reach the disk, the
    background jobs stop, then the core (its tasks, its HTTP client).
    """
    check = functools.partial(_check_key, read_timeout=opts.read_timeout)
    try:
        async with contextlib.AsyncExitStack() as stack:
            core = await stack.enter_async_context(
                opened_core(
                    opts,
                    opts.api_key,
                    cipher,
                    revalidate_after=opts.revalidate,
                    before_caches=check,
                )
            )
            jobs = stack.enter_context(Jobs(core.nursery))
            if not await _mount(stack, jobs, opts, core, notifier):
                return 1
    except _Refused as exc:
        notifier.send(str(exc))
        return 1
    log.info("unmounted %s", opts.mountpoint)
    return 0


async def _mount(
    stack: contextlib.AsyncExitStack,
    jobs: Jobs,
    opts: MountOptions,
    core: Core,
    notifier: _Notifier,
) -> bool:
    """Mount the tree over `core` and run the FUSE loop; False if the kernel refused."""
    tree = _tree(opts, core)
    fuse = opts.fuse or fuse_options([])
    sources = _sources(opts, core, tree, lambda: ops.open_files)  # ops is made just below
    ops = Operations(
        tree,
        uid=fuse.owner.uid,
        gid=fuse.owner.gid,
        umask=fuse.owner.umask,
        # A little past --read-timeout, so that the read's own bound speaks first.
        deadline=opts.read_timeout + 2.0,
        stats_source=lambda: encode_stats(snapshot(sources)),
    )
    if opts.max_cache_age is not None:
        jobs.start(Expiry(tree.drop_older_than, opts.max_cache_age))
    # Everything that can fail comes before init, and what init begins is undone by the
    # stack's callbacks alone: a mountpoint must never be left half-mounted.
    stats_path = _runtime_dir(opts.cache_dir) / f"{os.getpid()}.json"
    stack.push_async_callback(_flush_at_exit, core)
    stack.callback(remove_file, stats_path)
    try:
        pyfuse3.init(ops, str(opts.mountpoint), set(fuse.kernel))
    except RuntimeError as exc:
        hint = f" (check -o {','.join(fuse.given)})" if fuse.given else ""
        notifier.send(f"cannot mount {opts.mountpoint}: {exc}{hint}")
        return False
    stack.callback(pyfuse3.close, unmount=True)
    if opts.foreground:
        stack.callback(sd_notify, "STOPPING=1")
    stop = _Stopper(ops, core.nursery)
    announce = functools.partial(_announce, opts, notifier)
    jobs.start(UnmountWatcher(opts.mountpoint, lambda: ops.open_files, stop, announce))
    jobs.start(SignalWatcher(stop))
    jobs.start(StatsPublisher(sources, stats_path))
    await pyfuse3.main()
    return True


def _tree(opts: MountOptions, core: Core) -> Tree:
    return Tree(
        core.api,
        core.store,
        core.meta,
        window_days=opts.window_days,
        since=opts.since,
        until=opts.until,
        assistants=opts.assistants,
        timezone=ZoneInfo(opts.timezone),
        dir_ttl=opts.dir_ttl,
        nursery=core.nursery,
        changes=core.changes,
        on_invalidate=_invalidator(core.nursery),
        on_forget=_forgetter,
    )


def _sources(opts: MountOptions, core: Core, tree: Tree, open_files: Callable[[], int]) -> Sources:
    """Where the mount's live figures come from (`vapifs stats`, the stats file)."""
    return Sources(
        api=core.api,
        resolver=core.resolver,
        fetcher=core.fetcher,
        cache=core.cache,
        store=core.store,
        open_files=open_files,
        started=time.time(),
        mountpoint=str(opts.mountpoint),
        cache_dir=str(opts.cache_dir),
        walks=tree.walks.stats,
    )


def _runtime_dir(cache_dir: Path) -> Path:
    """The cache's run/ directory, where each mount keeps its stats file."""
    runtime = cache_dir / "run"
    runtime.mkdir(exist_ok=True, mode=0o700)
    return runtime


async def _announce(opts: MountOptions, notifier: _Notifier, dev: int) -> None:
    """The mount answers: let the kernel read ahead further, and say so."""
    await trio.to_thread.run_sync(_raise_read_ahead, dev)
    log.info("vapifs %s mounted %s on %s", __version__, opts.api_url, opts.mountpoint)
    notifier.send("ok")
    if opts.foreground:  # the process systemd started (Type=notify) is this one
        sd_notify("READY=1")


class _Stopper:
    """Ends the FUSE loop: requests waiting on the network answer EIO now (pyfuse3's loop
    ends only once every request it started has been answered), the loop a moment later."""

    def __init__(self, ops: Operations, nursery: trio.Nursery) -> None:
        self._ops = ops
        self._nursery = nursery

    def __call__(self) -> None:
        self._ops.cancel_requests()
        self._nursery.start_soon(self._terminate)

    async def _terminate(self) -> None:
        # A moment in which the kernel's retry of a cancelled read is answered EIO too,
        # rather than left to "Transport endpoint is not connected".
        await trio.sleep(STOP_GRACE)
        pyfuse3.terminate()


async def _flush_at_exit(core: Core) -> None:
    """Blocks read just before the unmount still reach the disk: a later mount, offline
    perhaps, finds them there."""
    with trio.move_on_after(FLUSH_AT_EXIT) as flushing:
        flushing.shield = True
        await core.store.flush()


def _raise_read_ahead(dev: int, kib: int = 4096) -> None:
    """Let the kernel read ahead (and send) up to 1 MiB per FUSE request instead of 128 KiB.

    Only root may write it; elsewhere the kernel default stays, which is merely slower.
    """
    path = f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(str(kib))
    except OSError as exc:
        log.debug("cannot raise read-ahead (%s): %s", path, exc.strerror)


def _invalidator(nursery: trio.Nursery) -> Callable[[int], None]:
    def invalidate(inode: int) -> None:
        async def run() -> None:
            with contextlib.suppress(OSError):
                await trio.to_thread.run_sync(pyfuse3.invalidate_inode, inode, False)

        nursery.start_soon(run)

    return invalidate


def _forgetter(parent: int, name: str) -> None:
    """Make the kernel forget a name (a call or a file gone from the server)."""
    with contextlib.suppress(OSError):
        pyfuse3.invalidate_entry_async(
            parent, name.encode("utf-8", "surrogateescape"), ignore_enoent=True
        )


def _check_writable(opts: MountOptions) -> None:
    """The cache dir and the log file, made before forking: a bad path is one line, exit 1."""
    try:
        opts.cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise MountError(f"cannot use the cache dir {opts.cache_dir}: {exc.strerror}") from None
    if opts.log_file is not None:
        try:
            opts.log_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.close(os.open(opts.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
        except OSError as exc:
            raise MountError(f"cannot write the log file {opts.log_file}: {exc.strerror}") from None


def run_mount(opts: MountOptions) -> int:
    """Mount; in the foreground until a signal, else return once the mount answers."""
    check_mountpoint(opts.mountpoint)
    if not opts.foreground and opts.log_file is None:
        opts.log_file = default_log_file()
    _check_writable(opts)
    try:
        lock = lock_cache(opts.cache_dir, f"mount on {opts.mountpoint}")
    except CacheInUse as exc:
        raise MountError(str(exc)) from None
    try:
        # Before forking: a wrong key, or a cache written the other way, is a one-line error.
        cipher = cache_cipher(opts.cache_dir, opts.encrypt_cache, opts.cache_key_file)
    except CacheKeyError as exc:
        lock.release()
        raise MountError(str(exc)) from None
    _harden_process()
    if opts.foreground:
        setup_logging(opts.debug, opts.log_file, to_stderr=opts.log_file is None)
        try:
            return trio.run(_serve, opts, _Notifier(None), cipher)
        finally:
            lock.release()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid:
        lock.forget()  # the daemon holds it now
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as pipe:
            answer = pipe.readline().decode(errors="replace").strip()
        if answer == "ok":
            return 0
        os.waitpid(pid, 0)
        print(f"vapifs: {answer or 'the mount process died while starting'}", file=sys.stderr)
        return 1
    # The daemon: its own session, no terminal, logs to a file.
    lock.claim()
    os.close(read_fd)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    code = 1
    try:
        setup_logging(opts.debug, opts.log_file, to_stderr=False)
        code = trio.run(_serve, opts, _Notifier(write_fd), cipher)
    except BaseException as exc:
        log.exception("the mount stopped on an error")
        _Notifier(write_fd).send(f"mount failed: {describe(exc)}")
    finally:
        os._exit(code)


def holders(mountpoint: Path) -> list[tuple[int, str, str]]:
    """Processes that keep `mountpoint` busy: (pid, command name, how: open file or cwd).

    Read from /proc (links only: nothing is asked of the mount itself); processes of other
    users are invisible to an ordinary user, so the list may be short.
    """
    top = os.path.realpath(mountpoint)

    def inside(path: str) -> bool:
        return path == top or path.startswith(top.rstrip("/") + "/")

    found: list[tuple[int, str, str]] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        base = f"/proc/{entry}"
        how: list[str] = []
        with contextlib.suppress(OSError):
            if inside(os.readlink(f"{base}/cwd")):
                how.append("cwd")
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"{base}/fd"):
                with contextlib.suppress(OSError):
                    if inside(os.readlink(f"{base}/fd/{fd}")):
                        how.append("open file")
                        break
        if not how:
            continue
        name = "?"
        with contextlib.suppress(OSError):
            name = Path(f"{base}/comm").read_text().strip() or "?"
        found.append((int(entry), name, ", ".join(how)))
    return found


def run_umount(mountpoint: Path, lazy: bool = False) -> int:
    if not os.path.ismount(mountpoint):
        raise MountError(f"{mountpoint} is not mounted")
    reason = "neither fusermount3 nor umount is installed"
    commands = (
        ["fusermount3", "-u", *(["-z"] if lazy else []), str(mountpoint)],
        ["umount", *(["-l"] if lazy else []), str(mountpoint)],
    )
    for command in commands:
        if shutil.which(command[0]) is None:
            continue
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode == 0:
            return 0
        lines = (result.stderr or result.stdout).strip().splitlines()
        reason = lines[-1] if lines else f"{command[0]} failed"
        if "busy" in reason.lower():
            held = holders(mountpoint)
            by = ", ".join(f"{pid} ({name}, {how})" for pid, name, how in held[:8])
            if len(held) > 8:
                by += f" and {len(held) - 8} more"
            raise MountError(
                f"{mountpoint} is busy"
                + (f", held by {by}" if by else " (a program is using it)")
                + f": close them and retry, or unmount lazily: vapifs umount -z {mountpoint}"
            )
    raise MountError(f"cannot unmount {mountpoint}: {reason}")
