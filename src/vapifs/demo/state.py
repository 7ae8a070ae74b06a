"""The fake's state: its calls and their artifacts' versions, its counters and knobs, and
the changes tests make to them; what its request handlers read and count."""

from __future__ import annotations

import copy
import hashlib
import math
import os
import socket
import threading
import time
from email.utils import formatdate
from typing import Any

from vapifs.demo.data import FakeCall, generate_calls
from vapifs.demo.faults import Faults, Knobs
from vapifs.demo.listing import list_calls, odd_calls, parse_time, presigned
from vapifs.demo.signing import Signer, object_path

BASE_COUNTERS = (
    "api.requests",
    "api.list",
    "api.get",
    "api.resolve",
    "api.unauthorized",
    "storage.requests",
    "storage.connections",
    "storage.bytes",
    "storage.expired",
    "storage.bad_signature",
)


def iso(ts: float) -> str:
    ms = int(ts * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


class FakeState:
    """Calls, artifacts, counters and knobs of the fake, safe to use from every thread."""

    def __init__(
        self,
        calls: list[FakeCall] | None,
        *,
        api_key: str,
        knobs: Knobs | None,
        secret: bytes | None,
        seed: int,
        big_stereo_mb: int,
    ) -> None:
        if calls is None:
            calls = generate_calls(seed=seed, big_stereo_mb=big_stereo_mb)
        self.calls: dict[str, FakeCall] = {fc.id: fc for fc in calls}
        self.api_key = api_key
        self.faults = Faults(knobs, seed)
        self.seed = seed
        self.org_id = str(calls[0].call["orgId"]) if calls else ""
        self.api_url = ""
        self.storage_url = ""
        self._secret = secret if secret is not None else os.urandom(32)
        self._signer = Signer(self._secret)
        self._lock = threading.Lock()
        self._counters: dict[str, int] = dict.fromkeys(BASE_COUNTERS, 0)
        # The query of every GET /call, in order (cleared with the counters).
        self.list_queries: list[dict[str, str]] = []
        self._etags: dict[tuple[str, str], tuple[bytes, str]] = {}
        self._mtimes: dict[tuple[str, str], float] = {}
        # Calls whose life is driven by set_call_stage: the complete call, and when it ended.
        self._complete: dict[str, tuple[dict[str, Any], dict[str, bytes], float | None]] = {}
        self._connections: set[socket.socket] = set()

    @property
    def knobs(self) -> Knobs:
        return self.faults.knobs

    # ------------------------------------------------------------ counters and knobs

    def counters(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counters)

    def reset_counters(self) -> None:
        with self._lock:
            self._counters = dict.fromkeys(BASE_COUNTERS, 0)
            self.list_queries = []

    def log_list(self, query: dict[str, list[str]]) -> None:
        with self._lock:
            self.list_queries.append({k: v[-1] for k, v in query.items()})

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counters[name] = self._counters.get(name, 0) + n

    def knobs_snapshot(self) -> Knobs:
        return self.faults.snapshot()

    def set_knobs(self, **changes: Any) -> None:
        self.faults.set(**changes)

    def track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            if add:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    def open_connections(self) -> list[socket.socket]:
        with self._lock:
            return list(self._connections)

    # ------------------------------------------------------------ changes tests make

    def swap_artifact(self, call_id: str, kind: str, data: bytes) -> None:
        """Replace an existing artifact: new bytes, new ETag, later Last-Modified."""
        with self._lock:
            fc = self.calls[call_id]
            if kind not in fc.artifacts:
                raise KeyError(f"{call_id}/{kind}")
            before = self._mtimes.get((call_id, kind), self._default_mtime(fc))
            fc.artifacts[kind] = data
            # HTTP dates have one-second resolution: make sure the new one differs.
            self._mtimes[(call_id, kind)] = max(time.time(), math.floor(before) + 1.0)

    def add_call(self, fc: FakeCall) -> None:
        with self._lock:
            self.calls[fc.id] = fc

    def set_call_stage(self, call_id: str, stage: str) -> None:
        """Drive a call through its life, as Vapi shows it: "in-progress" (no end, no
        artifacts), "ended" (ended just now, no artifacts yet), "complete" (its artifacts
        attached; its bytes are those it was generated with)."""
        if stage not in ("in-progress", "ended", "complete"):
            raise ValueError(f"unknown stage {stage!r}")
        with self._lock:
            fc = self.calls[call_id]
            full, artifacts, ended = self._complete.setdefault(
                call_id, (copy.deepcopy(fc.call), dict(fc.artifacts), None)
            )
            now = time.time()
            call = copy.deepcopy(full)
            call["updatedAt"] = iso(now)
            if stage == "in-progress":
                call["status"] = "in-progress"
                call.pop("endedAt", None)
                call.pop("endedReason", None)
                ended = None
            else:
                ended = ended if ended is not None else now
                call["status"] = "ended"
                call["endedAt"] = iso(ended)
                call.setdefault("endedReason", "customer-ended-call")
            if stage != "complete":
                call.pop("artifact", None)
                for key in ("recordingUrl", "stereoRecordingUrl", "transcript"):
                    call.pop(key, None)
            self._complete[call_id] = (full, artifacts, ended)
            fc.call = call
            fc.artifacts = dict(artifacts) if stage == "complete" else {}

    def forget_call(self, call_id: str) -> None:
        """The call passed the org's retention: GET /call/{id} and its artifacts answer 404."""
        with self._lock:
            del self.calls[call_id]

    def forget_artifact(self, call_id: str, kind: str) -> None:
        """One artifact passed retention: resolving it answers 404 (the call object stays)."""
        with self._lock:
            del self.calls[call_id].artifacts[kind]

    # ------------------------------------------------------------ what handlers answer

    @staticmethod
    def _default_mtime(fc: FakeCall) -> float:
        stamp = fc.call.get("endedAt") or fc.call.get("updatedAt") or fc.call["createdAt"]
        return parse_time(str(stamp)).timestamp()

    def meta(self, call_id: str, kind: str, data: bytes) -> tuple[str, str]:
        """(quoted ETag, Last-Modified HTTP date) for the given content of an artifact."""
        key = (call_id, kind)
        with self._lock:
            cached = self._etags.get(key)
            mtime = self._mtimes.get(key)
        if cached is not None and cached[0] is data:
            etag = cached[1]
        else:
            etag = f'"{hashlib.md5(data).hexdigest()}"'
            with self._lock:
                self._etags[key] = (data, etag)
        if mtime is None:
            mtime = self._default_mtime(self.calls[call_id])
        return etag, formatdate(mtime, usegmt=True)

    def sign(self, call_id: str, kind: str, now: float | None = None) -> tuple[str, float]:
        """A fresh signed storage URL for an artifact, and its expiry (epoch seconds)."""
        fc = self.calls[call_id]
        now = time.time() if now is None else now
        ttl = self.knobs_snapshot().url_ttl
        path = object_path(fc, kind)
        return f"{self.storage_url}{path}?{self._signer.query(path, now, ttl)}", now + ttl

    def verify(self, path: str, query: dict[str, str]) -> str:
        """ "ok", "bad" (missing or wrong signature) or "expired"."""
        return self._signer.verify(path, query)

    def lookup(self, path: str) -> tuple[str, str, bytes] | None:
        """(call id, kind, bytes) of the artifact at a storage path, if there is one."""
        parts = path.strip("/").split("/")
        if len(parts) != 3:
            return None
        org, call_id, name = parts
        with self._lock:
            fc = self.calls.get(call_id)
            if fc is None or fc.call.get("orgId") != org:
                return None
            for kind, data in fc.artifacts.items():
                if name == kind + fc.suffixes[kind]:
                    return call_id, kind, data
        return None

    def presigned(self, fc: FakeCall) -> dict[str, Any]:
        """The Call object with fresh presigned URLs."""
        return presigned(fc, self.sign)

    def list_calls(self, query: dict[str, list[str]], knobs: Knobs) -> tuple[int, Any]:
        """GET /call: (status, payload)."""
        with self._lock:
            calls = list(self.calls.values())
        odd = odd_calls(self.org_id) if knobs.odd_calls else None
        return list_calls(calls, query, sign=self.sign, odd=odd)
