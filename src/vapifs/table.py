"""The table of the window: one row per call, as CSV (calls.csv) and JSON lines (calls.jsonl)."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from . import calls as C

# The columns, in order. Nothing about the customer: a number or a name is patient data, and
# the table is made to be copied into spreadsheets and notebooks.
COLUMNS = (
    "id",
    "createdAt",
    "endedAt",
    "duration",
    "status",
    "endedReason",
    "assistantId",
    "type",
    "cost",
    "artifacts",
)


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def duration(call: dict[str, Any]) -> float | None:
    """Seconds the call lasted: from startedAt (else createdAt) to endedAt; None if unended."""
    ended = C.parse_time(call.get("endedAt"))
    started = C.parse_time(call.get("startedAt"))
    if started is None:
        started = C.created_at(call)
    if ended is None or started is None or ended < started:
        return None
    return round(ended - started, 3)


def row(call: dict[str, Any]) -> dict[str, Any]:
    """One call as a row; `artifacts` names the files its directory holds besides call.json."""
    files = list(C.artifact_files(call))
    if C.transcript(call) is not None:
        files.insert(0, "transcript.txt")
    plain = [name[: -len(".gz")] for name in files if name.endswith(".gz")]
    return {
        "id": call.get("id"),
        "createdAt": _text(call.get("createdAt")),
        "endedAt": _text(call.get("endedAt")),
        "duration": duration(call),
        "status": _text(call.get("status")),
        "endedReason": _text(call.get("endedReason")),
        "assistantId": _text(call.get("assistantId")),
        "type": _text(call.get("type")),
        "cost": _number(call.get("cost")),
        "artifacts": files + plain,
    }


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}" if abs(value) < 1e15 else repr(value)
    return str(value)


def to_csv(rows: list[dict[str, Any]]) -> bytes:
    """RFC 4180 CSV with a header line; artifacts as space-separated file names."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(COLUMNS)
    for r in rows:
        writer.writerow([_cell(r[c]) for c in COLUMNS])
    return out.getvalue().encode()


def to_jsonl(rows: list[dict[str, Any]]) -> bytes:
    """One JSON object per line; artifacts as a list."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
