"""The command line: mount, umount, demo, cache; one-line errors and honest exit codes."""

from __future__ import annotations

import argparse
import os
import re
import stat
import sys
from pathlib import Path

from . import __version__
from .api import DEFAULT_API_URL

EXAMPLES = """\
examples:
  export VAPI_PRIVATE_API_KEY=...            # or: --api-key-file ~/.config/vapifs/key (chmod 600)
  vapifs mount ~/vapi                        # returns once mounted; the daemon runs on
  ls ~/vapi/calls/                           # the last 14 days of calls, newest first
  ffprobe ~/vapi/calls/<call-id>/stereo.wav  # customer left, assistant right
  zgrep -c ERROR ~/vapi/calls/<call-id>/call-logs.jsonl.gz
  vapifs umount ~/vapi
  vapifs demo                                # try it with the embedded fake Vapi: no key needed
  vapifs cache stats                         # what the on-disk cache holds
"""

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'10G', '500M', '1.5g', '4096' -> bytes (binary units)."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 10G, 500M)")
    power = " KMGT".index(match.group(2).upper() or " ")
    return int(float(match.group(1)) * (1024**power))


def parse_duration(text: str) -> float:
    """'60', '60s', '5m', '1h', '1d' -> seconds."""
    match = _DURATION.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (try 30s, 5m, 1d)")
    unit = (match.group(2) or "s").lower()
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[unit]
    return float(match.group(1)) * scale


class UsageError(Exception):
    """Bad options or unusable inputs: one line, exit status 2."""


def read_key(key_file: Path | None) -> str:
    """The private key from --api-key-file (mode 0600 or stricter) or VAPI_PRIVATE_API_KEY."""
    if key_file is not None:
        try:
            fd = os.open(key_file, os.O_RDONLY)
        except OSError as exc:
            raise UsageError(f"cannot read --api-key-file {key_file}: {exc.strerror}") from None
        with os.fdopen(fd, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            if not stat.S_ISREG(mode):
                raise UsageError(f"--api-key-file {key_file} is not a regular file")
            if mode & 0o077:
                raise UsageError(
                    f"--api-key-file {key_file} is readable by others: run chmod 600 {key_file}"
                )
            key = f.read(4096).decode("utf-8", "replace").strip()
        if not key:
            raise UsageError(f"--api-key-file {key_file} is empty")
        return key
    key = os.environ.get("VAPI_PRIVATE_API_KEY", "").strip()
    if not key:
        raise UsageError(
            "no API key: set VAPI_PRIVATE_API_KEY or pass --api-key-file FILE (mode 600)"
        )
    return key


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
        "--api-url",
        default=os.environ.get("VAPI_API_URL", DEFAULT_API_URL),
        metavar="URL",
        help="Vapi API base URL (default: $VAPI_API_URL or %(default)s)",
    )
    m.add_argument(
        "--api-key-file", type=Path, metavar="FILE", help="read the key from FILE (mode 600)"
    )
    add_cache_dir(m)
    m.add_argument(
        "--cache-size",
        type=parse_size,
        default=parse_size("10G"),
        metavar="SIZE",
        help="hard cap on the disk cache, e.g. 10G, 500M (default: 10G)",
    )
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
        help="log here (default: stderr in the foreground, CACHE_DIR/vapifs.log in the background)",
    )
    m.add_argument(
        "--revalidate",
        type=parse_duration,
        default=86400.0,
        metavar="DURATION",
        help="check a cached artifact against the server at most this often (default: 1d)",
    )
    m.add_argument(
        "--dir-ttl",
        type=parse_duration,
        default=60.0,
        metavar="DURATION",
        help="how long a listing of calls/ is reused before asking for new calls (default: 60s)",
    )
    m.add_argument(
        "--days",
        type=float,
        default=14.0,
        metavar="N",
        help="calls/ lists the calls of the last N days (default: 14); any call id resolves",
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
    d.add_argument("--cache-dir", type=Path, metavar="DIR", help="cache (default: a temporary dir)")

    c = sub.add_parser(
        "cache",
        help="inspect or clean the on-disk cache",
        description="stats: what the cache holds; verify: check every block and "
        "drop bad ones; clear: delete every cached block (safe while mounted).",
    )
    c.add_argument("action", choices=["stats", "verify", "clear"])
    add_cache_dir(c)
    return parser


def add_cache_dir(parser: argparse.ArgumentParser) -> None:
    from .mount import default_cache_dir

    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=default_cache_dir(),
        metavar="DIR",
        help="where cached blocks live (default: $XDG_CACHE_HOME/vapifs = %(default)s)",
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "mount":
            return cmd_mount(args)
        if args.command == "umount":
            from .mount import run_umount

            return run_umount(args.mountpoint)
        if args.command == "demo":
            from .demo.tour import run_demo

            return run_demo(args.mountpoint, wait=not args.no_wait, cache_dir=args.cache_dir)
        if args.command == "cache":
            from .cachecmd import run_cache_command

            return run_cache_command(args.action, args.cache_dir)
    except UsageError as exc:
        print(f"vapifs: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from .mount import MountError

        if isinstance(exc, MountError):
            print(f"vapifs: {exc}", file=sys.stderr)
            return 1
        raise
    parser.error(f"unknown command {args.command}")
    return 2


def cmd_mount(args: argparse.Namespace) -> int:
    from .mount import MountOptions, run_mount

    key = read_key(args.api_key_file)
    if not re.match(r"^https?://[^\s/]+", args.api_url):
        raise UsageError(f"--api-url {args.api_url!r} is not an http(s) URL")
    if args.cache_size < (1 << 20):
        raise UsageError("--cache-size must be at least 1M")
    opts = MountOptions(
        mountpoint=args.mountpoint.expanduser().absolute(),
        api_url=args.api_url,
        api_key=key,
        cache_dir=args.cache_dir.expanduser().absolute(),
        cache_size=args.cache_size,
        foreground=args.foreground,
        fuse_options=args.fuse_options,
        debug=args.debug,
        log_file=args.log_file.expanduser().absolute() if args.log_file else None,
        revalidate=args.revalidate,
        dir_ttl=args.dir_ttl,
        window_days=args.days,
        read_timeout=args.read_timeout,
        stall_timeout=args.stall_timeout,
    )
    return run_mount(opts)


if __name__ == "__main__":
    sys.exit(main())
