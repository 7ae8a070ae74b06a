"""The bench's world at run time: files, nginx with secure_link, the fake API, the optional
delay line and TLS; started, checked against the real thing's behaviour, and stopped."""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

from common import API_KEY, BENCH, VENV, BenchError, GiB, MiB, log
from probes import available_memory
from procs import Runner, wait_for
from vapifs.demo.certs import ThrowawayCA
from vapifs.tls import client_context
from world import (
    BIG_NAME,
    HUGE_NAME,
    SIGNED_PREFIX,
    BenchCalls,
    BenchVapi,
    Nginx,
    bench_calls,
    ensure_files,
    secure_link,
)


class Stage:
    """The servers every measure talks to, and the URLs clients reach them by."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rtt: float | None = args.rtt
        self.bench_dir = Path(args.dir)
        self.run_dir = self.bench_dir / "run"
        self.data_dir = self.bench_dir / "data"
        self.runner = Runner(self.run_dir)
        self.secret = secrets.token_hex(16)
        self.fake: BenchVapi | None = None
        self.nginx: Nginx | None = None
        # --tls: nginx and the fake API speak HTTPS with one throwaway CA, which every client
        # (curl, httpx, rclone, vapifs) is told to trust; verification stays on everywhere.
        self.certs = ThrowawayCA("vapifs bench CA") if args.tls else None
        self.verify: Any = True
        self.ca_file = ""
        if self.certs is not None:
            self.ca_file = str(self.certs.ca_file)
            self.verify = client_context(self.certs.ca_file)

    def prepare(self) -> None:
        self._clear_run_dir()
        self._touch_memory()
        self._make_files()
        self._start_nginx()
        self._start_fake()
        if self.rtt is not None:
            self._start_delay_line()
        self.sanity()

    def _clear_run_dir(self) -> None:
        if self.run_dir.exists():
            pids = self.run_dir / "pids"
            for entry in pids.read_text().splitlines() if pids.exists() else []:
                mp = entry.split(" ", 1)[1]
                if mp != "-" and os.path.ismount(mp):
                    subprocess.run(["fusermount3", "-u", "-z", mp], check=False)
            shutil.rmtree(self.run_dir)
        self.run_dir.mkdir(parents=True)
        (self.run_dir / "mnt").mkdir()

    def _touch_memory(self) -> None:
        # A virtual machine may back its memory lazily: the first use of each page then costs
        # a fault in the host (seen here: ~300 MB/s), which would slow down whatever measure
        # happens to allocate fresh page cache first. Touch it once, up front (never more
        # than a third of the memory available).
        gib = min(self.args.touch_memory_gib, available_memory() // (3 * GiB))
        if gib > 0:
            t0 = time.monotonic()
            held = [b"\x01" * GiB for _ in range(gib)]  # all at once
            del held
            log(f"touched {gib} GiB of memory in {time.monotonic() - t0:.1f}s")

    def _make_files(self) -> None:
        log(f"files in {self.data_dir} (created once, reused)")
        t0 = time.monotonic()
        self.files = ensure_files(self.data_dir, self.args.big_mib * MiB, self.args.huge_mib * MiB)
        self.big = self.files[BIG_NAME]
        self.huge = self.files[HUGE_NAME]
        self.big_size = self.big.stat().st_size
        self.huge_size = self.huge.stat().st_size
        log(f"files ready in {time.monotonic() - t0:.1f}s")

    def _start_nginx(self) -> None:
        self.nginx = Nginx(self.run_dir, self.data_dir, self.secret, self.certs)
        nginx = self.runner.start("nginx", self.nginx.command())
        wait_for(lambda: self._http_ok(self.nginx_url_direct() + "/"), 10, "nginx")
        if nginx.popen.poll() is not None:
            raise BenchError(f"nginx died: {self.runner.tail(nginx)}")

    def _start_fake(self) -> None:
        assert self.nginx is not None
        self.world: BenchCalls = bench_calls(self.args.calls)
        storage_base = self.nginx.url
        self.fake = BenchVapi(
            self.world,
            storage_base=storage_base,
            secret=self.secret,
            api_key=API_KEY,
            tls=self.certs,
        )
        self.fake.start()
        self.api_url = self.fake.api_url
        self.storage_url = self.nginx.url

    def _start_delay_line(self) -> None:
        assert self.nginx is not None and self.fake is not None
        cmd = [
            str(VENV / "python"),
            str(BENCH / "delayline.py"),
            "--rtt",
            f"{self.rtt}",
            "--window",
            str(self.args.window),
            "--rate",
            str(self.args.rate),
            f"api={self.fake.api_url.split('://', 1)[1]}",
            f"storage=127.0.0.1:{self.nginx.port}",
        ]
        delay = self.runner.start("delayline", cmd, stdout_pipe=True)
        assert delay.popen.stdout is not None
        ports = json.loads(delay.popen.stdout.readline() or b"{}")
        if "api" not in ports:
            raise BenchError(f"delay line did not start: {self.runner.tail(delay)}")
        scheme = "https" if self.certs else "http"
        self.api_url = f"{scheme}://127.0.0.1:{ports['api']}"
        self.storage_url = f"{scheme}://127.0.0.1:{ports['storage']}"
        self.fake.storage_base = self.storage_url

    def nginx_url_direct(self) -> str:
        assert self.nginx is not None
        return self.nginx.url

    def _http_ok(self, url: str) -> bool:
        try:
            return httpx.get(url, timeout=1.0, verify=self.verify).status_code < 500
        except httpx.HTTPError:
            return False

    def fresh_url(self, call_id: str, kind: str = "stereo") -> str:
        """A fresh signed URL, the way a client gets one: the API's 302."""
        r = httpx.get(
            f"{self.api_url}/call/{call_id}/{'stereo-recording' if kind == 'stereo' else kind}",
            headers={"Authorization": f"Bearer {API_KEY}"},
            follow_redirects=False,
            timeout=30,
            verify=self.verify,
        )
        if r.status_code != 302:
            raise BenchError(f"API answered {r.status_code} instead of 302")
        return r.headers["location"]

    def sanity(self) -> None:
        """The world behaves like the real thing: 206 with ETag, 403 when bad or expired."""
        url = self.fresh_url(self.world.big_id)
        r = httpx.get(url, headers={"Range": "bytes=0-99"}, timeout=30, verify=self.verify)
        ok = r.status_code == 206 and "etag" in r.headers and "last-modified" in r.headers
        if not ok or r.headers.get("content-range") != f"bytes 0-99/{self.big_size}":
            raise BenchError(f"signed range request: {r.status_code} {dict(r.headers)}")
        bad = httpx.get(url.replace("md5=", "md5=x"), timeout=30, verify=self.verify).status_code
        uri = SIGNED_PREFIX + BIG_NAME
        past = int(time.time()) - 10
        old = f"{self.storage_url}{uri}?md5={secure_link(uri, past, self.secret)}&expires={past}"
        expired = httpx.get(old, timeout=30, verify=self.verify).status_code
        if bad != 403 or expired != 403:
            raise BenchError(f"secure_link: bad signature {bad}, expired {expired} (want 403)")
        calls = len(self.world.calls)
        log(f"world ok: nginx {self.storage_url}, API {self.api_url}, {calls} calls")

    def curl_tls(self) -> list[str]:
        return ["--cacert", self.ca_file] if self.ca_file else []

    def close(self) -> None:
        self.runner.stop_all()
        if self.fake is not None:
            self.fake.stop()
        if self.certs is not None:
            self.certs.close()
