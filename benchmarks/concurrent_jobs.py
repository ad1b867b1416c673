"""Why a job of the submitit local launcher runs on `cpus_per_task` threads: several processes
running the same forward passes at once, each on every core (torch's default), against each on
its share of the cores, beside one process alone on every core.

    python benchmarks/concurrent_jobs.py --jobs 2 --repeats 3

Each process builds a random-init model of SmolLM2-135M's shape (it times like the real
weights; its byte-level vocabulary makes the LM head smaller) and, after one warm-up pass, times
--steps forward passes of --batch-size windows of --seq-len random tokens; the processes of a
group start their timed passes together. Printed per setting: the group's wall time and its
throughput (forward passes a second over all its jobs), the median of --repeats groups run in
turn with the other settings, and the throughput over the lone process's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import SHAPES

from layerprune.models import byte_tokenizer, random_init


def worker(threads: int, folder: Path, index: int, args: argparse.Namespace) -> None:
    """One job: build, warm up, say ready, wait for the go, time the passes, print seconds."""
    torch.set_num_threads(threads)
    model = random_init("smollm2_135m", "llama", SHAPES["smollm2_135m"]).model
    gen = torch.Generator().manual_seed(index)
    ids = torch.randint(3, len(byte_tokenizer()), (args.batch_size, args.seq_len), generator=gen)
    with torch.no_grad():
        model(ids)
        (folder / f"ready{index}").touch()
        while not (folder / "go").exists():
            time.sleep(0.005)
        start = time.perf_counter()
        for _ in range(args.steps):
            model(ids)
    print(json.dumps({"seconds": time.perf_counter() - start}))


def group(jobs: int, threads: int, args: argparse.Namespace) -> float:
    """Wall seconds from the go to the last job's end (its own timing), ``jobs`` at once."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        sizes = ["--steps", str(args.steps), "--batch-size", str(args.batch_size)]
        command = [sys.executable, __file__, *sizes, "--seq-len", str(args.seq_len)]
        procs = [
            subprocess.Popen(
                [*command, "--worker", str(threads), str(folder), str(i)],
                stdout=subprocess.PIPE,
                text=True,
            )
            for i in range(jobs)
        ]
        while len(list(folder.glob("ready*"))) < jobs:
            if any(p.poll() not in (None, 0) for p in procs):
                raise SystemExit("a worker failed")
            time.sleep(0.01)
        (folder / "go").touch()
        seconds = [json.loads(p.communicate()[0])["seconds"] for p in procs]
    return max(seconds)


def main() -> None:
    raw = argparse.RawTextHelpFormatter
    out = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    out.add_argument("--jobs", type=int, default=2, help="processes running at once")
    out.add_argument("--steps", type=int, default=5, help="timed forward passes per job")
    out.add_argument("--batch-size", type=int, default=4)
    out.add_argument("--seq-len", type=int, default=256)
    out.add_argument("--repeats", type=int, default=3)
    out.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)  # THREADS FOLDER INDEX
    args = out.parse_args()
    if args.worker:
        threads, folder, index = args.worker
        return worker(int(threads), Path(folder), int(index), args)

    cores = torch.get_num_threads()
    share = max(1, cores // args.jobs)
    settings = {
        f"1 job, {cores} threads": (1, cores),
        f"{args.jobs} jobs, {cores} threads each": (args.jobs, cores),
        f"{args.jobs} jobs, {share} thread(s) each": (args.jobs, share),
    }
    walls: dict[str, list[float]] = {name: [] for name in settings}
    for _ in range(args.repeats):
        for name, (jobs, threads) in settings.items():
            walls[name].append(group(jobs, threads, args))
    print(f"SmolLM2-135M shape, batch {args.batch_size} x {args.seq_len} tokens, "
          f"{args.steps} passes per job, median of {args.repeats}; "
          f"{os.cpu_count()} CPUs, torch {cores} threads")  # fmt: skip
    alone = None
    for name, (jobs, _) in settings.items():
        wall = statistics.median(walls[name])
        rate = jobs * args.steps / wall
        alone = alone or rate
        print(f"{name:28s} wall {wall:7.2f} s  {rate:6.2f} passes/s  {rate / alone:5.2f}x alone")


if __name__ == "__main__":
    main()
