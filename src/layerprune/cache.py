"""A small content-addressed JSON cache (layer scores, dense-model evaluations).

Entries are keyed by a digest of everything that affects them, written atomically, and carry a
checksum so that a corrupted entry is detected, reported and recomputed rather than trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from layerprune.files import cache_root, write_json

log = logging.getLogger(__name__)


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


class JsonCache:
    def __init__(self, kind: str, root: str | Path | None = None) -> None:
        self.dir = cache_root(root) / kind

    def path(self, key: Any) -> Path:
        return self.dir / f"{digest(key)[:24]}.json"

    def get(self, key: Any) -> Any | None:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            entry = json.loads(path.read_text())
            payload = entry["payload"]
            if entry["checksum"] != digest(payload) or entry["key"] != json.loads(
                json.dumps(key, default=str)
            ):
                raise ValueError("checksum or key mismatch")
        except (ValueError, KeyError, TypeError) as e:
            log.warning("cache entry %s is corrupted (%s); recomputing", path, e)
            return None
        return payload

    def put(self, key: Any, payload: Any) -> None:
        entry = {"key": key, "checksum": digest(payload), "payload": payload}
        write_json(self.path(key), json.loads(json.dumps(entry, default=str)))

    def get_or_compute(self, key: Any, compute: Callable[[], Any]) -> tuple[Any, bool]:
        """Return ``(payload, hit)``."""
        cached = self.get(key)
        if cached is not None:
            return cached, True
        payload = compute()
        self.put(key, payload)
        return payload, False
