"""Time and peak memory of the one-pass scoring against a plain no-grad forward.

    python benchmarks/scoring_overhead.py --model smollm2_135m --n 32 --seq-len 512
    python benchmarks/scoring_overhead.py --shape llama2_7b --n 16 --seq-len 2048   # GPU

The passes run on the same windows, alternating, ``--repeats`` times; the figures are medians
and the ratios are scoring / plain forward (the full model, LM head included) and scoring /
decoder forward (the decoder stack alone, which is what the scoring pass runs). ``--shape``
builds a random-init model of a real architecture (times exactly like the real weights) and
needs only torch and transformers.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from pathlib import Path

import torch

from layerprune.calibration import TextFile
from layerprune.layers import decoder_stack
from layerprune.models import LoadedModel, byte_tokenizer, random_init, resolve_device
from layerprune.resources import measure
from layerprune.scoring import collect_layer_stats

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "llama2_7b": {
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "max_position_embeddings": 4096,
    },
}


def load(args: argparse.Namespace) -> LoadedModel:
    if args.shape:
        dtype = "bfloat16" if resolve_device(args.device).type == "cuda" else "float32"
        return random_init(args.shape, "llama", SHAPES[args.shape], dtype=dtype, device=args.device)
    from hydra.utils import instantiate

    from layerprune.app import compose

    cfg = compose([f"model={args.model}", f"model.device={args.device}"])
    return instantiate(cfg.model, _convert_="all")


def windows(loaded: LoadedModel, args: argparse.Namespace) -> torch.Tensor:
    if args.shape:  # random weights: random tokens are as good as text
        gen = torch.Generator().manual_seed(0)
        return torch.randint(3, len(byte_tokenizer()), (args.n, args.seq_len), generator=gen)
    text = Path(args.mirror) / "text" / "wiki.txt"
    return TextFile(n=args.n, seq_len=args.seq_len, path=str(text)).windows(loaded.tokenizer)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", default="smollm2_135m", help="a conf/model config name")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="random-init model of this shape")
    parser.add_argument("--n", type=int, default=32, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--mirror", default=str(ROOT.parent / "shared" / "data"))
    args = parser.parse_args()

    loaded = load(args)
    model, device = loaded.model, next(loaded.model.parameters()).device
    ids = windows(loaded, args)

    base = decoder_stack(model).base

    @torch.no_grad()
    def forward(module: torch.nn.Module) -> None:
        for batch in ids.split(args.batch_size):
            module(input_ids=batch.to(device), use_cache=False)

    # The scoring pass skips the LM head; "decoder forward" does too, so its ratio is the
    # overhead of the hooks and the statistics alone.
    passes: dict[str, Callable[[], object]] = {
        "plain forward": lambda: forward(model),
        "decoder forward": lambda: forward(base),
        "scoring pass": lambda: collect_layer_stats(model, ids, batch_size=args.batch_size),
    }
    passes["plain forward"]()  # warm-up
    results: dict[str, list[tuple[float, float]]] = {label: [] for label in passes}
    for _ in range(args.repeats):
        for label, fn in passes.items():
            results[label].append(measure(fn, device)[1:])

    name = args.shape or args.model
    print(
        f"{name} on {device}: {args.n} windows x {args.seq_len} tokens, batch {args.batch_size}, "
        f"median of {args.repeats}"
    )
    medians = {}
    for label, runs in results.items():
        t = statistics.median(r[0] for r in runs)
        m = statistics.median(r[1] for r in runs)
        medians[label] = t
        print(
            f"  {label:15s} {t:8.2f} s   peak +{m:.2f} GiB   "
            f"(times: {', '.join(f'{r[0]:.2f}' for r in runs)})"
        )
    for reference in ("plain forward", "decoder forward"):
        print(f"  ratio scoring / {reference}: {medians['scoring pass'] / medians[reference]:.3f}")


if __name__ == "__main__":
    main()
