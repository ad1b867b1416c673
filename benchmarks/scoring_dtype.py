"""The one-pass layer statistics in bfloat16 against float32: speed and the layers they choose.

    python benchmarks/scoring_dtype.py --model smollm2_135m --n 64 --seq-len 512

The model is loaded in both dtypes; the scoring pass runs on the same calibration windows (the
`wiki` defaults: 64 windows of 512 tokens), alternating, ``--repeats`` times. Printed: each
dtype's median seconds and tokens/s, the ratio, the largest difference of Block Influence and
of block cosine, and the plan every scorer makes at ``--sparsity`` of the parameters in each
dtype (ShortGPT's layers, the Streamline and angular blocks).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

import layerprune as lp
from layerprune.app import build, compose
from layerprune.models import LoadedModel
from layerprune.resources import measure

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", default="smollm2_135m", help="a conf/model config name")
    parser.add_argument("--n", type=int, default=64, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--sparsity", type=float, default=0.25, help="of the parameters")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    models = {}
    for dtype in ("float32", "bfloat16"):
        cfg = compose([f"model={args.model}", f"model.dtype={dtype}"])
        models[dtype] = build(cfg.model)
    text = Path(cfg.data.mirror) / "text" / "wiki.txt"
    windows = lp.windows(models["float32"], text, n=args.n, seq_len=args.seq_len)
    times: dict[str, list[float]] = {d: [] for d in models}
    stats = {}
    for _ in range(args.repeats):
        for dtype, model in models.items():

            def run(model: LoadedModel = model) -> lp.LayerStats:
                return lp.score(model, windows, batch_size=args.batch_size)

            stats[dtype], seconds, _ = measure(run, torch.device("cpu"))
            times[dtype].append(seconds)
    tokens = windows.numel()
    print(f"{args.model}: scoring pass on {args.n} windows of {args.seq_len} tokens, "
          f"median of {args.repeats}")  # fmt: skip
    for dtype in models:
        t = statistics.median(times[dtype])
        print(f"  {dtype:9s} {t:7.2f} s  {tokens / t:7.0f} tokens/s")
    ratios = [a / b for a, b in zip(times["float32"], times["bfloat16"], strict=True)]
    print(f"  speed ratio bfloat16 / float32: {statistics.median(ratios):.2f}x")
    f32, b16 = stats["float32"], stats["bfloat16"]
    bi = (f32.block_influence() - b16.block_influence()).abs().max()
    cos = (f32.cosine - b16.cosine).abs().max()
    print(f"  max |BI difference| {bi:.2e}, max |cosine difference| {cos:.2e}")
    for scorer in (lp.BlockInfluence(), lp.Streamline(), lp.Angular()):
        plans = {
            d: lp.plan(models[d], stats[d], scorer, args.sparsity, "param_ratio").removed_layers
            for d in models
        }
        same = "same" if plans["float32"] == plans["bfloat16"] else "DIFFERENT"
        print(f"  {type(scorer).__name__:15s} float32 {plans['float32']}  "
              f"bfloat16 {plans['bfloat16']}  ({same})")  # fmt: skip


if __name__ == "__main__":
    main()
