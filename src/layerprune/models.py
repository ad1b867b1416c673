"""Loading models: hub ids, local folders, GGUF files shipped in PyPI packages, tiny random inits.

Every loader returns a :class:`LoadedModel` whose ``fingerprint`` identifies the weights, so
that caches (layer scores, dense evaluations) can be keyed by it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from layerprune.cache import digest, warn_unwritable
from layerprune.errors import LayerpruneError
from layerprune.files import (
    LOCK_NAME,
    cache_root,
    clean_stale,
    commit_dir,
    locked_staging_dir,
    read_json,
    write_json,
)

log = logging.getLogger(__name__)
SOURCE = "layerprune_source.json"  # written last into a converted folder: what it holds
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CONVERSION_CHECK_TEXT = "The quick brown fox jumps over the lazy dog. Layer pruning keeps"


@dataclass
class LoadedModel:
    """A model and its tokenizer; ``source`` says where the weights came from (a hub id, a
    folder, a GGUF package) and ``fingerprint`` identifies weights and dtype for the caches."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    fingerprint: str
    source: str = ""


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is bf16 on GPU and fp32 on CPU (bf16 matmuls are slow on most CPUs)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise LayerpruneError(f"unknown dtype '{dtype}'; allowed: auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _finish(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    name: str,
    identity: Any,
    source: str,
) -> LoadedModel:
    model.eval()
    model.config._name_or_path = source
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return LoadedModel(model, tokenizer, name, digest([identity, dtype])[:16], source)


def from_pretrained(
    name: str,
    path: str,
    revision: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    device_map: str | None = None,
) -> LoadedModel:
    """A hub id or a local folder in the standard ``save_pretrained`` layout."""
    local = Path(path).expanduser()
    looks_local = path.startswith(("/", ".", "~")) or local.exists()
    if looks_local and not (local / "config.json").is_file():
        raise LayerpruneError(
            f"model path '{path}' is not a model folder (no config.json there); "
            "give a hub id or a folder written by save_pretrained"
        )
    dev = resolve_device(device)
    kwargs: dict[str, Any] = {"dtype": resolve_dtype(dtype, dev), "revision": revision}
    if device_map:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(str(local) if looks_local else path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(local) if looks_local else path)
    except OSError as e:
        raise LayerpruneError(
            f"cannot load model '{path}': {str(e).splitlines()[0]} (offline? use a packaged "
            "model such as model=smollm2_135m, or a local folder)"
        ) from e
    if not device_map:
        model.to(dev)  # type: ignore[arg-type]  # transformers types .to oddly
    if looks_local:
        files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in local.iterdir())
        identity: Any = ["local", str(local.resolve()), files]
        source = str(local.resolve())
    else:
        identity = ["hub", path, revision]
        source = path if revision is None else f"{path}@{revision}"
    return _finish(model, tokenizer, name, identity, source)


def _package_file(spec: str, pip: list[str], model_name: str) -> Path:
    """``module/rel/path`` -> the file inside that installed package."""
    module, _, rel = spec.partition("/")
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        raise LayerpruneError(
            f"model '{model_name}' needs the offline package providing '{module}', which is not "
            f"installed; install with: pip install --no-deps {' '.join(pip)}"
        )
    path = Path(next(iter(found.submodule_search_locations))) / rel
    if not path.is_file():
        raise LayerpruneError(f"model '{model_name}': file '{path}' missing from its package")
    return path


def _assemble(parts: list[Path], out: Path) -> str:
    """Concatenate the GGUF parts into ``out``; return the sha256 of the result."""
    digest = hashlib.sha256()
    with out.open("wb") as dst:
        for part in parts:
            with part.open("rb") as src:
                while chunk := src.read(1 << 24):
                    digest.update(chunk)
                    dst.write(chunk)
    return digest.hexdigest()


def _check_logits(a: PreTrainedModel, b: PreTrainedModel, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float((a(ids).logits - b(ids).logits).abs().max())


def _convert_gguf(gguf: Path, out: Path, sha256: str) -> dict[str, Any]:
    """Dequantise a GGUF file once into a standard safetensors folder, checked on a sample."""
    quantized = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses a GGUF-loaded model: rebuild a plain one from its weights.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.tensor([tokenizer(CONVERSION_CHECK_TEXT).input_ids])
    diff = _check_logits(quantized, reloaded.eval(), ids)
    if diff > 1e-4:
        raise LayerpruneError(
            f"GGUF conversion of '{gguf.name}' is wrong: converted logits differ by {diff:.3g}"
        )
    return {"gguf_sha256": sha256, "gguf_file": gguf.name, "check_max_abs_logit_diff": diff}


def sha256_of(path: Path) -> str:
    """The file's sha256 (0.6 s for SmolLM2-135M's 540 MB on one CPU core)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def file_record(folder: Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file of a converted folder, checked each time it is used."""
    return {
        f.name: {"size": f.stat().st_size, "sha256": sha256_of(f)}
        for f in sorted(folder.iterdir())
        if f.is_file() and f.name not in (SOURCE, LOCK_NAME)
    }


def folder_problem(entry: Path) -> str | None:
    """Why a converted model folder cannot be trusted (changed, truncated or missing files, an
    unfinished conversion), or None when every recorded file has its size and hash."""
    try:
        info = read_json(entry / SOURCE)
    except FileNotFoundError:
        return f"no {SOURCE}: its conversion did not finish"
    except (OSError, ValueError) as e:
        return f"{SOURCE} is unreadable ({e})"
    files = info.get("files") if isinstance(info, dict) else None
    if not isinstance(files, dict) or not files:
        return f"{SOURCE} records no file sizes and hashes (made by an older layerprune)"
    for fname, expected in files.items():
        path = entry / fname
        try:
            size = path.stat().st_size
            if size != expected["size"]:
                return f"{fname} has {size} bytes, {expected['size']} expected"
            if sha256_of(path) != expected["sha256"]:
                return f"{fname} has changed (its sha256 differs)"
        except FileNotFoundError:
            return f"{fname} is missing"
        except OSError as e:
            return f"{fname} is unreadable ({e.strerror})"
    return None


def _convert_into(
    folder: Path, files: list[Path], name: str, pip: list[str], sha256: str | None
) -> None:
    """Assemble the GGUF parts, check the hash, convert, and record every file's hash."""
    gguf = folder / "gguf" / f"{name}.gguf"
    gguf.parent.mkdir()
    got = _assemble(files, gguf)
    if sha256 and got != sha256:
        raise LayerpruneError(
            f"model '{name}': assembled GGUF has sha256 {got}, expected {sha256}; "
            f"reinstall with: pip install --no-deps --force-reinstall {' '.join(pip)}"
        )
    info = _convert_gguf(gguf, folder / "model", got)
    shutil.rmtree(gguf.parent)
    for f in (folder / "model").iterdir():
        f.rename(folder / f.name)
    (folder / "model").rmdir()
    write_json(folder / SOURCE, {**info, "files": file_record(folder)})


def _discard(entry: Path) -> None:
    """Move a damaged folder out of the way (readers that have it open keep their files)."""
    aside = entry.with_name(f".{entry.name}.{os.getpid()}.discarded")
    entry.rename(aside)
    shutil.rmtree(aside, ignore_errors=True)


def converted_folder(
    name: str, files: list[Path], pip: list[str], sha256: str | None, entry: Path
) -> tuple[Path, bool]:
    """The verified converted folder ``entry``, (re)built from the GGUF when it is missing or
    damaged; ``(folder, temporary)``, where a cache that cannot be written gives a temporary
    folder for this run only (reported once)."""
    clean_stale(entry.parent)
    if entry.exists():
        problem = folder_problem(entry)
        if problem is None:
            return entry, False
        log.warning("warning: converted model %s is not intact (%s); rebuilding it", entry, problem)
    try:
        if entry.exists():
            _discard(entry)
        with locked_staging_dir(entry) as tmp:
            _convert_into(tmp, files, name, pip, sha256)
            commit_dir(tmp, entry)
        return entry, False
    except OSError as e:
        warn_unwritable(str(entry.parent), e)
    tmp = Path(tempfile.mkdtemp(prefix=f"layerprune-{name}-"))
    try:
        _convert_into(tmp, files, name, pip, sha256)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp, True


def from_packaged_gguf(
    name: str,
    parts: list[str],
    pip: list[str],
    sha256: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    cache_dir: str | None = None,
    model_type: str | None = None,
) -> LoadedModel:
    """A GGUF model shipped inside PyPI packages, converted once into a safetensors cache.

    ``parts`` are ``module/relative/path`` entries; several are concatenated in order.
    ``cache_dir`` is the cache root (default ``$LAYERPRUNE_CACHE`` or ~/.cache/layerprune).
    The converted folder records each file's size and sha256; a folder that no longer matches
    is reported and rebuilt. ``model_type`` is the transformers model type the GGUF holds, for
    the config checks made before loading (:mod:`layerprune.validation`).
    """
    files = [_package_file(p, pip, name) for p in parts]
    key = sha256 or digest([(str(f), f.stat().st_size) for f in files])
    entry = cache_root(cache_dir) / "models" / f"{name}-{key[:16]}"
    folder, temporary = converted_folder(name, files, pip, sha256, entry)
    try:
        dev = resolve_device(device)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=resolve_dtype(dtype, dev))
        model.to(dev)  # type: ignore[arg-type]  # transformers types .to oddly
        tokenizer = AutoTokenizer.from_pretrained(folder)
    finally:
        if temporary:
            shutil.rmtree(folder, ignore_errors=True)
    source = f"{name}: {Path(parts[0]).name.split('.part')[0]} from PyPI {', '.join(pip)}"
    return _finish(model, tokenizer, name, ["gguf", key], source)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A real byte-level tokenizer (256 bytes + bos/eos/pad) that needs no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for special in ("<bos>", "<eos>", "<pad>"):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )


def random_init(
    name: str,
    model_type: str,
    config: dict[str, Any],
    seed: int = 0,
    dtype: str = "float32",
    device: str = "cpu",
) -> LoadedModel:
    """A tiny randomly initialised model of a real architecture: for tests, never for results."""
    tokenizer = byte_tokenizer()
    cfg = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **config,
    )
    torch.manual_seed(seed)
    dev = resolve_device(device)
    model = AutoModelForCausalLM.from_config(cfg, dtype=resolve_dtype(dtype, dev)).to(dev)
    # Norm weights start as constants, which makes a norm a mere rescaling; perturb them so
    # that, as in trained models, normalising changes a state's direction.
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if "norm" in pname:
                param.add_(0.3 * torch.randn_like(param))
    identity = ["random", model_type, config, seed]
    return _finish(model, tokenizer, name, identity, f"random init of {model_type} (seed {seed})")
