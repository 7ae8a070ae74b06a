"""The metadata store: small JSON documents (versions, call objects, listings) by namespace."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from .cachefiles import (
    ENC_MAGIC,
    ensure_dir,
    read_file,
    unlink_if_same,
    write_atomic,
    write_failed,
)
from .crypto import Cipher

log = logging.getLogger("vapifs.cache")

_NS_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def _key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def _meta_ad(ns: str, key_hash: str) -> bytes:
    return f"vapifs meta {ns} {key_hash}".encode()


class MetaStore:
    """Small JSON documents (artifact versions, call objects, listings) keyed by namespace.

    With a cipher, every document file is sealed (see ENC_MAGIC); one that does not
    authenticate is deleted, with a warning, and its document is found again at its source.
    """

    def __init__(self, root: Path, cipher: Cipher | None = None) -> None:
        self.root = Path(root)
        self.cipher = cipher
        self._meta_dir = self.root / "meta"
        self._tmp_dir = self.root / "tmp"

    def _ns_dir(self, ns: str) -> Path:
        if not _NS_NAME.match(ns):
            raise ValueError(f"bad metadata namespace {ns!r}")
        return self._meta_dir / ns

    def _path(self, ns: str, key: str) -> Path:
        return self._ns_dir(ns) / f"{_key_hash(key)}.json"

    def _load(self, path: Path) -> tuple[str, dict[str, Any]] | None:
        """(key, doc) of a document file; None when absent; a corrupt file is deleted."""
        try:
            raw, ino = read_file(path)
        except FileNotFoundError:
            return None
        except OSError as e:
            log.debug("cache: cannot read %s: %s", path, e)
            return None
        if self.cipher is not None:
            ad = _meta_ad(path.parent.name, path.stem)
            plain = None
            if raw.startswith(ENC_MAGIC):
                plain = self.cipher.open(memoryview(raw)[len(ENC_MAGIC) :], ad)
            if plain is None:
                log.warning(
                    "cache: dropped a damaged %s document; fetching it again", path.parent.name
                )
                with contextlib.suppress(OSError):
                    unlink_if_same(path, ino)
                return None
            raw = plain
        try:
            wrapper = json.loads(raw)
        except ValueError:
            wrapper = None
        if (
            isinstance(wrapper, dict)
            and isinstance(wrapper.get("key"), str)
            and isinstance(wrapper.get("doc"), dict)
            and path.name == f"{_key_hash(wrapper['key'])}.json"
        ):
            return wrapper["key"], wrapper["doc"]
        log.debug("cache: deleting the unreadable metadata file %s", path)
        with contextlib.suppress(OSError):
            unlink_if_same(path, ino)
        return None

    def get(self, ns: str, key: str) -> dict[str, Any] | None:
        loaded = self._load(self._path(ns, key))
        if loaded is None or loaded[0] != key:
            return None
        return loaded[1]

    def put(self, ns: str, key: str, doc: dict[str, Any]) -> bool:
        path = self._path(ns, key)
        body = json.dumps({"key": key, "doc": doc}, separators=(",", ":")).encode()
        parts: tuple[bytes, ...] = (body,)
        if self.cipher is not None:
            parts = (ENC_MAGIC, self.cipher.seal(body, _meta_ad(ns, path.stem)))
        try:
            ensure_dir(path.parent)
            write_atomic(self._tmp_dir, path, parts, fsync=False)
        except OSError as e:
            write_failed(self.root, e)
            return False
        return True

    def delete(self, ns: str, key: str) -> None:
        try:
            os.unlink(self._path(ns, key))
        except FileNotFoundError:
            pass
        except OSError as e:
            log.debug("cache: cannot delete metadata %s/%s: %s", ns, _key_hash(key), e)

    def items(self, ns: str) -> list[tuple[str, dict[str, Any]]]:
        try:
            names = sorted(os.listdir(self._ns_dir(ns)))
        except OSError:
            return []
        out: list[tuple[str, dict[str, Any]]] = []
        for name in names:
            if not name.endswith(".json"):
                continue
            loaded = self._load(self._ns_dir(ns) / name)
            if loaded is not None:
                out.append(loaded)
        return out

    def clear(self) -> None:
        try:
            namespaces = list(os.scandir(self._meta_dir))
        except OSError:
            return
        for ns in namespaces:
            if not ns.is_dir(follow_symlinks=False):
                continue
            try:
                for f in os.scandir(ns.path):
                    if f.name.endswith(".json"):
                        with contextlib.suppress(OSError):
                            os.unlink(f.path)
                os.rmdir(ns.path)
            except OSError:
                continue
