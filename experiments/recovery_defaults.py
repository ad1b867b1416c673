"""Which tokens the recovery objectives should leave out: each variant on the same block, from
one activation cache, with held-out MSE and cosine (all tokens and fitted ones) against plain
removal, and WikiText-2 perplexity.

    python experiments/recovery_defaults.py --only linear    # then --only trained

The blocks default to the Streamline plans of SmolLM2-135M at 25% of the parameters: [10, 19)
for the linear fold (no layer added) and [9, 19) for the replacements (one layer put back).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

from layerprune.calibration import TextFile
from layerprune.models import LoadedModel
from layerprune.perplexity import perplexity_of_file
from layerprune.recovery import LayerReplacement, LinearReplacement
from layerprune.surgery import remove_layers

NONE: dict[str, Any] = {"exclude_positions": []}  # explicit: the defaults are what this chose
FIRST: dict[str, Any] = {"exclude_positions": [0]}
LINEAR: dict[str, dict[str, Any] | None] = {
    "plain removal": None,
    "mse": NONE,
    "mse, no position 0": FIRST,
    "mse, no outliers (k=10)": {**NONE, "exclude_outliers": 10.0},
    "mse, neither": {**FIRST, "exclude_outliers": 10.0},
    "nmse": {**NONE, "loss": "nmse"},
    "nmse, no position 0": {**FIRST, "loss": "nmse"},
    "cosine": {**NONE, "loss": "cosine"},
    "cosine, no position 0": {**FIRST, "loss": "cosine"},
}
TRAINED: dict[str, dict[str, Any] | None] = {
    "plain removal": None,
    "layer mse": {**NONE, "kind": "layer"},
    "layer mse, no position 0": {**FIRST, "kind": "layer"},
    "ffn mse": {**NONE, "kind": "ffn"},
    "ffn mse, no position 0": {**FIRST, "kind": "ffn"},
}


def load(model: str) -> LoadedModel:
    from hydra.utils import instantiate

    from layerprune.app import compose

    return instantiate(compose([f"model={model}"]).model, _convert_="all")


def row(name: str, report: dict[str, Any] | None, ppl: float, seconds: float) -> dict[str, Any]:
    keys = ("mse_identity", "mse_after", "mse_identity_fitted", "mse_after_fitted",
            "cosine_identity", "cosine_after", "cosine_after_fitted")  # fmt: skip
    figures = {k: (report or {}).get(f"heldout_{k}") for k in keys}
    return {"variant": name, **figures, "ppl": ppl, "seconds": round(seconds, 1),
            "train_tokens": (report or {}).get("train_tokens")}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--windows", type=int, default=128, help="wiki windows, 10%% held out")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--linear-block", type=int, nargs=2, default=[10, 19])
    parser.add_argument("--trained-block", type=int, nargs=2, default=[9, 19])
    parser.add_argument("--trained-tokens", type=int, default=4 * 115 * 512)
    parser.add_argument("--ppl-tokens", type=int, default=8192)
    parser.add_argument("--only", choices=("linear", "trained"), default=None)
    parser.add_argument("--variants", nargs="+", default=None, help="these names only")
    parser.add_argument("--cache", default="/tmp/layerprune-activations")
    parser.add_argument("--mirror", default=None, help="the data mirror (default: as the app)")
    parser.add_argument("--out", type=Path, default=None, help="also write rows here (JSON lines)")
    args = parser.parse_args()
    if args.mirror is None:
        from layerprune.app import default_mirror

        args.mirror = default_mirror()
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}}) + "\n")
    loaded = load(args.model)
    text = Path(args.mirror) / "text"
    windows = TextFile(n=args.windows, seq_len=args.seq_len, path=str(text / "wiki.txt"))
    ids = windows.windows(loaded.tokenizer)
    held = max(1, round(0.1 * len(ids)))
    train, heldout = ids[:-held], ids[-held:]
    wikitext = text / "wikitext2_tokenized_test.txt"
    common: dict[str, Any] = {"activation_cache": True, "progress": False}
    groups = {"linear": (LINEAR, args.linear_block), "trained": (TRAINED, args.trained_block)}
    for group, (variants, (start, end)) in groups.items():
        if args.only not in (None, group):
            continue
        print(f"\n{group}: block [{start}, {end}), {len(train)} + {held} windows of {args.seq_len}")
        for name, settings in variants.items():
            if args.variants is not None and name not in args.variants:
                continue
            model = copy.deepcopy(loaded.model)
            began, report = time.perf_counter(), None
            removed = list(range(start, end))
            step: LinearReplacement | LayerReplacement | None = None
            if settings is not None and group == "linear":
                step = LinearReplacement(**settings, **common)
            elif settings is not None:
                step = LayerReplacement(**settings, **common, tokens=args.trained_tokens)
            if step is None:
                remove_layers(model, removed)
            else:
                report = step(
                    model, removed, train, heldout=heldout, cache_dir=args.cache
                ).to_dict()
            seconds = time.perf_counter() - began
            ppl = perplexity_of_file(model, loaded.tokenizer, wikitext, seq_len=512, batch_size=8,
                                     max_tokens=args.ppl_tokens).ppl  # fmt: skip
            line = json.dumps({"block": [start, end], **row(name, report, ppl, seconds)})
            print(line, flush=True)
            if args.out is not None:
                with args.out.open("a") as f:
                    f.write(line + "\n")
            del model


if __name__ == "__main__":
    main()
