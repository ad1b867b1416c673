"""Atomic writes, so that a crash never leaves a half-written result behind.

Temporary files and folders are created private (``mkstemp``/``mkdtemp`` use 0600/0700) and
given the permissions the user's umask asks for just before they are renamed into place, so
colleagues on a shared machine can read results exactly as they could read any other file.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

STALE_AFTER_S = 60.0  # a temporary file or folder this old, and unlocked, was left by a killed run
LOCK_NAME = ".lock"  # held (flock) inside a staging folder while it is written


def umask() -> int:
    """The process's umask (Python can only read it by setting it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then rename it into place.

    The temporary file is locked (``flock``) while it is written, so that
    :func:`clean_stale` never removes a file another process is still writing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
    return path


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def finite(obj: Any, where: str = "", found: list[str] | None = None) -> tuple[Any, list[str]]:
    """``obj`` with every NaN or infinite float replaced by None, and where they were
    (``eval/perplexity/pruned/ppl``)."""
    found = [] if found is None else found
    if isinstance(obj, float) and not math.isfinite(obj):
        found.append(where)
        return None, found
    if isinstance(obj, dict):
        return {k: finite(v, f"{where}/{k}" if where else str(k), found)[0]
                for k, v in obj.items()}, found  # fmt: skip
    if isinstance(obj, (list, tuple)):
        return [finite(v, f"{where}/{i}", found)[0] for i, v in enumerate(obj)], found
    return obj, found


def write_json(path: str | Path, obj: Any) -> Path:
    """Strict JSON: a NaN or infinite number (a perplexity that overflowed) is written as null,
    and a top-level ``non_finite`` list names where, so no reader meets a literal ``NaN``."""
    clean, found = finite(obj)
    if found and isinstance(clean, dict):
        clean["non_finite"] = found
    text = json.dumps(clean, indent=2, sort_keys=False, allow_nan=False)
    return write_text(path, text + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def staging_dir(final_dir: Path) -> Path:
    """An empty hidden folder beside ``final_dir`` to write into before :func:`commit_dir`."""
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.", suffix=".tmp", dir=final_dir.parent))


@contextmanager
def locked_staging_dir(final_dir: Path) -> Iterator[Path]:
    """:func:`staging_dir`, locked while the block runs (its ``.lock`` file is held), so that
    :func:`clean_stale` leaves it alone; removed afterwards unless committed."""
    tmp = staging_dir(final_dir)
    try:
        with (tmp / LOCK_NAME).open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _unlocked(path: Path) -> bool:
    """True when no process holds a lock on ``path`` (a file) right now."""
    try:
        with path.open("rb") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
    except BlockingIOError:
        return False


def clean_stale(folder: Path, recursive: bool = False, min_age_s: float = STALE_AFTER_S) -> int:
    """Remove what killed runs left in ``folder``: layerprune's hidden ``.<name>.*.tmp`` files
    and staging folders (those holding a ``.lock``), only when older than ``min_age_s`` and not
    locked by a writer. Returns how many were removed; problems (a read-only folder) pass.
    """
    removed = 0
    try:
        candidates = list(folder.glob("**/.*.tmp" if recursive else ".*.tmp"))
    except OSError:
        return 0
    now = time.time()
    for path in candidates:
        try:
            if now - path.lstat().st_mtime < min_age_s or path.is_symlink():
                continue
            if path.is_dir():
                lock = path / LOCK_NAME  # only locked staging folders are known to be ours
                if not lock.is_file() or not _unlocked(lock):
                    continue
                shutil.rmtree(path)
            elif path.is_file() and _unlocked(path):
                path.unlink()
            else:
                continue
            removed += 1
        except OSError:
            continue
    return removed


def commit_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Move a fully written folder into place; whoever commits first wins."""
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(tmp_dir, 0o777 & ~umask())
    try:
        os.replace(tmp_dir, final_dir)
    except OSError:
        if not final_dir.is_dir():
            raise
        shutil.rmtree(tmp_dir, ignore_errors=True)


def cache_root(override: str | Path | None = None) -> Path:
    """Where models, scores and dense evaluations are cached (``LAYERPRUNE_CACHE`` overrides)."""
    if override:
        return Path(override).expanduser()
    env = os.environ.get("LAYERPRUNE_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "layerprune"
