"""The benchmark's world: source files, nginx with secure_link, and a fake Vapi API for them.

The fake API is the project's own FakeVapi (listing, paging, 401/404 behaviour) with one
change: its signed URLs point at nginx, signed the `secure_link` way, instead of at its own
storage server. nginx also serves the same directory without signatures under /open/, for
peers (rclone) that cannot follow a per-file 302 API.
"""

from __future__ import annotations

import base64
import hashlib
import random
import socket
import struct
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vapifs.demo.certs import ThrowawayCA
from vapifs.demo.data import FakeCall, iso_ms
from vapifs.demo.server import FakeVapi

MiB = 1 << 20
BIG_NAME = "big-200m.wav"
HUGE_NAME = "huge-1g.wav"
SMALL_FILES = {
    "mono": "small/mono.wav",
    "stereo": "small/stereo.wav",
    "logs": "small/logs.jsonl.gz",
}
SIGNED_PREFIX = "/s/"
OPEN_PREFIX = "/open/"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wav_header(data_bytes: int, *, channels: int = 2, rate: int = 16000) -> bytes:
    """A canonical 44-byte 16-bit PCM WAV header for data_bytes of samples."""
    return struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF",
        36 + data_bytes,
        b"WAVE",
        b"fmt ",
        16,
        1,
        channels,
        rate,
        rate * channels * 2,
        channels * 2,
        16,
        b"data",
        data_bytes,
    )


def _write_wav(path: Path, total: int, *, channels: int, seed: int) -> None:
    """A WAV file of exactly total bytes; the samples are pseudo-random (incompressible)."""
    rng = random.Random(seed)
    tmp = path.with_suffix(".part")
    with open(tmp, "wb") as f:
        f.write(wav_header(total - 44, channels=channels))
        left = total - 44
        while left > 0:
            n = min(4 * MiB, left)
            f.write(rng.randbytes(n))
            left -= n
    tmp.chmod(0o644)
    tmp.replace(path)


def ensure_files(data_dir: Path, big_bytes: int, huge_bytes: int) -> dict[str, Path]:
    """Create the source files once; later runs reuse them when their sizes match."""
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "small").mkdir(exist_ok=True)
    for d in (data_dir, data_dir / "small", data_dir.parent):
        d.chmod(0o755)  # nginx workers run as an unprivileged user
    wanted = {
        BIG_NAME: (big_bytes, 2, 1),
        HUGE_NAME: (huge_bytes, 2, 2),
        SMALL_FILES["mono"]: (320_044, 1, 3),
        SMALL_FILES["stereo"]: (640_044, 2, 4),
    }
    for rel, (size, channels, seed) in wanted.items():
        path = data_dir / rel
        if not path.exists() or path.stat().st_size != size:
            _write_wav(path, size, channels=channels, seed=seed)
    logs = data_dir / SMALL_FILES["logs"]
    if not logs.exists():
        import gzip
        import json

        rng = random.Random(5)
        lines = [
            json.dumps({"time": 1_700_000_000_000 + i * 250, "level": "INFO", "message": f"t{i}"})
            + f" {rng.random()}\n"
            for i in range(2000)
        ]
        logs.write_bytes(gzip.compress("".join(lines).encode(), mtime=0))
        logs.chmod(0o644)
    return {rel: data_dir / rel for rel in (BIG_NAME, HUGE_NAME, *SMALL_FILES.values())}


# ---------------------------------------------------------------- calls


@dataclass
class BenchCalls:
    calls: list[FakeCall]
    paths: dict[tuple[str, str], str]  # (call id, kind) -> path under the data directory
    big_id: str
    huge_id: str


def _call(rng: random.Random, created_ms: int, kinds: dict[str, str]) -> FakeCall:
    call_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
    host = "https://storage.vapi.example/bench"
    urls = {kind: f"{host}/{call_id}-{kind}{Path(rel).suffix}" for kind, rel in kinds.items()}
    recording: dict[str, Any] = {}
    artifact: dict[str, Any] = {"transcript": "AI: Hello.\nUser: Hi."}
    if "stereo" in urls:
        artifact["stereoRecordingUrl"] = recording["stereoUrl"] = urls["stereo"]
    if "mono" in urls:
        artifact["recordingUrl"] = urls["mono"]
        recording["mono"] = {"combinedUrl": urls["mono"]}
    if recording:
        artifact["recording"] = recording
    if "logs" in urls:
        artifact["logUrl"] = urls["logs"]
    call: dict[str, Any] = {
        "id": call_id,
        "orgId": "0b0b0b0b-0000-4000-8000-00000000beef",
        "type": "inboundPhoneCall",
        "status": "ended",
        "createdAt": iso_ms(created_ms),
        "updatedAt": iso_ms(created_ms + 65_000),
        "startedAt": iso_ms(created_ms + 1_000),
        "endedAt": iso_ms(created_ms + 61_000),
        "endedReason": "customer-ended-call",
        "cost": 0.12,
        "assistantId": "0a0a0a0a-0000-4000-8000-00000000a551",
        "customer": {"number": "+15550000000", "name": "Bench"},
        "artifact": artifact,
    }
    suffixes = {kind: ".jsonl.gz" if kind == "logs" else ".wav" for kind in kinds}
    # FakeVapi only looks at which kinds exist: the bytes live in nginx's directory.
    return FakeCall(call=call, artifacts=dict.fromkeys(kinds, b""), suffixes=suffixes)


def bench_calls(total: int, *, seed: int = 7) -> BenchCalls:
    """total calls over the last few days: the two newest carry the big files."""
    rng = random.Random(seed)
    now_ms = int(time.time() * 1000) - 10 * 60_000
    calls: list[FakeCall] = []
    paths: dict[tuple[str, str], str] = {}
    for i in range(total):
        created = now_ms - i * 300_000  # one call every 5 minutes, newest first
        if i == 0:
            kinds = {"stereo": BIG_NAME, "logs": SMALL_FILES["logs"]}
        elif i == 1:
            kinds = {"stereo": HUGE_NAME, "logs": SMALL_FILES["logs"]}
        else:
            kinds = dict(SMALL_FILES)
        fc = _call(rng, created, kinds)
        calls.append(fc)
        for kind, rel in kinds.items():
            paths[(fc.id, kind)] = rel
    return BenchCalls(calls, paths, calls[0].id, calls[1].id)


def secure_link(uri: str, expires: int, secret: str) -> str:
    """The md5 argument nginx's secure_link_md5 "$secure_link_expires$uri SECRET" expects."""
    digest = hashlib.md5(f"{expires}{uri} {secret}".encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


class BenchVapi(FakeVapi):
    """FakeVapi whose 302s (and presigned URLs) point at nginx secure_link URLs."""

    def __init__(
        self,
        world: BenchCalls,
        *,
        storage_base: str,
        secret: str,
        api_key: str,
        url_ttl: float = 600.0,
        tls: ThrowawayCA | None = None,
    ) -> None:
        super().__init__(world.calls, api_key=api_key, tls=tls or False)
        self.set_knobs(url_ttl=url_ttl)
        self.storage_base = storage_base.rstrip("/")
        self._link_secret = secret
        self._paths = world.paths

    def sign(self, call_id: str, kind: str, now: float | None = None) -> tuple[str, float]:
        now = time.time() if now is None else now
        expires = int(now + self.knobs_snapshot().url_ttl)
        uri = SIGNED_PREFIX + self._paths[(call_id, kind)]
        md5 = secure_link(uri, expires, self._link_secret)
        return f"{self.storage_base}{uri}?md5={md5}&expires={expires}", float(expires)


# ---------------------------------------------------------------- nginx

NGINX_CONF = """\
worker_processes 2;
daemon off;
pid {run}/nginx.pid;
error_log {run}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    types {{ audio/wav wav; application/gzip gz; }}
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 300s;
    keepalive_requests 1000000;
    log_format bench '$msec $status $request_method $uri $body_bytes_sent "$http_range" '
                     '$connection $connection_requests';
    access_log {run}/nginx-access.log bench;
    client_body_temp_path {run}/nginx-tmp/body;
    proxy_temp_path {run}/nginx-tmp/proxy;
    fastcgi_temp_path {run}/nginx-tmp/fastcgi;
    uwsgi_temp_path {run}/nginx-tmp/uwsgi;
    scgi_temp_path {run}/nginx-tmp/scgi;
    server {{
        listen 127.0.0.1:{port}{ssl};
{tls}        location {signed} {{
            secure_link $arg_md5,$arg_expires;
            secure_link_md5 "$secure_link_expires$uri {secret}";
            if ($secure_link = "") {{ return 403; }}
            if ($secure_link = "0") {{ return 403; }}
            alias {data}/;
        }}
        location {open} {{
            alias {data}/;
            autoindex on;
            autoindex_exact_size on;
        }}
        location / {{ return 404; }}
    }}
}}
"""


class Nginx:
    """nginx in the foreground on 127.0.0.1:port, its log in the run directory."""

    def __init__(
        self, run_dir: Path, data_dir: Path, secret: str, tls: ThrowawayCA | None = None
    ) -> None:
        self.run_dir = run_dir
        self.port = free_port()
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        tls_conf = ""
        if tls is not None:
            tls_conf = (
                f"        ssl_certificate {tls.cert_file};\n"
                f"        ssl_certificate_key {tls.key_file};\n"
            )
        self.access_log = run_dir / "nginx-access.log"
        (run_dir / "nginx-tmp").mkdir(parents=True, exist_ok=True)
        self.conf = run_dir / "nginx.conf"
        self.conf.write_text(
            NGINX_CONF.format(
                run=run_dir,
                port=self.port,
                ssl=" ssl" if tls else "",
                tls=tls_conf,
                signed=SIGNED_PREFIX,
                open=OPEN_PREFIX,
                secret=secret,
                data=data_dir,
            )
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        return ["nginx", "-c", str(self.conf), "-p", str(self.run_dir), "-e", "stderr"]

    def log_offset(self) -> int:
        try:
            return self.access_log.stat().st_size
        except FileNotFoundError:
            return 0

    def requests_since(self, offset: int, prefix: str | None = None) -> tuple[int, int]:
        """(requests, body bytes sent) logged since offset, optionally only under prefix."""
        try:
            with open(self.access_log, "rb") as f:
                f.seek(offset)
                text = f.read().decode(errors="replace")
        except FileNotFoundError:
            return 0, 0
        count = sent = 0
        for line in text.splitlines():
            parts = line.split(" ")
            if len(parts) < 5 or (prefix is not None and not parts[3].startswith(prefix)):
                continue
            count += 1
            sent += int(parts[4]) if parts[4].isdigit() else 0
        return count, sent

    def connections_since(self, offset: int) -> int:
        """New connections (each one a TLS handshake over HTTPS) that made a request since
        offset: the requests logged as the first of their connection."""
        try:
            with open(self.access_log, "rb") as f:
                f.seek(offset)
                text = f.read().decode(errors="replace")
        except FileNotFoundError:
            return 0
        return sum(1 for line in text.splitlines() if line.rsplit(" ", 1)[-1] == "1")
