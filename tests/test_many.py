"""Real mounts: many calls at once, inside the API's rate limit, with read-ahead across files."""

from __future__ import annotations

import gzip
import os
import subprocess
import threading
from pathlib import Path

import pytest

from vapifs.demo.data import generate_calls
from vapifs.demo.server import FakeVapi

from .conftest import VAPIFS, MountFactory

pytestmark = pytest.mark.mount


def test_ls_zgrep_and_prefetch_together_stay_under_the_rate_limit(
    mount_factory: MountFactory, tmp_path: Path
) -> None:
    # Signed URLs too short-lived to keep: every artifact costs a resolve, all of them API
    # requests, against an org limit of 20 a second.
    with FakeVapi(generate_calls(count=24, seed=5)) as fake:
        fake.set_knobs(url_ttl=3.0, api_rate_limit=20.0)
        m = mount_factory("--api-rate", "15", server=fake, cache_dir=tmp_path / "c", name="rl")
        fake.reset_counters()
        env = dict(os.environ, VAPI_PRIVATE_API_KEY=fake.api_key)
        ls = f"ls -l {m.calls}/*/ | grep -c '^-'"
        zgrep = f"zgrep -c INFO {m.calls}/*/call-logs.jsonl.gz"
        prefetch = [*VAPIFS, "prefetch", "--since", "30d", "--cache-dir", str(m.cache_dir)]
        results: dict[str, subprocess.CompletedProcess[str]] = {}

        def run(name: str, cmd: list[str]) -> None:
            results[name] = subprocess.run(
                cmd, capture_output=True, text=True, timeout=120, env=env
            )

        threads = [
            threading.Thread(target=run, args=("ls", ["bash", "-c", ls])),
            threading.Thread(target=run, args=("zgrep", ["bash", "-c", zgrep])),
            threading.Thread(target=run, args=("prefetch", prefetch)),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for name, result in results.items():
            assert result.returncode == 0, (name, result.stderr)
            assert result.stderr == "", (name, result.stderr)
        listed = set(os.listdir(m.calls))
        with_logs = [i for i in listed if "logs" in fake.calls[i].artifacts]
        lines = results["zgrep"].stdout.splitlines()
        assert len(lines) == len(with_logs)
        for line in lines:
            path, count = line.rsplit(":", 1)
            call_id = Path(path).parent.name
            text = gzip.decompress(fake.calls[call_id].artifacts["logs"]).decode()
            assert int(count) == sum("INFO" in x for x in text.splitlines())
        counts = fake.counters()
        sent, refused = counts["api.requests"], counts.get("fault.api_429", 0)
        assert counts["api.resolve"] > 60  # the limit was really in play
        assert refused <= 0.02 * sent, (refused, sent)
        assert "429" not in m.log_text() and "gave up" not in m.log_text()
        m.stop()
