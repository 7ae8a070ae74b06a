"""The fake's signed-URL object store: signatures checked, expiry, S3-shaped errors."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

from vapifs.demo.wire import XML, Handler


class StorageHandler(Handler):
    role = "storage"

    def do_GET(self) -> None:
        self._object()

    def do_HEAD(self) -> None:
        self._object()

    def _xml(self, status: int, code: str, message: str) -> None:
        self.reply(status, XML.format(code, message).encode(), "application/xml")

    def _object(self) -> None:
        owner = self.owner
        knobs = owner.knobs_snapshot()
        if knobs.storage_down:
            owner.count("storage.requests")
            self.drop()
            return
        owner.count("storage.requests")
        if knobs.storage_stall:
            owner.count("fault.storage_stall")
            if owner.faults.stall(knobs.stall_seconds):
                self.drop()
                return
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        verdict = owner.verify(url.path, query)
        if verdict == "bad":
            owner.count("storage.bad_signature")
            self._xml(
                403,
                "SignatureDoesNotMatch",
                "The request signature we calculated does not match the signature you provided. "
                "Check your key and signing method.",
            )
            return
        if verdict == "expired":
            owner.count("storage.expired")
            self._xml(403, "AccessDenied", "Request has expired")
            return
        found = owner.lookup(url.path)
        if found is None:
            self._xml(404, "NoSuchKey", "The specified key does not exist.")
            return
        call_id, kind, data = found
        self.serve_object(call_id, kind, data, storage=True)
