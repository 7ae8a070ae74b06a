"""Keep secrets out of text: signed-URL query strings and the API key never reach a log line."""

from __future__ import annotations

import logging
import re

_URL_QUERY = re.compile(r"(https?://[^\s?#\"'<>]+)\?[^\s\"'<>]*")
_AMZ_PARAM = re.compile(
    r"(X-Amz-[A-Za-z]+|Signature|sig|Expires|token)=[^&\s\"'<>]+", re.IGNORECASE
)


def redact_url(url: str) -> str:
    """Return `url` without its query string (where signed URLs keep their signature)."""
    base, sep, _ = url.partition("?")
    return base + ("?<redacted>" if sep else "")


class Redactor:
    """Removes URL query strings, signing parameters and registered secrets from text."""

    def __init__(self) -> None:
        self._secrets: list[str] = []

    def add_secret(self, secret: str) -> None:
        if secret and secret not in self._secrets:
            self._secrets.append(secret)
            # Longest first: a secret that contains another must not be left half-replaced.
            self._secrets.sort(key=len, reverse=True)

    def __call__(self, text: str) -> str:
        text = _URL_QUERY.sub(r"\1?<redacted>", text)
        text = _AMZ_PARAM.sub(r"\1=<redacted>", text)
        for secret in self._secrets:
            text = text.replace(secret, "<redacted>")
        return text


REDACTOR = Redactor()


class RedactingFilter(logging.Filter):
    """A logging filter that renders each record once and scrubs the result."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not turn a log call into a crash
            message = f"{record.msg!s} {record.args!r}"
        if record.exc_info:
            message += "\n" + logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
            record.exc_text = None
        record.msg = REDACTOR(message)
        record.args = None
        return True
