"""Peak memory and time of LLM-Streamline layer replacement for N and 4N training windows.

    python benchmarks/recovery_memory.py --windows 16 --seq-len 256 --size 8

Activations are streamed batch by batch, so the peak should not grow with the number of
windows: the ratio of the two peaks should stay near 1 while the time grows about 4x. Each
run is a fresh subprocess so that the peaks are independent; the peak is CUDA's max allocated
memory on GPU, else the process RSS (both above the level after loading the model).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from scoring_overhead import ROOT

from layerprune.calibration import TextFile
from layerprune.models import LoadedModel
from layerprune.recovery import LayerReplacement
from layerprune.resources import measure


def load(model: str, device: str) -> LoadedModel:
    from hydra.utils import instantiate

    from layerprune.app import compose

    cfg = compose([f"model={model}", f"model.device={device}"])
    return instantiate(cfg.model, _convert_="all")


def child(args: argparse.Namespace) -> None:
    loaded = load(args.model, args.device)
    text = str(Path(args.mirror) / "text" / "wiki.txt")
    train = TextFile(n=args.windows, seq_len=args.seq_len, seed=0, path=text)
    heldout = TextFile(n=args.batch_size, seq_len=args.seq_len, seed=1, path=text)
    train_ids = train.windows(loaded.tokenizer)
    heldout_ids = heldout.windows(loaded.tokenizer)
    device = next(loaded.model.parameters()).device
    report = {}

    def run() -> None:
        step = LayerReplacement(kind="layer", batch_size=args.batch_size, progress=False)
        block = list(range(args.start, args.start + args.size))
        r = step(loaded.model, block, train_ids, heldout=heldout_ids)
        report.update(r.to_dict())

    _, seconds, peak = measure(run, device)
    print(json.dumps({"seconds": seconds, "peak_gib": peak, "device": str(device), **report}))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", default="smollm2_135m", help="a conf/model config name")
    parser.add_argument("--windows", type=int, default=16, help="N: runs N and 4N windows")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--start", type=int, default=20, help="first layer of the block")
    parser.add_argument("--size", type=int, default=8, help="layers in the block")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--mirror", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    results = {}
    for n in (args.windows, 4 * args.windows):
        same = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "child"]
        cmd = [sys.executable, __file__, *same, f"--windows={n}", "--child"]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        results[n] = json.loads(out.strip().splitlines()[-1])
    first = results[args.windows]
    print(
        f"{args.model} on {first['device']}: layer replacement of layers "
        f"[{args.start}, {args.start + args.size}), {args.seq_len} tokens, batch {args.batch_size}"
    )
    for n, r in results.items():
        print(
            f"  {n:5d} windows  {r['seconds']:8.1f} s  peak +{r['peak_gib']:.3f} GiB  "
            f"{r['steps']} steps  held-out mse {r['heldout_mse_before']:.4g} -> "
            f"{r['heldout_mse_after']:.4g}"
        )
    big = results[4 * args.windows]
    print(
        f"  ratio 4N / N: peak {big['peak_gib'] / max(first['peak_gib'], 1e-9):.2f}, "
        f"time {big['seconds'] / first['seconds']:.2f}"
    )


if __name__ == "__main__":
    main()
