"""Loose reading of Vapi Call objects: which artifacts exist, their names, times, secrets."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")

# (kind, file stem, default extension) in the order a call directory lists them.
ARTIFACTS: tuple[tuple[str, str, str], ...] = (
    ("mono", "mono", ".wav"),
    ("stereo", "stereo", ".wav"),
    ("customer", "customer", ".wav"),
    ("assistant", "assistant", ".wav"),
    ("video", "video", ".mp4"),
    ("logs", "call-logs", ".jsonl.gz"),
    ("pcap", "capture", ".pcap"),
)
_AUDIO = {"mono", "stereo", "customer", "assistant"}
_PRESIGNED_FIELD = {
    "mono": "presignedMonoUrl",
    "stereo": "presignedStereoUrl",
    "customer": "presignedCustomerUrl",
    "assistant": "presignedAssistantUrl",
    "video": "presignedVideoUrl",
    "logs": "presignedLogUrl",
    "pcap": "presignedPcapUrl",
}
ENDED = {"ended"}


def is_call_id(name: str) -> bool:
    return UUID_RE.match(name) is not None


def sanitize(value: Any) -> Any:
    """A copy without any presigned* field, at any depth (they are expiring secrets)."""
    if isinstance(value, dict):
        return {
            k: sanitize(v)
            for k, v in value.items()
            if not (isinstance(k, str) and k.lower().startswith("presigned"))
        }
    if isinstance(value, list):
        return [sanitize(v) for v in value]
    return value


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _url(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def artifact_urls(call: dict[str, Any]) -> dict[str, str | None]:
    """kind -> the stable (not downloadable) URL the call object names, for existing artifacts.

    Presence of a stable URL or of a presigned URL says the artifact exists; older responses
    keep recording URLs at the top level of the call.
    """
    artifact = _dict(call.get("artifact"))
    recording = _dict(artifact.get("recording"))
    mono = _dict(recording.get("mono"))
    candidates: dict[str, list[Any]] = {
        "mono": [mono.get("combinedUrl"), artifact.get("recordingUrl"), call.get("recordingUrl")],
        "stereo": [
            recording.get("stereoUrl"),
            artifact.get("stereoRecordingUrl"),
            call.get("stereoRecordingUrl"),
        ],
        "customer": [mono.get("customerUrl")],
        "assistant": [mono.get("assistantUrl")],
        "video": [recording.get("videoUrl"), artifact.get("videoRecordingUrl")],
        "logs": [artifact.get("logUrl")],
        "pcap": [artifact.get("pcapUrl")],
    }
    found: dict[str, str | None] = {}
    for kind, urls in candidates.items():
        url = next((u for u in map(_url, urls) if u), None)
        if url is not None or _url(artifact.get(_PRESIGNED_FIELD[kind])):
            found[kind] = url
    return found


def _extension(kind: str, url: str | None, default: str) -> str:
    if kind in _AUDIO and url:
        path = url.split("?", 1)[0].lower()
        if path.endswith(".mp3"):
            return ".mp3"
    return default


def artifact_files(call: dict[str, Any]) -> dict[str, str]:
    """File name -> artifact kind, for the artifacts the call object says exist."""
    urls = artifact_urls(call)
    files: dict[str, str] = {}
    for kind, stem, default in ARTIFACTS:
        if kind in urls:
            files[stem + _extension(kind, urls[kind], default)] = kind
    return files


def transcript(call: dict[str, Any]) -> str | None:
    text = _dict(call.get("artifact")).get("transcript") or call.get("transcript")
    return text if isinstance(text, str) and text.strip() else None


def parse_time(value: Any) -> float | None:
    """Seconds since the epoch from an ISO 8601 string (None when absent or odd)."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def format_time(ts: float) -> str:
    """ISO 8601 with milliseconds and Z, as the Vapi API writes times; rounded to the
    millisecond (not truncated), so that a bound made from a parsed time equals that time."""
    ms = round(ts * 1000)
    return datetime.fromtimestamp(ms // 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + (
        f"{ms % 1000:03d}Z"
    )


def created_at(call: dict[str, Any]) -> float | None:
    return parse_time(call.get("createdAt"))


def modified_at(call: dict[str, Any]) -> float:
    """When the call's artifacts last changed: endedAt, else updatedAt, else createdAt."""
    for key in ("endedAt", "updatedAt", "createdAt"):
        ts = parse_time(call.get(key))
        if ts is not None:
            return ts
    return 0.0


def is_ended(call: dict[str, Any]) -> bool:
    return call.get("status") in ENDED


def presigned_urls(call: dict[str, Any]) -> tuple[dict[str, str], float | None]:
    """kind -> the presigned URL the call object carries, and when they all expire."""
    artifact = _dict(call.get("artifact"))
    urls = {
        kind: url for kind, field in _PRESIGNED_FIELD.items() if (url := _url(artifact.get(field)))
    }
    return urls, parse_time(artifact.get("presignedUrlsExpiresAt"))
