"""One bench run: its options, its world and mounts, the results so far and its clock
(bench/run.py drives it; bench/suite.py and bench/many.py measure with it)."""

from __future__ import annotations

import argparse
import time
from typing import Any

from mounts import Mounts
from stage import Stage


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.results: dict[str, Any] = {}
        self.stage = Stage(args)
        self.mounts = Mounts(self.stage, args.rclone_opt, self.results)
        self.started = time.monotonic()

    def prepare(self) -> None:
        self.stage.prepare()

    def close(self) -> None:
        self.stage.close()
