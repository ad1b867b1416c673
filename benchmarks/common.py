"""What the benchmarks share: a real model from its config, or a random-init one of a real shape
(which times exactly like the real weights and needs only torch and transformers), and its
calibration windows."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from layerprune.calibration import TextFile
from layerprune.models import LoadedModel, byte_tokenizer, random_init, resolve_device

ROOT = Path(__file__).resolve().parents[1]
MIRROR = ROOT.parent / "shared" / "data"  # the data mirror beside the checkout
SHAPES = {
    "smollm2_135m": {
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "max_position_embeddings": 2048,
    },
    "llama2_7b": {
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "max_position_embeddings": 4096,
    },
}


def parser(doc: str | None, n: int, seq_len: int) -> argparse.ArgumentParser:
    """The options every model benchmark takes; ``n`` and ``seq_len`` are its defaults."""
    out = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    out.add_argument("--model", default="smollm2_135m", help="a conf/model config name")
    out.add_argument("--shape", choices=sorted(SHAPES), help="random-init model of this shape")
    out.add_argument("--n", type=int, default=n, help="calibration windows")
    out.add_argument("--seq-len", type=int, default=seq_len)
    out.add_argument("--batch-size", type=int, default=8)
    out.add_argument("--repeats", type=int, default=3)
    out.add_argument("--device", default="auto")
    out.add_argument("--mirror", default=str(MIRROR))
    return out


def load(args: argparse.Namespace) -> LoadedModel:
    """``--shape``: a random-init model of that shape; else the ``--model`` config."""
    if args.shape:
        dtype = "bfloat16" if resolve_device(args.device).type == "cuda" else "float32"
        return random_init(args.shape, "llama", SHAPES[args.shape], dtype=dtype, device=args.device)
    from hydra.utils import instantiate

    from layerprune.app import compose

    cfg = compose([f"model={args.model}", f"model.device={args.device}"])
    return instantiate(cfg.model, _convert_="all")


def windows(loaded: LoadedModel, args: argparse.Namespace, text: str) -> torch.Tensor:
    """``--n`` windows of ``--seq-len`` tokens of the mirror's ``text`` (random tokens for a
    random-init model: they are as good as text there)."""
    if args.shape:
        gen = torch.Generator().manual_seed(0)
        return torch.randint(3, len(byte_tokenizer()), (args.n, args.seq_len), generator=gen)
    path = Path(args.mirror) / "text" / text
    return TextFile(n=args.n, seq_len=args.seq_len, path=str(path)).windows(loaded.tokenizer)
