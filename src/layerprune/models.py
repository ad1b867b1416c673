"""Loading models: hub ids, local folders, GGUF files shipped in PyPI packages, tiny random inits.

Every loader returns a :class:`LoadedModel` whose ``fingerprint`` identifies the weights, so
that caches (layer scores, dense evaluations) can be keyed by it.
"""

from __future__ import annotations

import hashlib
import importlib.util
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

from layerprune.cache import digest
from layerprune.errors import LayerpruneError
from layerprune.files import cache_root, commit_dir, write_json

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


def from_packaged_gguf(
    name: str,
    parts: list[str],
    pip: list[str],
    sha256: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    cache_dir: str | None = None,
) -> LoadedModel:
    """A GGUF model shipped inside PyPI packages, converted once into a safetensors cache.

    ``parts`` are ``module/relative/path`` entries; several are concatenated in order.
    ``cache_dir`` is the cache root (default ``$LAYERPRUNE_CACHE`` or ~/.cache/layerprune).
    """
    files = [_package_file(p, pip, name) for p in parts]
    key = sha256 or digest([(str(f), f.stat().st_size) for f in files])
    entry = cache_root(cache_dir) / "models" / f"{name}-{key[:16]}"
    if not (entry / "layerprune_source.json").is_file():
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
        try:
            gguf = tmp / "gguf" / f"{name}.gguf"
            gguf.parent.mkdir()
            got = _assemble(files, gguf)
            if sha256 and got != sha256:
                raise LayerpruneError(
                    f"model '{name}': assembled GGUF has sha256 {got}, expected {sha256}; "
                    f"reinstall with: pip install --no-deps --force-reinstall {' '.join(pip)}"
                )
            info = _convert_gguf(gguf, tmp / "model", got)
            shutil.rmtree(gguf.parent)
            for f in (tmp / "model").iterdir():
                f.rename(tmp / f.name)
            (tmp / "model").rmdir()
            write_json(tmp / "layerprune_source.json", info)
            commit_dir(tmp, entry)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    dev = resolve_device(device)
    model = AutoModelForCausalLM.from_pretrained(entry, dtype=resolve_dtype(dtype, dev))
    model.to(dev)  # type: ignore[arg-type]  # transformers types .to oddly
    tokenizer = AutoTokenizer.from_pretrained(entry)
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
