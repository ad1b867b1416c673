"""A small content-addressed JSON cache (layer scores, dense-model evaluations).

Entries are keyed by a digest of everything that affects them, written atomically, and carry a
checksum so that a corrupted entry is detected, reported and recomputed rather than trusted.
A cache that cannot be written (read-only, full disk) is reported once and the run goes on
with what it computed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from layerprune.files import cache_root, finite, write_json

log = logging.getLogger(__name__)
_reported: set[str] = set()  # cache folders already reported as unwritable in this process


def warn_unwritable(what: str, error: OSError) -> None:
    """One warning per folder and process: a cache that cannot be written never stops a run."""
    if what in _reported:
        return
    _reported.add(what)
    log.warning(
        "warning: cache %s cannot be written (%s: %s); going on without it",
        what, error.filename or what, error.strerror or error,
    )  # fmt: skip


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


class JsonCache:
    def __init__(self, kind: str, root: str | Path | None = None) -> None:
        self.dir = cache_root(root) / kind

    def path(self, key: Any) -> Path:
        return self.dir / f"{digest(key)[:24]}.json"

    def get(self, key: Any) -> Any | None:
        path = self.path(key)
        try:
            if not path.is_file():
                return None
            entry = json.loads(path.read_text())
            payload = entry["payload"]
            if entry["checksum"] != digest(payload) or entry["key"] != json.loads(
                json.dumps(key, default=str)
            ):
                raise ValueError("checksum or key mismatch")
        except OSError:
            return None  # unreadable (a cache path under a file): computed instead
        except (ValueError, KeyError, TypeError) as e:
            log.warning("cache entry %s is corrupted (%s); recomputing", path, e)
            return None
        return payload

    def put(self, key: Any, payload: Any) -> None:
        """Store an entry; a folder that cannot be written is reported once, not raised."""
        payload = finite(payload)[0]  # stored as read back: null where a value was NaN or inf
        entry = {"key": key, "checksum": digest(payload), "payload": payload}
        try:
            write_json(self.path(key), json.loads(json.dumps(entry, default=str)))
        except OSError as e:
            warn_unwritable(str(self.dir), e)

    def get_or_compute(self, key: Any, compute: Callable[[], Any]) -> tuple[Any, bool]:
        """Return ``(payload, hit)``."""
        cached = self.get(key)
        if cached is not None:
            return cached, True
        payload = compute()
        self.put(key, payload)
        return payload, False
