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

import statistics
from collections.abc import Callable

import torch
from common import load, parser, windows

from layerprune.layers import decoder_stack
from layerprune.resources import measure
from layerprune.scoring import collect_layer_stats


def main() -> None:
    cli = parser(__doc__, n=32, seq_len=512)
    args = cli.parse_args()

    loaded = load(args)
    model, device = loaded.model, next(loaded.model.parameters()).device
    ids = windows(loaded, args, "wiki.txt")

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
