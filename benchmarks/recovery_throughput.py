"""Replacement training against a plain forward of the same prefix: tokens/s and peak memory
at N and 4N windows, with the states streamed and from the activation cache.

    python benchmarks/recovery_throughput.py --model smollm2_135m --windows 16 --seq-len 256

Training a replacement with MSE needs, per token, the states around the block: a no-grad
forward of the dense prefix (layers 0 .. block end) when streamed, a read from disk with the
cache. Streamed training should run at close to the tokens/s of that plain forward (the
module's own forward and backward are one layer's); from the cache, many times faster, the
prefix pass being paid once, when the cache is written (timed apart). States are
streamed or read batch by batch, so the peak should not grow with the number of windows: the
4N peak should stay within a few percent of the N peak (a warm-up step first lets the
allocator settle, so both count only what training adds). Each run is a fresh process, so
that the peaks are independent; the peak is CUDA's max allocated memory on GPU, else the
process's resident memory (both above the level after the warm-up).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from layerprune.calibration import TextFile
from layerprune.layers import decoder_stack
from layerprune.models import LoadedModel
from layerprune.recovery import LayerReplacement
from layerprune.resources import measure, peak_memory


def load(model: str, device: str) -> LoadedModel:
    from hydra.utils import instantiate

    from layerprune.app import compose

    cfg = compose([f"model={model}", f"model.device={device}"])
    return instantiate(cfg.model, _convert_="all")


class Clock:
    """Wall-clock and process CPU seconds of a block: on a shared machine the CPU seconds are
    what a run costs, the wall clock also counts the other processes' turns."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


@torch.no_grad()
def plain_prefix(loaded: LoadedModel, end: int, windows: torch.Tensor, batch_size: int) -> Clock:
    """A plain no-grad forward of layers [0, end): a shallow copy of the base model, sharing
    every weight, with its layer list cut."""
    stack = decoder_stack(loaded.model)
    prefix = copy.copy(stack.base)
    prefix._modules = dict(stack.base._modules)  # its own module table: the model keeps its own
    setattr(prefix, stack.layers_attr, nn.ModuleList(list(stack.layers[:end])))
    device = next(prefix.parameters()).device
    with Clock() as clock:
        for batch in windows.split(batch_size):
            prefix(input_ids=batch.to(device), use_cache=False)
    return clock


def child(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load(args.model, args.device)
    text = str(Path(args.mirror) / "text" / "wiki.txt")
    train = TextFile(n=args.windows, seq_len=args.seq_len, seed=0, path=text)
    heldout = TextFile(n=1, seq_len=args.seq_len, seed=1, path=text)  # little beside training
    train_ids = train.windows(loaded.tokenizer)
    heldout_ids = heldout.windows(loaded.tokenizer)
    device = next(loaded.model.parameters()).device
    block = list(range(args.start, args.start + args.size))
    plain = plain_prefix(loaded, block[-1] + 1, train_ids, args.batch_size)
    cache_dir = tempfile.mkdtemp(prefix="layerprune-bench-")
    step = LayerReplacement(kind="layer", batch_size=args.batch_size, progress=False,
                            activation_cache=args.cache, cache_dtype="float16")  # fmt: skip
    report: dict[str, Any] = {}
    written = Clock()
    # One step on a copy first: the allocator settles (glibc keeps freed heap after the first
    # large blocks), so that the peak counts what grows with the windows, not that.
    warm = copy.deepcopy(loaded.model)
    LayerReplacement(kind="layer", batch_size=args.batch_size, progress=False)(
        warm, block, train_ids[: args.batch_size], heldout=heldout_ids
    )
    del warm
    gc.collect()

    def run() -> None:
        if args.cache:  # written first, timed apart: the one prefix pass the cache costs
            with written:
                for ids in (train_ids, heldout_ids):
                    step.states(loaded.model, block[0], len(block), ids, args.batch_size, cache_dir)
        with Clock() as trained:
            r = step(loaded.model, block, train_ids, heldout=heldout_ids, cache_dir=cache_dir)
        report.update(r.to_dict(), wall=trained.wall, cpu=trained.cpu)

    _, seconds, peak = measure(run, device)
    tokens = report["train_tokens"]
    whole = peak_memory()["cuda" if device.type == "cuda" else "cpu_rss"]
    out = {"seconds": seconds, "peak_gib": peak, "whole_gib": whole, "device": str(device),
           "tokens": tokens,
           "plain_wall": train_ids.numel() / plain.wall, "plain_cpu": train_ids.numel() / plain.cpu,
           "train_wall": tokens / report["wall"], "train_cpu": tokens / report["cpu"],
           "written_s": written.wall if args.cache else None}  # fmt: skip
    print(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", default="smollm2_135m", help="a conf/model config name")
    parser.add_argument("--windows", type=int, default=16, help="N: runs N and 4N windows")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--start", type=int, default=9, help="first layer of the block")
    parser.add_argument("--size", type=int, default=10, help="layers in the block")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's own)")
    parser.add_argument("--mirror", default=None, help="the data mirror (default: as the app)")
    parser.add_argument("--cache", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mirror is None:
        from layerprune.app import default_mirror

        args.mirror = default_mirror()
    if args.child:
        return child(args)

    results = {}
    for cache in (False, True):
        for n in (args.windows, 4 * args.windows):
            same = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                    if k not in ("child", "cache", "windows")]  # fmt: skip
            cmd = [sys.executable, __file__, *same, f"--windows={n}", "--child"]
            cmd += ["--cache"] if cache else []
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            results[cache, n] = json.loads(out.strip().splitlines()[-1])
    first = results[False, args.windows]
    print(
        f"{args.model} on {first['device']}: layer replacement (MSE) of layers [{args.start}, "
        f"{args.start + args.size}), windows of {args.seq_len} tokens, batch {args.batch_size}; "
        "tokens per wall second and per CPU second"
    )
    for cache in (False, True):
        name = "from the cache" if cache else "streamed"
        small, big = results[cache, args.windows], results[cache, 4 * args.windows]
        for n, r in ((args.windows, small), (4 * args.windows, big)):
            written = f", cache written in {r['written_s']:.0f} s" if cache else ""
            wall, cpu = r["train_wall"] / r["plain_wall"], r["train_cpu"] / r["plain_cpu"]
            print(
                f"  {name:14s} {n:4d} windows: training {r['train_wall']:7.0f} tok/s "
                f"{r['train_cpu']:7.0f} tok/CPU-s; plain prefix forward {r['plain_wall']:7.0f} "
                f"tok/s {r['plain_cpu']:7.0f} tok/CPU-s; ratio {wall:.2f} (CPU {cpu:.2f}); "
                f"peak +{r['peak_gib']:.3f} GiB{written}"
            )
        growth = big["peak_gib"] - small["peak_gib"]
        print(f"  {name:14s} peak of the process {small['whole_gib']:.3f} GiB (N), "
              f"{big['whole_gib']:.3f} GiB (4N): 4N - N {growth:+.3f} GiB, "
              f"{growth / small['whole_gib']:+.1%}")  # fmt: skip


if __name__ == "__main__":
    main()
