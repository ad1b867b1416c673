"""Why the speed column times two deep copies: a model's weights as loaded against a deep copy of
the same model, timed alternately on the same prompts, and the ratio of two copies beside it.

    python benchmarks/speed_copies.py --model smollm2_135m --repeats 5

A ratio of 1 between the loaded model and its copy would mean the loaded weights can stand for
the dense side of a speed comparison; the pipeline does not rely on it, since weights as loaded
can read slower than a copy's (on a 2-core CPU, SmolLM2-135M in float32 decoded 6% slower as
loaded in one measurement, 19% in another). Two copies of the same model give the noise floor
of the speed-up ratio.
"""

from __future__ import annotations

import copy
import statistics

import torch
from common import load, parser

from layerprune.speed import SpeedSettings, alternate, decode, prefill, prompt


def main() -> None:
    args = parser(__doc__, n=1, seq_len=256).parse_args()
    torch.manual_seed(0)
    loaded = load(args).model
    models = {"loaded": loaded, "copy": copy.deepcopy(loaded), "copy2": copy.deepcopy(loaded)}
    settings = SpeedSettings(batch_size=1, prompt_tokens=args.seq_len, repeats=args.repeats)
    ids = prompt(loaded, settings)
    timings = {}
    for name, model in models.items():
        timings[f"prefill {name}"] = lambda m=model: prefill(m, ids)
        timings[f"decode {name}"] = lambda m=model: decode(m, ids, settings.new_tokens)
    seconds = alternate(timings, settings.repeats)
    median = {name: statistics.median(s) for name, s in seconds.items()}
    print(f"{args.model}: {args.seq_len}-token prompt, {settings.new_tokens} decode tokens, "
          f"median of {settings.repeats} alternating repeats")  # fmt: skip
    for phase in ("prefill", "decode"):
        ms = {name: 1000 * median[f"{phase} {name}"] for name in models}
        print(
            f"{phase:8s} loaded {ms['loaded']:8.1f} ms  copy {ms['copy']:8.1f} ms  "
            f"copy2 {ms['copy2']:8.1f} ms  loaded/copy {ms['loaded'] / ms['copy']:.3f}  "
            f"copy2/copy {ms['copy2'] / ms['copy']:.3f}"
        )


if __name__ == "__main__":
    main()
