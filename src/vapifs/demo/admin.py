"""The fake's /_fake/ routes, for tests and tours in other processes: counters, knobs, and
changes to its calls."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from vapifs.demo.data import extra_call, variant_artifact
from vapifs.demo.listing import parse_time
from vapifs.demo.state import FakeState
from vapifs.demo.wire import error_body, json_body

_OK = json_body({"ok": True})


def answer(owner: FakeState, command: str, path: str, body: bytes) -> tuple[int, bytes]:
    """(status, JSON body) of one /_fake/ request."""
    try:
        args: dict[str, Any] = json.loads(body) if body.strip() else {}
        if not isinstance(args, dict):
            raise ValueError("expected a JSON object")
        return _route(owner, command, path, args)
    except KeyError as exc:
        return 404, error_body(404, "Not Found", f"unknown: {exc}")
    except (ValueError, TypeError) as exc:
        return 400, error_body(400, "Bad Request", str(exc))


def _route(owner: FakeState, command: str, path: str, args: dict[str, Any]) -> tuple[int, bytes]:
    if path == "/_fake/counters" and command == "GET":
        return 200, json_body(owner.counters())
    if path == "/_fake/knobs" and command == "GET":
        return 200, json_body(dataclasses.asdict(owner.knobs_snapshot()))
    if path == "/_fake/reset-counters" and command == "POST":
        owner.reset_counters()
        return 200, _OK
    if path == "/_fake/knobs" and command == "POST":
        owner.set_knobs(**args)
        return 200, json_body(dataclasses.asdict(owner.knobs_snapshot()))
    if path == "/_fake/swap" and command == "POST":
        call_id, kind = str(args["call_id"]), str(args["kind"])
        fc = owner.calls[call_id]
        data = variant_artifact(fc, kind, int(args.get("seed", 1)))
        owner.swap_artifact(call_id, kind, data)
        etag, _ = owner.meta(call_id, kind, data)
        return 200, json_body({"call_id": call_id, "kind": kind, "size": len(data), "etag": etag})
    if path == "/_fake/call-stage" and command == "POST":
        owner.set_call_stage(str(args["call_id"]), str(args["stage"]))
        return 200, _OK
    if path == "/_fake/forget" and command == "POST":
        if args.get("kind"):
            owner.forget_artifact(str(args["call_id"]), str(args["kind"]))
        else:
            owner.forget_call(str(args["call_id"]))
        return 200, _OK
    if path == "/_fake/add-call" and command == "POST":
        created = args.get("created_at")
        fc = extra_call(
            int(args.get("seed", 0)),
            parse_time(created) if created else None,
            base_seed=owner.seed,
            org_id=owner.org_id,
        )
        owner.add_call(fc)
        return 200, json_body({"id": fc.id})
    return 404, error_body(404, "Not Found", f"Cannot {command} {path}")
