"""Atomic writes, so that a crash never leaves a half-written result behind.

Temporary files and folders are created private (``mkstemp``/``mkdtemp`` use 0600/0700) and
given the permissions the user's umask asks for just before they are renamed into place, so
colleagues on a shared machine can read results exactly as they could read any other file.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def umask() -> int:
    """The process's umask (Python can only read it by setting it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def staging_dir(final_dir: Path) -> Path:
    """An empty hidden folder beside ``final_dir`` to write into before :func:`commit_dir`."""
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.", suffix=".tmp", dir=final_dir.parent))


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
