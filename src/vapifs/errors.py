"""The one exception tree every layer of vapifs maps its failures to."""

from __future__ import annotations

import errno

from .version import Version


class VapifsError(Exception):
    """Base of every error vapifs raises on purpose; `errno` is what a reader sees."""

    errno = errno.EIO


class NotFound(VapifsError):
    """The call or artifact does not exist (or no longer does)."""

    errno = errno.ENOENT


class KeyRejected(VapifsError):
    """The API refused the private key (401)."""

    errno = errno.EACCES


class NetworkError(VapifsError):
    """The network or the server failed and the bounded retries gave up."""

    errno = errno.EIO


class CertificateError(NetworkError):
    """A server's TLS certificate failed verification: retrying cannot help."""

    errno = errno.EIO


class ProtocolError(VapifsError):
    """A server answered something vapifs must not trust (bad Content-Range, bad JSON...)."""

    errno = errno.EIO


class VersionChanged(VapifsError):
    """The artifact's size or ETag changed on the server while it was being read."""

    errno = errno.EIO

    def __init__(self, message: str, new_version: Version) -> None:
        super().__init__(message)
        self.new_version = new_version
