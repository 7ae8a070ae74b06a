"""TLS trust: the SSL context every connection uses, and what an untrusted certificate says."""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from pathlib import Path

import httpx

CA_HINT = "if a proxy or a private CA signs it, name that CA with --ca-file FILE or SSL_CERT_FILE"


class TrustError(Exception):
    """A CA file that cannot be used (missing, unreadable, no certificate in it): one line."""


def _load(ctx: ssl.SSLContext, where: str, path: str, *, directory: bool = False) -> None:
    try:
        if directory:
            if not os.path.isdir(path):
                raise TrustError(f"{where} {path} is not a directory")
            ctx.load_verify_locations(capath=path)
        else:
            ctx.load_verify_locations(cafile=path)
    except FileNotFoundError:
        raise TrustError(f"{where} {path} does not exist") from None
    except IsADirectoryError:
        raise TrustError(f"{where} {path} is a directory, not a PEM file") from None
    except PermissionError:
        raise TrustError(f"{where} {path} cannot be read: permission denied") from None
    except ssl.SSLError:
        raise TrustError(f"{where} {path} holds no PEM certificate") from None
    except OSError as exc:
        raise TrustError(f"{where} {path} cannot be read: {exc.strerror}") from None


def client_context(
    ca_file: Path | None = None, environ: Mapping[str, str] = os.environ
) -> ssl.SSLContext:
    """Verification always on, trusting the system's CAs, plus $SSL_CERT_FILE / $SSL_CERT_DIR,
    plus `ca_file` (a proxy's or a private CA).

    Built here rather than left to httpx, whose default trusts certifi's bundle alone and
    drops it for SSL_CERT_FILE when that is set: a corporate CA named there would then
    cost every public one.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    system = ssl.get_default_verify_paths()
    found = False
    if system.openssl_cafile and os.path.isfile(system.openssl_cafile):
        ctx.load_verify_locations(cafile=system.openssl_cafile)
        found = True
    if system.openssl_capath and os.path.isdir(system.openssl_capath):
        ctx.load_verify_locations(capath=system.openssl_capath)
        found = True
    if not found:
        # A machine without a CA store (a slim container): the bundle httpx ships with.
        import certifi

        ctx.load_verify_locations(cafile=certifi.where())
    if environ.get("SSL_CERT_FILE"):
        _load(ctx, "SSL_CERT_FILE", environ["SSL_CERT_FILE"])
    if environ.get("SSL_CERT_DIR"):
        _load(ctx, "SSL_CERT_DIR", environ["SSL_CERT_DIR"], directory=True)
    if ca_file is not None:
        _load(ctx, "--ca-file", str(ca_file))
    return ctx


def host_of(url: str | httpx.URL) -> str:
    """host:port of a URL, never its path or query (a signed URL's query is a secret)."""
    parsed = httpx.URL(url)
    return f"{parsed.host}:{parsed.port}" if parsed.port else parsed.host


def untrusted(exc: BaseException, url: str | httpx.URL, what: str) -> str | None:
    """A one-line reason when `exc` is a certificate that failed verification, else None.

    httpx wraps the ssl error in its own ConnectError: look down the chain for it.
    """
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, ssl.SSLCertVerificationError):
            detail = cause.verify_message or cause.reason or "verification failed"
            return f"the certificate of {what} {host_of(url)} is not trusted ({detail}); {CA_HINT}"
        cause = cause.__cause__ or cause.__context__
    return None
