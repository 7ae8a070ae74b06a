"""Defaults every command shares: the API, the revalidation interval, the XDG places."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_API_URL = "https://api.vapi.ai"
# An ended call's artifacts do not change in practice: check each version about once a day.
DEFAULT_REVALIDATE = 86400.0
# The organisation's API limit is not documented: stay well under what a busy org is allowed.
DEFAULT_API_RATE = 10.0  # requests per second
# Requests to the storage host at once: not the API, so not under its rate limit; enough to
# learn many files' sizes ahead of a walk in a few round trips.
DEFAULT_STORAGE_CONNECTIONS = 16

# A file of this name in the mount's root, never listed, reads as `snapshot()` in JSON,
# taken when it is opened. (A file, not an extended attribute: a file system that answers
# getxattr at all is asked for two attributes of every file `ls -l` shows.)
STATS_FILE = ".vapifs-stats"

PAGE_CACHE_NOTE = (
    "re-reads served by the kernel page cache never reach the mount and are not counted"
)


def _xdg(variable: str, *fallback: str) -> Path:
    return Path(os.environ.get(variable) or os.path.join(os.path.expanduser("~"), *fallback))


def default_cache_dir() -> Path:
    return _xdg("XDG_CACHE_HOME", ".cache") / "vapifs"


def default_config_file() -> Path:
    return _xdg("XDG_CONFIG_HOME", ".config") / "vapifs" / "config.toml"


def default_key_file() -> Path:
    """The key of an encrypted cache: with the user's configuration, never inside the cache."""
    return _xdg("XDG_CONFIG_HOME", ".config") / "vapifs" / "cache.key"


def default_log_file() -> Path:
    """Where a background mount logs: with the user's state, apart from the cache (whose
    contents may be encrypted, while log lines name call ids)."""
    return _xdg("XDG_STATE_HOME", ".local", "state") / "vapifs" / "vapifs.log"
