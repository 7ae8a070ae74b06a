"""The bench's world and its measures: nginx, the fake API, the mounts, and the default
workloads (bench/run.py runs them; bench/many.py adds the walks across every call)."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from vapifs.demo.certs import ThrowawayCA
from vapifs.tls import client_context
from world import (
    BIG_NAME,
    HUGE_NAME,
    OPEN_PREFIX,
    SIGNED_PREFIX,
    BenchVapi,
    Nginx,
    bench_calls,
    ensure_files,
    secure_link,
)

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


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    mountpoint: Path | None = None
    read_ahead_kib: int = 0


@dataclass
class Runner:
    """Starts processes in their own sessions and stops every one of them at the end."""

    run_dir: Path
    procs: list[Proc] = field(default_factory=list)

    def start(
        self,
        name: str,
        cmd: list[str],
        *,
        env: dict[str, str] | None = None,
        mountpoint: Path | None = None,
        stdout_pipe: bool = False,
    ) -> Proc:
        out = self.run_dir / f"{name}.out"
        with open(out, "ab") as sink:
            popen = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if stdout_pipe else sink,
                stderr=sink,
                env=env,
                start_new_session=True,  # a Ctrl-C reaches us, and we stop them in order
            )
        with open(self.run_dir / "pids", "a") as f:
            f.write(f"{popen.pid} {mountpoint or '-'}\n")
        proc = Proc(name, popen, mountpoint)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc, timeout: float = 20.0) -> None:
        if proc.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.popen.send_signal(signal.SIGTERM)
            try:
                proc.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"{proc.name} did not stop on SIGTERM: killing it")
                proc.popen.kill()
                proc.popen.wait(5)
        if proc.mountpoint is not None and os.path.ismount(proc.mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(proc.mountpoint)], check=False)
        if proc.popen.stdout is not None:
            proc.popen.stdout.close()
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        # Mounts first (they talk to the servers), then everything else, newest first.
        for proc in sorted(reversed(self.procs), key=lambda p: p.mountpoint is None):
            try:
                self.stop(proc)
            except Exception as exc:  # keep stopping the others
                log(f"stopping {proc.name}: {exc}")

    def tail(self, proc: Proc, lines: int = 15) -> str:
        try:
            text = (self.run_dir / f"{proc.name}.out").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def wait_for(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out waiting for {what}")
        time.sleep(0.05)


def read_all(path: Path, timeout: float = 300.0) -> float:
    """Seconds `dd bs=1M` takes to read path to /dev/null."""
    t0 = time.perf_counter()
    res = subprocess.run(
        ["dd", f"if={path}", "of=/dev/null", "bs=1M"],
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    seconds = time.perf_counter() - t0
    if res.returncode != 0:
        raise BenchError(f"dd {path}: {res.stderr.decode(errors='replace').strip()}")
    return seconds


def first_byte(path: Path) -> float:
    """Seconds from open() to the first byte read (lookups included)."""
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        if not os.read(fd, 1):
            raise BenchError(f"{path}: empty")
        return time.perf_counter() - t0
    finally:
        os.close(fd)


def random_reads(path: Path, offsets: list[int], size: int) -> float:
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        for off in offsets:
            if len(os.pread(fd, size, off)) != size:
                raise BenchError(f"{path}: short read at {off}")
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def available_memory() -> int:
    """Bytes of memory available (MemAvailable), 0 when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def vm_hwm_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def read_ahead_kib(mountpoint: Path) -> int:
    dev = os.stat(mountpoint).st_dev
    try:
        with open(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 0


def mb_s(size: int, seconds: float) -> float:
    return size / seconds / 1e6 if seconds > 0 else 0.0


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rtt: float | None = args.rtt
        self.bench_dir = Path(args.dir)
        self.run_dir = self.bench_dir / "run"
        self.data_dir = self.bench_dir / "data"
        self.runner = Runner(self.run_dir)
        self.results: dict[str, Any] = {}
        self.secret = secrets.token_hex(16)
        self.fake: BenchVapi | None = None
        self.nginx: Nginx | None = None
        self.started = time.monotonic()
        self.mount_seq = 0
        # --tls: nginx and the fake API speak HTTPS with one throwaway CA, which every client
        # (curl, httpx, rclone, vapifs) is told to trust; verification stays on everywhere.
        self.certs = ThrowawayCA("vapifs bench CA") if args.tls else None
        self.verify: Any = True
        self.ca_file = ""
        if self.certs is not None:
            self.ca_file = str(self.certs.ca_file)
            self.verify = client_context(self.certs.ca_file)

    # ------------------------------------------------------------ world

    def prepare(self) -> None:
        if self.run_dir.exists():
            pids = self.run_dir / "pids"
            for entry in pids.read_text().splitlines() if pids.exists() else []:
                mp = entry.split(" ", 1)[1]
                if mp != "-" and os.path.ismount(mp):
                    subprocess.run(["fusermount3", "-u", "-z", mp], check=False)
            shutil.rmtree(self.run_dir)
        self.run_dir.mkdir(parents=True)
        (self.run_dir / "mnt").mkdir()
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
        log(f"files in {self.data_dir} (created once, reused)")
        t0 = time.monotonic()
        self.files = ensure_files(self.data_dir, self.args.big_mib * MiB, self.args.huge_mib * MiB)
        self.big = self.files[BIG_NAME]
        self.huge = self.files[HUGE_NAME]
        self.big_size = self.big.stat().st_size
        self.huge_size = self.huge.stat().st_size
        log(f"files ready in {time.monotonic() - t0:.1f}s")

        self.nginx = Nginx(self.run_dir, self.data_dir, self.secret, self.certs)
        nginx = self.runner.start("nginx", self.nginx.command())
        wait_for(lambda: self._http_ok(self.nginx_url_direct() + "/"), 10, "nginx")
        if nginx.popen.poll() is not None:
            raise BenchError(f"nginx died: {self.runner.tail(nginx)}")

        self.world = bench_calls(self.args.calls)
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
        if self.rtt is not None:
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
        self.sanity()

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

    # ------------------------------------------------------------ mounts

    def _mp(self, name: str) -> Path:
        self.mount_seq += 1
        mp = self.run_dir / "mnt" / f"{self.mount_seq:02d}-{name}"
        mp.mkdir()
        return mp

    def mount_vapifs(self, name: str, cache: Path) -> Proc:
        mp = self._mp(name)
        env = dict(os.environ, VAPI_PRIVATE_API_KEY=API_KEY)
        env.pop("VAPI_API_URL", None)
        cmd = [
            str(VENV / "vapifs"),
            "mount",
            str(mp),
            "-f",
            "--api-url",
            self.api_url,
            "--cache-dir",
            str(cache),
            "--since",
            "30d",
            *(["--ca-file", self.ca_file] if self.ca_file else []),
        ]
        proc = self.runner.start(f"vapifs-{self.mount_seq:02d}-{name}", cmd, env=env, mountpoint=mp)
        self._wait_mounted(proc)
        return proc

    def mount_rclone(self, name: str, cache: Path) -> Proc:
        mp = self._mp(name)
        cmd = [
            "rclone",
            "mount",
            ":http:",
            str(mp),
            "--http-url",
            self.storage_url + OPEN_PREFIX,
            "--read-only",
            "--vfs-cache-mode",
            "full",
            "--cache-dir",
            str(cache),
            "--config",
            "/dev/null",
            *(["--ca-cert", self.ca_file] if self.ca_file else []),
            *self.args.rclone_opt,
        ]
        proc = self.runner.start(f"rclone-{self.mount_seq:02d}-{name}", cmd, mountpoint=mp)
        self._wait_mounted(proc)
        return proc

    def _wait_mounted(self, proc: Proc) -> None:
        assert proc.mountpoint is not None
        mp = proc.mountpoint

        def up() -> bool:
            if proc.popen.poll() is not None:
                raise BenchError(f"{proc.name} exited: {self.runner.tail(proc)}")
            return os.path.ismount(mp)

        wait_for(up, 60, f"{proc.name} to mount")
        if not proc.name.startswith("rclone"):
            # vapifs (and the ceiling, like it) raise the mount's read-ahead once mounted:
            # measuring before that would measure the kernel default instead.
            with contextlib.suppress(BenchError):
                wait_for(lambda: read_ahead_kib(mp) >= 4096, 5, "read-ahead")
        proc.read_ahead_kib = read_ahead_kib(mp)
        kinds = self.results.setdefault("read_ahead_kib", {})
        kinds[proc.name.split("-")[0]] = proc.read_ahead_kib

    def call_file(self, mount: Proc, call_id: str) -> Path:
        assert mount.mountpoint is not None
        return mount.mountpoint / "calls" / call_id / "stereo.wav"

    # ------------------------------------------------------------ counting

    @contextlib.contextmanager
    def counting(self, into: dict[str, Any], prefix: str = SIGNED_PREFIX) -> Iterator[None]:
        """Storage requests/bytes (nginx's log) and API requests made inside the block."""
        assert self.nginx is not None and self.fake is not None
        offset = self.nginx.log_offset()
        self.fake.reset_counters()
        try:
            yield
        finally:
            time.sleep(0.05)  # nginx logs after the response
            into["storage_requests"], into["storage_bytes"] = self.nginx.requests_since(
                offset, prefix
            )
            c = self.fake.counters()
            into["api_requests"] = c.get("api.requests", 0)
            into["api_resolves"] = c.get("api.resolve", 0)
            # New connections, each a full TLS handshake with --tls (no client here resumes
            # sessions): what reusing connections saves, two round trips apiece on a link.
            into["api_connections"] = c.get("api.connections", 0)
            into["storage_connections"] = self.nginx.connections_since(offset)

    def curl_tls(self) -> list[str]:
        return ["--cacert", self.ca_file] if self.ca_file else []

    def cache_dir(self, name: str) -> Path:
        return self.run_dir / "cache" / name

    def fresh_cache(self, name: str) -> Path:
        path = self.cache_dir(name)
        shutil.rmtree(path, ignore_errors=True)
        return path

    # ------------------------------------------------------------ measurements

    def measure(self) -> None:
        r = self.results
        n = self.args.repeat
        big, size = self.big, self.big_size

        log("page cache: reading the source file twice")
        times = [read_all(big) for _ in range(max(2, n))]
        r["page_cache"] = {"mb_s": mb_s(size, min(times[1:])), "first_mb_s": mb_s(size, times[0])}

        log("wire: curl on fresh signed URLs")
        speeds, ttfbs = [], []
        for _ in range(n):
            url = self.fresh_url(self.world.big_id)
            got, took, _ = subprocess.run(
                [
                    "curl",
                    *self.curl_tls(),
                    "-sS",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{size_download} %{time_total} %{num_connects}",
                    url,
                ],
                capture_output=True,
                text=True,
                timeout=600,
                check=True,
            ).stdout.split()
            if int(got) != size:
                raise BenchError(f"curl fetched {got} bytes, not {size}")
            speeds.append(mb_s(size, float(took)))
            # Time to first byte the way a client sees it: API 302, then storage.
            api = f"{self.api_url}/call/{self.world.big_id}/stereo-recording"
            ttfb, connects = subprocess.run(
                [
                    "curl",
                    *self.curl_tls(),
                    "-sS",
                    "-L",
                    "-o",
                    "/dev/null",
                    "-r",
                    "0-0",
                    "-H",
                    f"Authorization: Bearer {API_KEY}",
                    "-w",
                    "%{time_starttransfer} %{num_connects}",
                    api,
                ],
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            ).stdout.split()
            ttfbs.append(float(ttfb))
        r["curl"] = {
            "mb_s": statistics.median(speeds),
            "ttfb_s": statistics.median(ttfbs),
            "ttfb_connections": int(connects),  # the API's and storage's
        }

        log("HTTP ceiling: httpx on trio, 8 MiB ranges")
        runs = []
        for _ in range(n):
            out = subprocess.run(
                [
                    str(VENV / "python"),
                    str(BENCH / "http_ceiling.py"),
                    self.fresh_url(self.world.big_id),
                ],
                env=dict(os.environ, SSL_CERT_FILE=self.ca_file) if self.ca_file else None,
                capture_output=True,
                text=True,
                timeout=600,
                check=True,
            ).stdout
            runs.append(json.loads(out))
        r["http_ceiling"] = {"mb_s": statistics.median(x["mb_s"] for x in runs)}

        # Every cold figure (the FUSE ceiling's, vapifs's, rclone's) is the median of `n`
        # first reads, each on a new mount with a new cache: one read alone swings a lot.
        log(f"FUSE ceiling: pyfuse3 serving the file from memory, {n} mounts")
        colds, warm = [], math.inf
        for i in range(n):
            mp = self._mp("fuse-ceiling")
            fc = self.runner.start(
                "fuse-ceiling",
                [str(VENV / "python"), str(BENCH / "fuse_ceiling.py"), str(big), str(mp)],
                mountpoint=mp,
            )
            self._wait_mounted(fc)
            target = mp / big.name
            colds.append(read_all(target))
            if i == 0:
                warm = min(read_all(target) for _ in range(max(1, n - 1)))
            self.runner.stop(fc)
        cold = statistics.median(colds)
        r["fuse_ceiling"] = {"cold_mb_s": mb_s(size, cold), "warm_mb_s": mb_s(size, warm)}

        log(f"vapifs: cold ({n} new mounts and caches), warm")
        v: dict[str, Any] = {}
        r["vapifs"] = v
        cache = self.fresh_cache("vapifs-main")
        m = self.mount_vapifs("cold", cache)
        path = self.call_file(m, self.world.big_id)
        cold_counts: dict[str, Any] = {}
        with self.counting(cold_counts):
            colds = [read_all(path)]
        warm = min(read_all(path) for _ in range(max(1, n - 1)))
        self.runner.stop(m)
        for _ in range(n - 1):
            extra = self.fresh_cache("vapifs-cold-again")
            m = self.mount_vapifs("cold-again", extra)
            colds.append(read_all(self.call_file(m, self.world.big_id)))
            self.runner.stop(m)
            shutil.rmtree(extra, ignore_errors=True)
        cold = statistics.median(colds)
        v["cold_mb_s"], v["warm_mb_s"], v["cold"] = mb_s(size, cold), mb_s(size, warm), cold_counts
        v["cold_runs_mb_s"] = [mb_s(size, t) for t in colds]

        log(f"vapifs: after a remount (disk cache), {n} new mounts")
        remount_counts: dict[str, Any] = {}
        agains = []
        for i in range(n):
            m = self.mount_vapifs("remount", cache)
            path = self.call_file(m, self.world.big_id)
            counts: dict[str, Any] = {}
            with self.counting(counts):
                agains.append(read_all(path))
            self.runner.stop(m)
            if i == 0:
                remount_counts = counts
            else:  # every remount must make zero requests, not only the first
                for name in ("storage_requests", "api_requests"):
                    remount_counts[name] = max(remount_counts[name], counts[name])
        again = statistics.median(agains)
        v["remount_mb_s"], v["remount"] = mb_s(size, again), remount_counts
        v["remount_runs_mb_s"] = [mb_s(size, t) for t in agains]

        log(f"vapifs: first byte and peak RSS streaming {self.huge_size / MiB:.0f} MiB cold")
        cache = self.fresh_cache("vapifs-huge")
        m = self.mount_vapifs("huge", cache)
        path = self.call_file(m, self.world.huge_id)
        pid = m.popen.pid
        rss_before = vm_hwm_kib(pid)
        ttfb_counts: dict[str, Any] = {}
        with self.counting(ttfb_counts):
            v["ttfb_s"] = first_byte(path)
        v["ttfb"] = ttfb_counts
        t = read_all(path, timeout=900)
        v["huge_cold_mb_s"] = mb_s(self.huge_size, t)
        v["rss_after_mount_mib"] = rss_before / 1024
        v["peak_rss_mib"] = vm_hwm_kib(pid) / 1024
        self.runner.stop(m)
        shutil.rmtree(cache, ignore_errors=True)

        rng = random.Random(self.args.seed)
        read_size = 64 * 1024
        offsets = [rng.randrange(0, size - read_size) for _ in range(self.args.random_reads)]
        log(f"vapifs: {len(offsets)} random 64 KiB reads, cold, {n} new mounts and caches")
        rand_runs: list[float] = []
        rand_counts: dict[str, Any] = {}
        for _ in range(n):
            m = self.mount_vapifs("random", self.fresh_cache("vapifs-random"))
            path = self.call_file(m, self.world.big_id)
            os.stat(path)  # the size is known before the clock starts, as for rclone
            counts = {}
            with self.counting(counts):
                rand_runs.append(random_reads(path, offsets, read_size))
            rand_counts = rand_counts or counts
            self.runner.stop(m)
        v["random_s"] = statistics.median(rand_runs)
        v["random"], v["random_runs_s"] = rand_counts, rand_runs

        if shutil.which("rclone"):
            self.measure_rclone(offsets, read_size)
        self.measure_ls()

    def measure_rclone(self, offsets: list[int], read_size: int) -> None:
        big, size = self.big, self.big_size
        rc: dict[str, Any] = {}
        self.results["rclone"] = rc
        log("rclone: first byte, cold, warm")
        m = self.mount_rclone("cold", self.fresh_cache("rclone-main"))
        assert m.mountpoint is not None
        rc["ttfb_s"] = first_byte(m.mountpoint / HUGE_NAME)
        path = m.mountpoint / big.name
        counts: dict[str, Any] = {}
        with self.counting(counts, OPEN_PREFIX):
            colds = [read_all(path)]
        warm = min(read_all(path) for _ in range(max(1, self.args.repeat - 1)))
        self.runner.stop(m)
        for _ in range(self.args.repeat - 1):
            extra = self.fresh_cache("rclone-cold-again")
            m = self.mount_rclone("cold-again", extra)
            assert m.mountpoint is not None
            colds.append(read_all(m.mountpoint / big.name))
            self.runner.stop(m)
            shutil.rmtree(extra, ignore_errors=True)
        cold = statistics.median(colds)
        rc["cold_mb_s"], rc["warm_mb_s"], rc["cold"] = mb_s(size, cold), mb_s(size, warm), counts
        rc["cold_runs_mb_s"] = [mb_s(size, t) for t in colds]

        log(f"rclone: {len(offsets)} random 64 KiB reads, cold, {self.args.repeat} new mounts")
        runs: list[float] = []
        rand_counts: dict[str, Any] = {}
        for _ in range(self.args.repeat):
            m = self.mount_rclone("random", self.fresh_cache("rclone-random"))
            assert m.mountpoint is not None
            path = m.mountpoint / big.name
            os.stat(path)
            counts = {}
            with self.counting(counts, OPEN_PREFIX):
                runs.append(random_reads(path, offsets, read_size))
            rand_counts = rand_counts or counts
            self.runner.stop(m)
        rc["random_s"], rc["random"], rc["random_runs_s"] = (
            statistics.median(runs),
            rand_counts,
            runs,
        )
        for name in ("rclone-main", "rclone-random"):
            shutil.rmtree(self.cache_dir(name), ignore_errors=True)

    def measure_ls(self) -> None:
        ls: dict[str, Any] = {"calls": len(self.world.calls)}
        self.results["ls"] = ls
        cache = self.fresh_cache("vapifs-ls")
        for phase in ("cold", "remount"):
            log(f"ls -l across {len(self.world.calls)} calls, {phase}")
            m = self.mount_vapifs(f"ls-{phase}", cache)
            assert m.mountpoint is not None
            calls = m.mountpoint / "calls"
            for what, cmd in (
                ("calls", f"ls -l {calls}/ | wc -l"),
                ("files", f"ls -l {calls}/*/ | grep -c '^-'"),
            ):
                counts: dict[str, Any] = {}
                try:
                    with self.counting(counts):
                        t0 = time.perf_counter()
                        out = subprocess.run(
                            ["bash", "-c", cmd],
                            capture_output=True,
                            text=True,
                            timeout=self.args.ls_timeout,
                            check=False,
                        )
                        counts["seconds"] = time.perf_counter() - t0
                    counts["entries"] = int(out.stdout.strip() or 0)
                except subprocess.TimeoutExpired:
                    counts["seconds"] = None
                    counts["timeout"] = self.args.ls_timeout
                ls[f"{what}_{phase}"] = counts
            self.runner.stop(m)
        # Every call's log, searched on a new mount with a new cache (a listing with sizes
        # would have fetched the logs already: call-logs.jsonl's size needs them).
        log(f"zgrep across the logs of {len(self.world.calls)} calls, cold")
        m = self.mount_vapifs("zgrep", self.fresh_cache("vapifs-zgrep"))
        assert m.mountpoint is not None
        counts = {}
        try:
            with self.counting(counts):
                t0 = time.perf_counter()
                out = subprocess.run(
                    [
                        "bash",
                        "-c",
                        f"zgrep -c INFO {m.mountpoint}/calls/*/call-logs.jsonl.gz | wc -l",
                    ],
                    capture_output=True,
                    text=True,
                    timeout=self.args.ls_timeout,
                    check=False,
                )
                counts["seconds"] = time.perf_counter() - t0
            counts["entries"] = int(out.stdout.strip() or 0)
        except subprocess.TimeoutExpired:
            counts["seconds"] = None
            counts["timeout"] = self.args.ls_timeout
        ls["zgrep_cold"] = counts
        self.runner.stop(m)
        shutil.rmtree(self.cache_dir("vapifs-zgrep"), ignore_errors=True)

    # ------------------------------------------------------------ report

    def report(self) -> str:
        r = self.results
        pc, curl, hc, fc = r["page_cache"], r["curl"], r["http_ceiling"], r["fuse_ceiling"]
        v, rc, ls = r["vapifs"], r.get("rclone"), r["ls"]
        rows: list[tuple[str, str, str]] = []

        def x(a: float, b: float | None) -> str:
            return f"{a / b:.2f}x" if b else "n/a"

        def speed(value: float) -> str:
            return f"{value:8.0f} MB/s" if value >= 10 else f"{value:8.1f} MB/s"

        def secs(value: float | None) -> str:
            return "  timeout" if value is None else f"{value:9.3f} s"

        ceiling = min(fc["cold_mb_s"], hc["mb_s"])
        rows.append(("page cache (2nd read of the source file)", speed(pc["mb_s"]), ""))
        rows.append(("wire: curl, fresh signed URL", speed(curl["mb_s"]), ""))
        rows.append(("HTTP ceiling: httpx+trio, 8 MiB ranges", speed(hc["mb_s"]), ""))
        rows.append(("FUSE ceiling: pyfuse3 from memory, cold", speed(fc["cold_mb_s"]), ""))
        rows.append(("FUSE ceiling: warm (keep_cache)", speed(fc["warm_mb_s"]), ""))
        if rc:
            rows.append(("rclone mount (vfs full), cold", speed(rc["cold_mb_s"]), ""))
            rows.append(("rclone mount, warm", speed(rc["warm_mb_s"]), ""))
        cold_notes = [f"{x(v['cold_mb_s'], ceiling)} min(FUSE, HTTP ceiling)"]
        if rc:
            cold_notes.append(f"{x(v['cold_mb_s'], rc['cold_mb_s'])} rclone")
        cold_notes.append(f"{x(v['cold_mb_s'], curl['mb_s'])} curl")
        cold_notes.append(f"{v['cold']['storage_requests']} storage req")
        rows.append(("vapifs cold (fresh cache dir)", speed(v["cold_mb_s"]), ", ".join(cold_notes)))
        warm_notes = [f"{x(v['warm_mb_s'], pc['mb_s'])} page cache"]
        if rc:
            warm_notes.insert(0, f"{x(v['warm_mb_s'], rc['warm_mb_s'])} rclone warm")
        rows.append(("vapifs warm (re-read)", speed(v["warm_mb_s"]), ", ".join(warm_notes)))
        rem = v["remount"]
        rows.append(
            (
                "vapifs after remount (disk cache)",
                speed(v["remount_mb_s"]),
                f"{x(v['remount_mb_s'], fc['cold_mb_s'])} FUSE ceiling cold, "
                f"storage req {rem['storage_requests']}, API req {rem['api_requests']}",
            )
        )
        n_rand = self.args.random_reads
        vr = v["random"]
        rand_note = f"{vr['storage_requests']} req, {vr['storage_bytes'] / MiB:.0f} MiB"
        if rc:
            rand_note = (
                f"{x(v['random_s'], rc['random_s'])} rclone's time; " + rand_note + " (rclone "
                f"{rc['random']['storage_requests']} req, "
                f"{rc['random']['storage_bytes'] / MiB:.0f} MiB)"
            )
        rows.append((f"vapifs {n_rand} random 64 KiB reads, cold", secs(v["random_s"]), rand_note))
        if rc:
            rows.append((f"rclone {n_rand} random 64 KiB reads, cold", secs(rc["random_s"]), ""))
        ttfb_note = f"curl -L via API {curl['ttfb_s'] * 1000:.1f} ms"
        if rc:
            ttfb_note += f", rclone {rc['ttfb_s'] * 1000:.1f} ms"
        rows.append(("vapifs time to first byte (cold mount)", secs(v["ttfb_s"]), ttfb_note))
        for phase, when in (("cold", "cold"), ("remount", "after remount")):
            for what, label in (("calls", "ls -l calls/"), ("files", "ls -l calls/*/")):
                c = ls[f"{what}_{phase}"]
                note = f"{c.get('entries', '?')} entries, API req {c['api_requests']}, "
                note += f"storage req {c['storage_requests']}"
                rows.append((f"{label} ({ls['calls']} calls), {when}", secs(c["seconds"]), note))
        z = ls["zgrep_cold"]
        note = f"{z.get('entries', '?')} files, API req {z['api_requests']}, "
        note += f"storage req {z['storage_requests']}"
        rows.append(
            (f"zgrep every call's log ({ls['calls']} calls), cold", secs(z["seconds"]), note)
        )
        rows.append(
            (
                f"vapifs peak RSS streaming {self.huge_size / MiB:.0f} MiB cold",
                f"{v['peak_rss_mib']:8.0f} MiB",
                f"{v['rss_after_mount_mib']:.0f} MiB after mount; "
                f"stream {v['huge_cold_mb_s']:.0f} MB/s",
            )
        )
        if self.rtt is not None:
            rows.append(
                (
                    "with RTT: vapifs cold vs curl / rclone",
                    "",
                    f"{x(v['cold_mb_s'], curl['mb_s'])} curl"
                    + (f", {x(v['cold_mb_s'], rc['cold_mb_s'])} rclone" if rc else ""),
                )
            )
        # New connections per workload, API + storage; with --tls each is a full handshake.
        kind = "TLS handshakes" if self.certs else "new connections"
        rows.append((f"{kind} (API + storage) of each workload:", "", ""))

        def conns(c: dict[str, Any]) -> str:
            return f"{c['api_connections']} + {c['storage_connections']}"

        rows.append(
            ("  curl -L, first byte (API 302, then storage)", f"{curl['ttfb_connections']}", "")
        )
        workloads = [
            ("vapifs first byte (cold mount)", v["ttfb"], ""),
            ("vapifs cold read of the big file", v["cold"], f"{v['cold']['storage_requests']} req"),
            (f"vapifs {n_rand} random 64 KiB reads", v["random"], f"{vr['storage_requests']} req"),
            (f"ls -l calls/*/ ({ls['calls']} calls), cold", ls["files_cold"], ""),
            (f"zgrep every call's log ({ls['calls']} calls), cold", z, ""),
        ]
        for label, c, note in workloads:
            api_req, storage_req = c["api_requests"], c["storage_requests"]
            note = note or f"{api_req} API req, {storage_req} storage req"
            rows.append((f"  {label}", conns(c), note))
        where = (
            "loopback"
            if self.rtt is None
            else f"delay line: RTT {self.rtt * 1000:.0f} ms, W {self.args.window // 1024} KiB, "
            f"{self.args.rate / 1e9:g} Gbit/s shared"
        )
        width = max(len(a) for a, _, _ in rows)
        lines = [
            f"vapifs bench: {'HTTPS, ' if self.certs else ''}{where}; "
            f"file {self.big_size / MiB:.0f} MiB; "
            f"MB = 10^6 bytes; {time.strftime('%Y-%m-%d %H:%M:%S')}",
            f"{'measure':<{width}}  {'value':>13}  ratios / notes",
            "-" * (width + 60),
        ]
        lines += [f"{a:<{width}}  {b:>13}  {c}" for a, b, c in rows]
        return "\n".join(lines)

    def save(self, table: str) -> Path:
        out_dir = REPO / "bench-results"
        out_dir.mkdir(exist_ok=True)
        suffix = "" if self.rtt is None else f"-rtt{self.rtt * 1000:.0f}ms"
        suffix += "-tls" if self.certs else ""
        suffix += "-many" if self.args.many else ""
        path = out_dir / f"bench-{time.strftime('%Y%m%d-%H%M%S')}{suffix}.json"
        payload = {
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "rtt_s": self.rtt,
            "tls": self.certs is not None,
            "window": self.args.window if self.rtt is not None else None,
            "rate_bps": self.args.rate if self.rtt is not None else None,
            "file_bytes": self.big_size,
            "huge_bytes": self.huge_size,
            "calls": len(self.world.calls),
            "random_reads": self.args.random_reads,
            "seconds": time.monotonic() - self.started,
            "results": self.results,
            "table": table.splitlines(),
        }
        path.write_text(json.dumps(payload, indent=2) + "\n")
        return path

    def close(self) -> None:
        self.runner.stop_all()
        if self.fake is not None:
            self.fake.stop()
        if self.certs is not None:
            self.certs.close()
