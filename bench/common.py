"""What every bench module shares: the paths, the units, the API key, the log line, the error."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV = REPO / ".venv" / "bin"
BENCH = Path(__file__).resolve().parent
MiB = 1 << 20
GiB = 1 << 30
API_KEY = "bench-private-key"


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


class BenchError(RuntimeError):
    pass
