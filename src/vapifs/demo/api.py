"""The fake's /call API: the key, throttling and failures, listings, call objects, resolves."""

from __future__ import annotations

import math
from urllib.parse import parse_qs, urlsplit

from vapifs.demo.admin import answer as answer_admin
from vapifs.demo.data import KIND_BY_ENDPOINT
from vapifs.demo.faults import Knobs
from vapifs.demo.wire import Handler, error_body, json_body

UNAUTHORIZED_MESSAGE = (
    "Invalid Key. Hot tip, you may be using the private key instead of the public key, "
    "or vice versa."
)
_THROTTLED = "ThrottlerException: Too Many Requests"


class ApiHandler(Handler):
    role = "api"

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        owner = self.owner
        url = urlsplit(self.path)
        body = self.discard_body()
        if url.path.startswith("/_fake/"):
            self.reply(*answer_admin(owner, self.command, url.path, body))
            return
        knobs = owner.knobs_snapshot()
        if not self._admitted(knobs):
            return
        parts = [p for p in url.path.split("/") if p]
        if self.command != "GET" or not parts or parts[0] != "call" or len(parts) > 3:
            self.reply(404, error_body(404, "Not Found", f"Cannot {self.command} {url.path}"))
            return
        query = parse_qs(url.query, keep_blank_values=True)
        if len(parts) == 1:
            owner.count("api.list")
            owner.log_list(query)
            status, payload = owner.list_calls(query, knobs)
            self._reply_json(status, payload, knobs)
        elif len(parts) == 2:
            owner.count("api.get")
            fc = owner.calls.get(parts[1])
            if fc is None:
                self.reply(404, error_body(404, "Not Found", "Call not found"))
            else:
                self._reply_json(200, owner.presigned(fc), knobs)
        else:
            owner.count("api.resolve")
            self._resolve(parts[1], parts[2], knobs)

    def _admitted(self, knobs: Knobs) -> bool:
        """The faults and refusals before a request is looked at; False once answered."""
        owner = self.owner
        if knobs.api_down:
            self.drop()
            return False
        if knobs.api_stall and owner.faults.stall(knobs.stall_seconds):
            self.drop()  # stopped while stalling; otherwise answer late
            return False
        owner.count("api.requests")
        if self.headers.get("Authorization", "") != f"Bearer {owner.api_key}":
            owner.count("api.unauthorized")
            self.reply(401, error_body(401, "Unauthorized", UNAUTHORIZED_MESSAGE))
            return False
        if knobs.api_rate_limit > 0:
            wait = owner.faults.rate_wait(knobs.api_rate_limit)
            if wait > 0:
                owner.count("fault.api_429")
                after = (("Retry-After", str(max(1, math.ceil(wait)))),)
                self.reply(429, error_body(429, "Too Many Requests", _THROTTLED), headers=after)
                return False
        roll = owner.faults.roll()
        if roll < knobs.api_500_rate:
            owner.count("fault.api_500")
            self.reply(500, error_body(500, "Internal Server Error", "Internal server error"))
            return False
        if roll < knobs.api_500_rate + knobs.api_429_rate:
            owner.count("fault.api_429")
            headers: tuple[tuple[str, str], ...] = ()
            if knobs.retry_after is not None:
                headers = (("Retry-After", f"{knobs.retry_after:g}"),)
            self.reply(429, error_body(429, "Too Many Requests", _THROTTLED), headers=headers)
            return False
        return True

    def _reply_json(self, status: int, payload: object, knobs: Knobs) -> None:
        body = json_body(payload)
        if status == 200 and self.owner.faults.roll() < knobs.malformed_json_rate:
            body = body[: max(1, len(body) // 2)]
        self.reply(status, body)

    def _resolve(self, call_id: str, endpoint: str, knobs: Knobs) -> None:
        owner = self.owner
        kind = KIND_BY_ENDPOINT.get(endpoint)
        if kind is None:
            self.reply(404, error_body(404, "Not Found", f"Cannot GET {self.path}"))
            return
        fc = owner.calls.get(call_id)
        if fc is None:
            self.reply(404, error_body(404, "Not Found", "Call not found"))
            return
        data = fc.artifacts.get(kind)
        if data is None:
            what = {"logs": "Call logs", "pcap": "PCAP"}.get(kind, "Recording")
            self.reply(404, error_body(404, "Not Found", f"{what} not found"))
            return
        if knobs.artifact_200:
            self.serve_object(call_id, kind, data, storage=False)
            return
        location, _ = owner.sign(call_id, kind)
        self.reply(302, json_body({"url": location}), headers=(("Location", location),))
