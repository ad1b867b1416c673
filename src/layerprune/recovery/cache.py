"""The activation cache: the states around one block, written once to disk, memory-mapped.

Training a replacement on streamed states costs, per token, a no-grad forward of the dense
prefix (every layer up to the block's end) for each epoch. With the cache that prefix pass runs
once per (model, block, windows): later epochs, budget curves and the other recoveries of the
same block read the states from disk. An entry ``<cache>/activations/<key>/`` holds

* ``h_in.bin``, ``h_out.bin`` and one ``<tap>.bin`` per extra tensor (the linear fold's MLP
  output): ``(windows, positions, hidden)`` in float16 or bfloat16 (float32 for exact tests),
* ``kwargs.pt``: what the block's first layer is called with besides the hidden states
  (rotary embeddings, mask, position ids), from a one-window forward, so that it broadcasts
  over a batch of any size (windows share their length and positions),
* ``manifest.json``: the key, shapes, dtype and a BLAKE2 digest of every file.

The key is a digest of everything the states depend on: the bytes of every weight before the
block's end, the block, the windows' token ids, the taps and the dtype; so a stale entry is
never read. An entry is written in a staging folder and renamed into place (written once,
never modified), and every file is checked against its digest when the entry is opened; a
damaged entry is rebuilt. Reads go through ``mmap`` and each window's pages are released right
after it is copied, so resident memory stays flat however many windows the entry holds. A cache
folder that cannot be written is reported once, and the states are streamed instead.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from layerprune.cache import digest, warn_unwritable
from layerprune.errors import LayerpruneError
from layerprune.files import cache_root, commit_dir, locked_staging_dir, read_json, write_json
from layerprune.layers import decoder_stack
from layerprune.recovery.activations import BlockBatch, BlockStates, Streamed, block_batch

log = logging.getLogger(__name__)
VERSION = 1  # bump when the layout or the meaning of an entry changes
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
CHUNK = 1 << 24  # bytes hashed at a time when an entry is checked
PAGE = mmap.PAGESIZE


def _bytes(t: torch.Tensor) -> bytes | memoryview:
    """The raw bytes of a tensor (any dtype, bfloat16 included) without a copy."""
    array = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return memoryview(array.data)


def prefix_fingerprint(model: PreTrainedModel, end: int) -> str:
    """BLAKE2 of every parameter and buffer that can change the states entering layer ``end``:
    all of the model's but those of layers ``end`` and after.

    Computed from the bytes each time, never remembered: a change through ``.data`` (as in
    peft's LoRA merge) leaves a tensor's version and storage as they were, so no cheap stamp
    tells an edited weight from the same one. Hashing takes about a second per 500 MB of
    weights (a 1B model in bfloat16: about 4 s per cache lookup).
    """
    later = decoder_stack(model).layers[end:]
    skip = {id(t) for layer in later for t in chain(layer.parameters(), layer.buffers())}
    h = hashlib.blake2b(digest_size=16)
    for name, t in chain(model.named_parameters(), model.named_buffers()):
        if id(t) in skip:
            continue
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(_bytes(t))
    return h.hexdigest()


def _file_digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class ActivationCache:
    """Where entries live and the dtype they are stored in."""

    root: Path
    dtype: str = "float16"

    @classmethod
    def under(cls, cache_dir: str | Path | None, dtype: str) -> ActivationCache:
        """The ``activations`` folder of the layerprune cache (``paths.cache``)."""
        if dtype not in DTYPES:
            raise LayerpruneError(f"cache_dtype: {dtype}; allowed: {', '.join(DTYPES)}")
        return cls(cache_root(cache_dir) / "activations", dtype)

    def key(
        self,
        model: PreTrainedModel,
        start: int,
        size: int,
        windows: torch.Tensor,
        taps: Mapping[str, nn.Module],
    ) -> dict[str, Any]:
        names = {id(m): n for n, m in model.named_modules()}
        return {
            "version": VERSION,
            "model": type(model).__name__,
            "weights": prefix_fingerprint(model, start + size),
            "attention": getattr(model.config, "_attn_implementation", None),
            "block": [start, size],
            "windows": hashlib.sha256(_bytes(windows.long())).hexdigest(),
            "shape": list(windows.shape),
            "taps": {name: names.get(id(m), "?") for name, m in sorted(taps.items())},
            "dtype": self.dtype,
        }

    def states(
        self,
        model: PreTrainedModel,
        start: int,
        size: int,
        windows: torch.Tensor,
        batch_size: int,
        taps: Mapping[str, nn.Module] | None = None,
    ) -> BlockStates:
        """The entry for these states: opened, or built with one prefix pass, then opened."""
        taps = dict(taps or {})
        key = self.key(model, start, size, windows, taps)
        folder = self.root / digest(key)[:24]
        param = next(model.parameters())
        try:
            opened = Cached.open(folder, key, windows, param.dtype, param.device)
            if opened is None:
                self._build(folder, key, model, start, size, windows, batch_size, taps)
                opened = Cached.open(folder, key, windows, param.dtype, param.device)
        except OSError as e:
            warn_unwritable(str(self.root), e)
            return Streamed(model, start, size, windows, taps)
        if opened is None:
            raise LayerpruneError(f"activation cache {folder}: written but unreadable")
        return opened

    def _build(
        self,
        folder: Path,
        key: dict[str, Any],
        model: PreTrainedModel,
        start: int,
        size: int,
        windows: torch.Tensor,
        batch_size: int,
        taps: Mapping[str, nn.Module],
    ) -> None:
        dtype = DTYPES[self.dtype]
        names = ["h_in", "h_out", *taps]
        hidden = 0
        with locked_staging_dir(folder) as tmp:
            files = {name: (tmp / f"{name}.bin").open("wb") for name in names}
            hashes = {name: hashlib.blake2b(digest_size=16) for name in names}
            try:
                for ids in windows.split(batch_size):
                    batch = block_batch(model, start, size, ids, taps)
                    hidden = int(batch.h_out.shape[-1])
                    for name, tensor in _arrays(batch).items():
                        stored = tensor.detach().to(dtype)
                        if not bool(torch.isfinite(stored).all()):
                            raise LayerpruneError(
                                f"cache_dtype: {self.dtype} (the block's {name} overflows it); "
                                "allowed: bfloat16 or float32 for this model"
                            )
                        raw = _bytes(stored)
                        files[name].write(raw)
                        hashes[name].update(raw)
            finally:
                for f in files.values():
                    f.close()
            kwargs = block_batch(model, start, size, windows[:1], taps).layer_kwargs
            torch.save(_cpu(kwargs), tmp / "kwargs.pt")
            digests = {f"{n}.bin": hashes[n].hexdigest() for n in names}
            digests["kwargs.pt"] = _file_digest(tmp / "kwargs.pt")
            manifest = {"key": key, "hidden": hidden, "files": digests}
            write_json(tmp / "manifest.json", manifest)
            commit_dir(tmp, folder)
        log.debug("activation cache written: %s", folder)


def _arrays(batch: BlockBatch) -> dict[str, torch.Tensor]:
    """What an entry stores of a batch, every tensor shaped like h_out."""
    taps = {name: t.reshape(batch.h_out.shape) for name, t in batch.taps.items()}
    return {"h_in": batch.h_in, "h_out": batch.h_out, **taps}


def _cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, (tuple, list)):
        return type(obj)(_cpu(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    return obj


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


class Cached:
    """:class:`BlockStates` read from a cache entry through ``mmap``."""

    def __init__(
        self,
        folder: Path,
        windows: torch.Tensor,
        names: list[str],
        hidden: int,
        stored: torch.dtype,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.folder, self.windows, self.hidden = folder, windows, hidden
        self.stored, self.dtype, self.device = stored, dtype, device
        self.window_bytes = windows.shape[1] * hidden * torch.finfo(stored).bits // 8
        self._maps: dict[str, mmap.mmap] = {}
        for name in names:
            with (folder / f"{name}.bin").open("rb") as f:
                self._maps[name] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        kwargs = torch.load(folder / "kwargs.pt", weights_only=True)
        self.kwargs = _to(kwargs, device)

    @classmethod
    def open(
        cls,
        folder: Path,
        key: dict[str, Any],
        windows: torch.Tensor,
        dtype: torch.dtype,
        device: torch.device,
    ) -> Cached | None:
        """The entry in ``folder``; None when it is absent, or damaged (then removed)."""
        manifest_path = folder / "manifest.json"
        if not manifest_path.is_file():
            return None
        try:
            manifest = read_json(manifest_path)
            if manifest["key"] != key:
                raise ValueError("its key differs")
            for name, expected in manifest["files"].items():
                if _file_digest(folder / name) != expected:
                    raise ValueError(f"{name} does not match its digest")
            names = [n.removesuffix(".bin") for n in manifest["files"] if n.endswith(".bin")]
            opened = cls(
                folder, windows, names, manifest["hidden"], DTYPES[key["dtype"]], dtype, device
            )
            expected_size = len(windows) * opened.window_bytes
            if any(len(m) != expected_size for m in opened._maps.values()):
                raise ValueError("a file has the wrong size")
        except (ValueError, KeyError, TypeError, OSError, RuntimeError) as e:
            log.warning("activation cache %s is damaged (%s); rebuilding it", folder, e)
            shutil.rmtree(folder, ignore_errors=True)
            return None
        return opened

    def _window(self, name: str, i: int) -> torch.Tensor:
        """Window ``i`` of one array, copied out; its pages are released from this process."""
        mm, size = self._maps[name], self.window_bytes
        offset = i * size
        raw = torch.frombuffer(bytearray(mm[offset : offset + size]), dtype=torch.uint8)
        first = offset - offset % PAGE
        mm.madvise(mmap.MADV_DONTNEED, first, offset + size - first)
        return raw.view(self.stored).view(self.windows.shape[1], self.hidden)

    def batch(self, index: torch.Tensor) -> BlockBatch:
        rows = index.tolist()
        arrays = {
            name: torch.stack([self._window(name, i) for i in rows]).to(self.device, self.dtype)
            for name in self._maps
        }
        taps = {k: v for k, v in arrays.items() if k not in ("h_in", "h_out")}
        return BlockBatch(
            self.windows[index], arrays["h_in"], arrays["h_out"], dict(self.kwargs), taps
        )


@dataclass(kw_only=True)
class CacheSettings:
    """The activation-cache settings of a step that reads a block's states."""

    activation_cache: bool = False  # write the states once, read them from disk after
    cache_dtype: str = "float16"  # float16 | bfloat16 | float32 (exact, for tests)

    def check_cache(self, step: str) -> None:
        if self.cache_dtype not in DTYPES:
            raise LayerpruneError(
                f"recovery '{step}': cache_dtype {self.cache_dtype}; allowed: {', '.join(DTYPES)}"
            )

    def cache_settings(self) -> dict[str, object]:
        return {"activation_cache": self.activation_cache, "cache_dtype": self.cache_dtype}

    def states(
        self,
        model: PreTrainedModel,
        start: int,
        size: int,
        windows: torch.Tensor,
        batch_size: int,
        cache_dir: str | None,
        taps: Mapping[str, nn.Module] | None = None,
    ) -> BlockStates:
        """The block's states for ``windows``: streamed, or from the activation cache."""
        if not self.activation_cache:
            return Streamed(model, start, size, windows, taps)
        cache = ActivationCache.under(cache_dir, self.cache_dtype)
        return cache.states(model, start, size, windows, batch_size, taps)
