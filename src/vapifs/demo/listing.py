"""The fake's answers with call objects: GET /call's filters, limits and order, and the
presigned URLs every call object carries."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from vapifs.demo.data import ENDPOINTS, PRESIGNED_FIELDS, FakeCall

_FILTERS = ("createdAt", "updatedAt")
_OPS = ("Gt", "Ge", "Lt", "Le")

Sign = Callable[[str, str, float], tuple[str, float]]  # (call id, kind, now) -> (URL, expiry)


def parse_time(value: str) -> datetime:
    dt = datetime.fromisoformat(value)
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)


def presigned(fc: FakeCall, sign: Sign) -> dict[str, Any]:
    """The Call object with fresh presigned URLs; nested data is shared, not copied."""
    call = dict(fc.call)
    artifact = call.get("artifact")
    if isinstance(artifact, dict) and fc.artifacts:
        artifact = dict(artifact)
        now = time.time()
        expiry = now
        for kind in ENDPOINTS:
            if kind in fc.artifacts:
                artifact[PRESIGNED_FIELDS[kind]], expiry = sign(fc.id, kind, now)
        ms = int(expiry * 1000)
        artifact["presignedUrlsExpiresAt"] = (
            time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"
        )
        call["artifact"] = artifact
    return call


def _bad_request(*msg: str) -> tuple[int, Any]:
    return 400, {"statusCode": 400, "error": "Bad Request", "message": list(msg)}


def _limit(raw: str | None) -> int | tuple[int, Any]:
    """The `limit` asked for, or the 400 the API answers to it."""
    if raw is None:
        return 100
    try:
        limit = int(raw)
    except ValueError:
        return _bad_request("limit must not be greater than 1000", "limit must be a number")
    if limit > 1000:
        return _bad_request("limit must not be greater than 1000")
    if limit < 0:
        return _bad_request("limit must not be less than 0")
    return limit


def _matches(
    fc: FakeCall, equals: dict[str, str | None], bounds: list[tuple[str, str, datetime]]
) -> bool:
    if any(v is not None and fc.call.get(k) != v for k, v in equals.items()):
        return False
    for field, op, bound in bounds:
        stamp = fc.call.get(field)
        if not isinstance(stamp, str):
            return False
        t = parse_time(stamp)
        ok = {
            "Gt": t > bound,
            "Ge": t >= bound,
            "Lt": t < bound,
            "Le": t <= bound,
        }[op]
        if not ok:
            return False
    return True


def list_calls(
    calls: Iterable[FakeCall],
    query: dict[str, list[str]],
    *,
    sign: Sign,
    odd: list[Any] | None,
) -> tuple[int, Any]:
    """GET /call: (status, payload), newest first; `odd` calls are mixed in when given."""

    def one(name: str) -> str | None:
        values = query.get(name)
        return values[-1] if values else None

    limit = _limit(one("limit"))
    if isinstance(limit, tuple):
        return limit
    bounds: list[tuple[str, str, datetime]] = []
    for field in _FILTERS:
        for op in _OPS:
            value = one(field + op)
            if value is None:
                continue
            try:
                bounds.append((field, op, parse_time(value)))
            except ValueError:
                return _bad_request(f"{field}{op} must be a valid ISO 8601 date string")
    equals = {name: one(name) for name in ("id", "assistantId", "phoneNumberId")}
    selected = [
        (parse_time(fc.created_at), fc.id, fc) for fc in calls if _matches(fc, equals, bounds)
    ]
    selected.sort(key=lambda item: (item[0], item[1]), reverse=True)
    answer: list[Any] = [presigned(fc, sign) for _, _, fc in selected[:limit]]
    if odd is not None and answer:
        answer[1:1] = odd
        answer = answer[:limit]
    return 200, answer


def odd_calls(org_id: str) -> list[Any]:
    """Shapes a loose parser must survive without failing the whole listing."""
    return [
        {"id": None, "orgId": org_id, "createdAt": "2020-01-01T00:00:00.000Z"},
        {
            "id": "0dd0dd00-0000-4000-8000-000000000001",
            "orgId": org_id,
            "createdAt": 1700000000000,
            "artifact": "not-an-object",
        },
        {"id": "0dd0dd00-0000-4000-8000-000000000002", "orgId": org_id},
        {
            "id": 12345,
            "createdAt": "yesterday",
            "artifact": {"recording": [], "logUrl": 7, "presignedLogUrl": None},
        },
        "not even an object",
    ]
