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

import torch
from common import load, parser

from layerprune.speed import SpeedSettings, compare_speed


def main() -> None:
    args = parser(__doc__, n=1, seq_len=256).parse_args()
    torch.manual_seed(0)
    loaded = load(args).model
    first, second = copy.deepcopy(loaded), copy.deepcopy(loaded)
    settings = SpeedSettings(prompt_tokens=args.seq_len, repeats=args.repeats)
    print(f"{args.model}: {args.seq_len}-token prompt, {settings.new_tokens} decode tokens, "
          f"median of {settings.repeats} alternating repeats; tokens/s over a copy's")  # fmt: skip
    for name, model in {"loaded": loaded, "copy2": second}.items():
        record = compare_speed(first, model, settings)
        print(f"{name:7s} prefill {record['prefill']['speedup']:.3f}  "
              f"decode {record['decode']['speedup']:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
