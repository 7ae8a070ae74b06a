"""The command line: mount, umount, demo, cache; one-line errors and honest exit codes."""

from __future__ import annotations

import argparse
import os
import re
import stat
import sys
import time
from collections.abc import Callable
from datetime import tzinfo
from pathlib import Path
from typing import NoReturn, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from . import __version__, units
from .config import command_names
from .defaults import (
    DEFAULT_API_RATE,
    DEFAULT_API_URL,
    DEFAULT_REVALIDATE,
    DEFAULT_STORAGE_CONNECTIONS,
    default_cache_dir,
    default_config_file,
)

EXAMPLES = """\
examples:
  export VAPI_PRIVATE_API_KEY=...            # or: --api-key-file ~/.config/vapifs/key (chmod 600)
  vapifs mount ~/vapi                        # returns once mounted; the daemon runs on
  ls ~/vapi/calls/                           # the last 14 days of calls, newest first
  ffprobe ~/vapi/calls/<call-id>/stereo.wav  # customer left, assistant right
  grep -c ERROR ~/vapi/calls/<call-id>/call-logs.jsonl   # the logs, decompressed on the fly
  ls ~/vapi/by-date/2026-11-20/              # one day's calls (by-assistant/<id>/ likewise)
  vapifs mount ~/vapi --since 2026-11-01 --until 2026-11-08 --assistant <assistant-id>
  vapifs umount ~/vapi
  vapifs mount --print-config ~/vapi         # options from flags, VAPIFS_*, config.toml
  vapifs demo                                # try it with the embedded fake Vapi: no key needed
  vapifs cache stats                         # what the on-disk cache holds
  vapifs stats ~/vapi                        # a running mount's requests, bytes, hit ratio
  vapifs prefetch --since 2d --artifacts stereo,logs   # warm the cache for offline work
"""

PREFETCH_EXAMPLES = """\
examples:
  vapifs prefetch --since 2d                 # every artifact of the calls of the last 2 days
  vapifs prefetch --since 2025-01-01 --until 2025-01-31 --artifacts stereo,logs
  vapifs prefetch ~/vapi/calls/<call-id>     # one call, through the running mount
  vapifs prefetch <call-id> -j 8             # by id, no mount needed
"""

T = TypeVar("T")


def _argtype(parse: Callable[[str], T]) -> Callable[[str], T]:
    """A parser of `units` as an argparse type: its ValueError becomes argparse's message."""

    def convert(text: str) -> T:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__
    return convert


parse_size = _argtype(units.parse_size)
parse_duration = _argtype(units.parse_duration)


def parse_zone(name: str) -> tzinfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise UsageError(f"--timezone {name!r} is not a known time zone") from None


def parse_when(option: str, text: str, zone: tzinfo) -> units.When:
    """--since/--until, the same for every command (see units.parse_when)."""
    try:
        return units.parse_when(text, zone)
    except ValueError as exc:
        raise UsageError(f"{option}: {exc}") from None


class UsageError(Exception):
    """Bad options or unusable inputs: one line, exit status 2."""


_KEY = re.compile(r"^[\x21-\x7e]+$")  # what an HTTP header carries: printable ASCII, no space


def read_key(key_file: Path | None) -> str:
    """The private key from --api-key-file (mode 0600 or stricter) or VAPI_PRIVATE_API_KEY."""
    if key_file is not None:
        try:
            # O_NONBLOCK: a FIFO or a device given by mistake must not hang the command.
            fd = os.open(key_file, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
        except OSError as exc:
            raise UsageError(f"cannot read --api-key-file {key_file}: {exc.strerror}") from None
        try:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                raise UsageError(f"--api-key-file {key_file} is not a regular file")
            if mode & 0o077:
                raise UsageError(
                    f"--api-key-file {key_file} is readable by others: run chmod 600 {key_file}"
                )
            try:
                raw = os.read(fd, 4096)
            except OSError as exc:
                raise UsageError(f"cannot read --api-key-file {key_file}: {exc.strerror}") from None
        finally:
            os.close(fd)
        key = raw.decode("utf-8", "replace").strip()
        where = f"--api-key-file {key_file}"
        if not key:
            raise UsageError(f"{where} is empty")
    else:
        key = os.environ.get("VAPI_PRIVATE_API_KEY", "").strip()
        where = "VAPI_PRIVATE_API_KEY"
        if not key:
            raise UsageError(
                "no API key: set VAPI_PRIVATE_API_KEY or pass --api-key-file FILE (mode 600)"
            )
    if not _KEY.match(key):
        # Never echo it: say what is wrong, not what it is.
        raise UsageError(f"{where} does not hold one key (spaces, several lines or odd characters)")
    return key


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (the usage is one --help away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"vapifs: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="vapifs",
        description="Vapi call recordings and logs as a read-only file system.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"vapifs {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    m = sub.add_parser(
        "mount",
        help="mount a Vapi organisation's calls",
        description="Mount calls/<id>/{stereo.wav,call-logs.jsonl.gz,...} at MOUNTPOINT. "
        "The key comes from VAPI_PRIVATE_API_KEY or --api-key-file, never from the "
        "command line.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    m.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    m.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="read options from FILE (default: $XDG_CONFIG_HOME/vapifs/config.toml = "
        "~/.config/vapifs/config.toml, if present); keys are the long options, e.g. "
        'cache-size = "20G"; flags beat VAPIFS_<OPTION> variables, which beat the file',
    )
    m.add_argument(
        "--print-config",
        action="store_true",
        help="print the options in effect and where each comes from, then exit",
    )
    add_api_and_cache(m)
    m.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    m.add_argument(
        "-o",
        dest="fuse_options",
        action="append",
        default=[],
        metavar="OPTIONS",
        help="FUSE mount options, comma separated (e.g. allow_other)",
    )
    m.add_argument("-d", "--debug", action="store_true", help="log every step (secrets redacted)")
    m.add_argument(
        "--log-file",
        type=Path,
        metavar="FILE",
        help="log here (default: stderr in the foreground, $XDG_STATE_HOME/vapifs/vapifs.log "
        "= ~/.local/state/vapifs/vapifs.log in the background)",
    )
    m.add_argument(
        "--revalidate",
        type=parse_duration,
        default=DEFAULT_REVALIDATE,
        metavar="DURATION",
        help="check a cached artifact against the server at most this often (default: 1d)",
    )
    m.add_argument(
        "--max-cache-age",
        type=parse_duration,
        metavar="DURATION",
        help="drop cached recordings, logs and call objects older than this, whatever the "
        "server says (checked at start and periodically; default: kept until evicted)",
    )
    m.add_argument(
        "--dir-ttl",
        type=parse_duration,
        default=60.0,
        metavar="DURATION",
        help="how long a listing of calls/ is reused before asking for new calls (default: 60s)",
    )
    m.add_argument(
        "--since",
        metavar="WHEN",
        help="calls/ lists calls created since WHEN: a duration back from now (14d, 36h) or a "
        "date (2026-11-01, or 2026-11-01T08:00) in --timezone (default: 14d); any call id "
        "resolves",
    )
    m.add_argument(
        "--until",
        metavar="WHEN",
        help="list only calls created before WHEN (a duration back from the mount, or a date)",
    )
    m.add_argument(
        "--assistant",
        dest="assistants",
        action="append",
        default=[],
        metavar="ID",
        help="list only the calls of this assistant (repeatable)",
    )
    m.add_argument(
        "--timezone",
        default="UTC",
        metavar="NAME",
        help="time zone of by-date/ and of dates given to --since/--until, e.g. Europe/Paris "
        "(default: UTC)",
    )
    m.add_argument(
        "--read-timeout",
        type=parse_duration,
        default=30.0,
        metavar="DURATION",
        help="a read that the network cannot serve within this time fails with EIO (default: 30s)",
    )
    m.add_argument(
        "--stall-timeout",
        type=parse_duration,
        default=10.0,
        metavar="DURATION",
        help="abandon a connection silent for this long and retry (default: 10s)",
    )

    u = sub.add_parser("umount", help="unmount a vapifs mount", description="Unmount MOUNTPOINT.")
    u.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    u.add_argument(
        "-z",
        "--lazy",
        action="store_true",
        help="detach at once even if files are open; the mount ends when they are closed",
    )

    d = sub.add_parser(
        "demo",
        help="mount the embedded fake Vapi (synthetic calls, no key needed) and show a tour",
        description="Start the embedded fake Vapi, mount it at MOUNTPOINT (default ./vapi-demo) "
        "and show a short tour. Stays mounted until Ctrl-C when run from a terminal.",
    )
    d.add_argument(
        "mountpoint", type=Path, nargs="?", default=Path("vapi-demo"), metavar="MOUNTPOINT"
    )
    d.add_argument("--no-wait", action="store_true", help="unmount right after the tour")
    d.add_argument(
        "--tls",
        action="store_true",
        help="serve the fake over HTTPS, with a throwaway CA the mount is told to trust",
    )
    d.add_argument("--cache-dir", type=Path, metavar="DIR", help="cache (default: a temporary dir)")

    c = sub.add_parser(
        "cache",
        help="inspect or clean the on-disk cache",
        description="stats: what the cache holds; verify: check every block and "
        "drop bad ones; clear: delete every cached block (safe while mounted).",
    )
    c.add_argument("action", choices=["stats", "verify", "clear"])
    add_cache_dir(c)
    c.add_argument(
        "--cache-key-file",
        type=Path,
        metavar="FILE",
        help="the key of an encrypted cache, for verify (default: $XDG_CONFIG_HOME/vapifs/"
        "cache.key)",
    )

    st = sub.add_parser(
        "stats",
        help="live figures of a running mount: requests, bytes by source, hit ratio, cache",
        description="Print a running mount's figures since it started: API requests by kind, "
        "storage GETs, signed-URL resolutions, bytes from the network, the disk cache and "
        "memory, hit ratio, open files, errors, cache fill and uptime. Re-reads served by the "
        "kernel page cache never reach the mount and are not counted.",
    )
    st.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    st.add_argument("--json", action="store_true", help="one JSON document instead of a table")

    pf = sub.add_parser(
        "prefetch",
        help="warm the cache with calls' recordings and logs, in parallel and resumably",
        description="Fetch artifacts into the cache so that later reads need no network.\n"
        "PATHs are call ids, calls/<id>[/<file>], or paths inside a vapifs mount; --since\n"
        "selects the calls created in a window. When a running mount uses the same cache\n"
        "dir, everything is read through that mount; otherwise prefetch fetches by itself\n"
        "(the key comes from VAPI_PRIVATE_API_KEY or --api-key-file, as for mount). Blocks\n"
        "already cached cost nothing, so an interrupted run can simply be started again.",
        epilog=PREFETCH_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pf.add_argument("paths", type=Path, nargs="*", metavar="PATH")
    pf.add_argument(
        "--since",
        metavar="WHEN",
        help="calls created since WHEN: a duration ago (2d, 12h) or a date/time (2025-01-31) "
        "in --timezone",
    )
    pf.add_argument("--until", metavar="WHEN", help="... and until WHEN (default: now)")
    pf.add_argument(
        "--timezone",
        default="UTC",
        metavar="NAME",
        help="time zone of dates given to --since/--until, as for mount (default: UTC)",
    )
    pf.add_argument(
        "--artifacts",
        default="all",
        metavar="LIST",
        help="which artifacts, comma separated: mono,stereo,customer,assistant,video,logs,pcap "
        "(default: all)",
    )
    pf.add_argument(
        "-j", "--jobs", type=int, default=4, metavar="N", help="files fetched at once (default: 4)"
    )
    pf.add_argument("--json", action="store_true", help="print the totals as JSON")
    add_api_and_cache(pf)
    return parser


def add_api_and_cache(parser: argparse.ArgumentParser) -> None:
    """The options of every command that talks to the API and fills the cache (mount and
    prefetch): one declaration, so that they mean the same and agree on the same cache."""
    parser.add_argument(
        "--api-url",
        default=os.environ.get("VAPI_API_URL", DEFAULT_API_URL),
        metavar="URL",
        help="Vapi API base URL (default: $VAPI_API_URL or %(default)s)",
    )
    parser.add_argument(
        "--api-key-file", type=Path, metavar="FILE", help="read the key from FILE (mode 600)"
    )
    add_ca_file(parser)
    add_cache_dir(parser)
    add_cache_encryption(parser)
    parser.add_argument(
        "--cache-size",
        type=parse_size,
        default=parse_size("10G"),
        metavar="SIZE",
        help="hard cap on the disk cache, e.g. 10G, 500M (default: 10G)",
    )
    add_network_limits(parser)


def api_url(args: argparse.Namespace) -> str:
    if not re.match(r"^https?://[^\s/]+", args.api_url):
        raise UsageError(f"--api-url {args.api_url!r} is not an http(s) URL")
    return str(args.api_url)


def add_ca_file(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ca-file",
        type=Path,
        metavar="FILE",
        help="also trust the CA certificates in this PEM file (a proxy's or a private CA), "
        "besides the system's and $SSL_CERT_FILE; certificates are always verified",
    )


def ca_file(args: argparse.Namespace) -> Path | None:
    """--ca-file as an absolute path, once it and $SSL_CERT_FILE are known to be usable."""
    from .tls import TrustError, client_context

    path = args.ca_file.expanduser().absolute() if args.ca_file else None
    try:
        client_context(path)
    except TrustError as exc:
        raise UsageError(str(exc)) from None
    return path


def _positive(kind: type[int] | type[float]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be more than 0: {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


def add_network_limits(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--api-rate",
        type=_positive(float),
        default=DEFAULT_API_RATE,
        metavar="N",
        help="API requests per second at most, for everything this process does; a 429 slows "
        f"it down further for a while (default: {DEFAULT_API_RATE:g})",
    )
    parser.add_argument(
        "--storage-connections",
        type=_positive(int),
        default=DEFAULT_STORAGE_CONNECTIONS,
        metavar="N",
        help="requests to the storage host at once; they are not API requests and do not "
        f"count against --api-rate (default: {DEFAULT_STORAGE_CONNECTIONS})",
    )


def add_cache_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=default_cache_dir(),
        metavar="DIR",
        help="where cached blocks live (default: $XDG_CACHE_HOME/vapifs = %(default)s)",
    )


def add_cache_encryption(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--encrypt-cache",
        action="store_true",
        help="encrypt cached blocks and metadata (AES-256-GCM) with the key in --cache-key-file",
    )
    parser.add_argument(
        "--cache-key-file",
        type=Path,
        metavar="FILE",
        help="the cache key, mode 600, made on first use (default: $XDG_CONFIG_HOME/vapifs/"
        "cache.key = ~/.config/vapifs/cache.key)",
    )


def cache_key_file(args: argparse.Namespace) -> Path | None:
    if args.cache_key_file is not None and not args.encrypt_cache:
        raise UsageError("--cache-key-file goes with --encrypt-cache")
    return args.cache_key_file.expanduser().absolute() if args.cache_key_file else None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if argv and not argv[0].startswith("-") and argv[0] not in command_names(parser):
        return mount_helper(argv, parser)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "mount":
            return cmd_mount_configured(args, argv, parser)
        if args.command == "umount":
            from .mount import run_umount

            return run_umount(args.mountpoint, lazy=args.lazy)
        if args.command == "demo":
            from .demo.tour import run_demo

            return run_demo(
                args.mountpoint, wait=not args.no_wait, cache_dir=args.cache_dir, tls=args.tls
            )
        if args.command in ("cache", "prefetch"):
            shared_options(args, argv, parser)
        if args.command == "cache":
            from .cachecmd import run_cache_command

            key_file = args.cache_key_file.expanduser() if args.cache_key_file else None
            return run_cache_command(args.action, args.cache_dir, key_file)
        if args.command == "stats":
            from .statscmd import run_stats

            return run_stats(args.mountpoint, args.json)
        if args.command == "prefetch":
            return cmd_prefetch(args)
    except UsageError as exc:
        print(f"vapifs: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from .crypto import CacheKeyError
        from .mount import MountError

        if isinstance(exc, (MountError, CacheKeyError)):
            print(f"vapifs: {exc}", file=sys.stderr)
            return 1
        raise
    parser.error(f"unknown command {args.command}")
    return 2


def mount_helper(argv: list[str], parser: argparse.ArgumentParser) -> int:
    """`vapifs SOURCE MOUNTPOINT -o OPTIONS`: what mount.fuse3 runs for mount -t fuse.vapifs
    and fstab. Mounts in the background; 0 once the mount answers, else 1 and one line."""
    from .config import ConfigError, helper_argv, subparser

    try:
        translated = helper_argv(argv, subparser(parser, "mount"))
    except ConfigError as exc:
        print(f"vapifs: {exc}", file=sys.stderr)
        return 1
    if translated is None:
        parser.parse_args(argv)  # not that form either: argparse says what is wrong
        return 2
    # mount(8) clears HOME and mount.fuse3 sets /root: a user's mount reads its own config.
    if not os.environ.get("HOME") or (os.getuid() != 0 and os.environ["HOME"] == "/root"):
        import pwd

        os.environ["HOME"] = pwd.getpwuid(os.getuid()).pw_dir
    # mount(8) waits for its helper: the daemon, whatever the config file says.
    if "--foreground" not in translated:
        os.environ["VAPIFS_FOREGROUND"] = "0"
    try:
        code = main(translated)
    except SystemExit as exc:
        code = 1 if exc.code else 0
    return 0 if code == 0 else 1


def flags_given(argv: list[str], command: str) -> set[str]:
    """The options `command` was given on its command line (parsed again with no defaults)."""
    from .config import subparser

    bare = build_parser()
    for action in subparser(bare, command)._actions:
        action.default = argparse.SUPPRESS
    return set(vars(bare.parse_args(argv)))


def config_file(flag: Path | None) -> tuple[Path, bool]:
    """The config file to read (--config, else $VAPIFS_CONFIG, else the default) and whether
    it was named explicitly (then it must exist)."""
    variable = os.environ.get("VAPIFS_CONFIG", "").strip()
    path = flag or Path(variable or default_config_file())
    return path.expanduser(), flag is not None or bool(variable)


def shared_options(
    args: argparse.Namespace, argv: list[str], parser: argparse.ArgumentParser
) -> None:
    """Options a command shares with mount (cache dir, API, keys) from env and config file."""
    from .config import ConfigError, resolve_shared, subparser

    given = flags_given(argv, args.command)
    path, explicit = config_file(None)
    try:
        resolve_shared(
            args,
            subparser(parser, args.command),
            subparser(parser, "mount"),
            given,
            os.environ,
            path,
            explicit,
        )
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


def cmd_mount_configured(
    args: argparse.Namespace, argv: list[str], parser: argparse.ArgumentParser
) -> int:
    """cmd_mount after VAPIFS_* variables and the config file filled what flags left unset."""
    from .config import ConfigError, blame, print_config, resolve, subparser

    given = flags_given(argv, "mount")
    path, explicit = config_file(args.config)
    try:
        settings = resolve(args, subparser(parser, "mount"), given, os.environ, path, explicit)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    if args.print_config:
        if args.api_key_file is not None:
            where = f"read from the file named by api-key-file ({args.api_key_file})"
        elif os.environ.get("VAPI_PRIVATE_API_KEY", "").strip():
            where = "from VAPI_PRIVATE_API_KEY (set)"
        else:
            where = "none yet: set VAPI_PRIVATE_API_KEY or api-key-file"
        print_config(args, settings, path, path.is_file(), where, sys.stdout)
        return 0
    try:
        return cmd_mount(args)
    except UsageError as exc:
        raise UsageError(blame(str(exc), settings)) from None


def cmd_mount(args: argparse.Namespace) -> int:
    from .mount import MountError, MountOptions, fuse_options, run_mount

    key = read_key(args.api_key_file)
    for option in ("read_timeout", "stall_timeout", "max_cache_age"):
        if getattr(args, option) is not None and getattr(args, option) <= 0:
            raise UsageError(f"--{option.replace('_', '-')} must be longer than 0s")
    url = api_url(args)
    if args.cache_size < (1 << 20):
        raise UsageError("--cache-size must be at least 1M")
    zone = parse_zone(args.timezone)
    now = time.time()
    start = parse_when("--since", args.since or "14d", zone)
    window, since = start.back, start.instant
    until = parse_when("--until", args.until, zone).at(now) if args.until is not None else None
    if until is not None and since is not None and until <= since:
        raise UsageError("--until must be later than --since")
    if any(not a.strip() for a in args.assistants):
        raise UsageError("--assistant needs an assistant id")
    try:
        fuse = fuse_options(args.fuse_options)  # a bad -o is a usage error, found at once
    except MountError as exc:
        raise UsageError(str(exc)) from None
    opts = MountOptions(
        fuse=fuse,
        mountpoint=args.mountpoint.expanduser().absolute(),
        api_url=url,
        api_key=key,
        cache_dir=args.cache_dir.expanduser().absolute(),
        cache_size=args.cache_size,
        foreground=args.foreground,
        debug=args.debug,
        log_file=args.log_file.expanduser().absolute() if args.log_file else None,
        revalidate=args.revalidate,
        max_cache_age=args.max_cache_age,
        dir_ttl=args.dir_ttl,
        window_days=window / 86400.0 if window is not None else 14.0,
        since=since,
        until=until,
        assistants=list(args.assistants),
        timezone=args.timezone,
        read_timeout=args.read_timeout,
        stall_timeout=args.stall_timeout,
        api_rate=args.api_rate,
        storage_connections=args.storage_connections,
        encrypt_cache=args.encrypt_cache,
        cache_key_file=cache_key_file(args),
        ca_file=ca_file(args),
    )
    return run_mount(opts)


def cmd_prefetch(args: argparse.Namespace) -> int:
    from .prefetch import KINDS, PrefetchOptions, parse_kinds, run_prefetch

    if not args.paths and args.since is None:
        raise UsageError("prefetch needs PATHs or --since (e.g. vapifs prefetch --since 2d)")
    if args.until is not None and args.since is None:
        raise UsageError("--until needs --since")
    if args.jobs < 1:
        raise UsageError("--jobs must be at least 1")
    url = api_url(args)
    zone = parse_zone(args.timezone)
    now = time.time()
    since = parse_when("--since", args.since, zone).at(now) if args.since is not None else None
    until = parse_when("--until", args.until, zone).at(now) if args.until is not None else None
    if until is not None and since is not None and until <= since:
        raise UsageError("--until must be later than --since")
    try:
        kinds = frozenset(KINDS) if args.artifacts == "all" else parse_kinds(args.artifacts)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    opts = PrefetchOptions(
        paths=[p.expanduser() for p in args.paths],
        since=since,
        until=until,
        kinds=kinds,
        cache_dir=args.cache_dir.expanduser().absolute(),
        cache_size=args.cache_size,
        jobs=args.jobs,
        api_url=url,
        key=lambda: read_key(args.api_key_file),
        progress=sys.stderr.isatty(),
        api_rate=args.api_rate,
        storage_connections=args.storage_connections,
        encrypt_cache=args.encrypt_cache,
        cache_key_file=cache_key_file(args),
        ca_file=ca_file(args),
    )
    return run_prefetch(opts, as_json=args.json)


if __name__ == "__main__":
    sys.exit(main())
