"""Is the seeded document sample unbiased? Full-set accuracy against the sampled interval.

    python experiments/sampling_check.py --model smollm2_135m --suite standard \
        --tasks piqa arc_easy boolq winogrande \
        --out results/smollm2_135m/standard/sampling_check.json

The dense model is evaluated once on the full sets of ``--tasks`` (lm-eval, the suite's backend
unless ``--backend``). The suite's estimate of each task is read from the same per-document
results at the documents a run of the suite evaluates (its seeded ids), with its 95% Wilson
interval. An unbiased sample puts about 19 in 20 full-set values inside their interval.
The record goes to ``--out`` (JSON) and its table beside it (``.md``); ``--render`` rewrites
the table from an existing record without evaluating.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from layerprune.app import build, compose
from layerprune.evaluation import chosen_documents, evaluate, prepare
from layerprune.files import cache_root
from layerprune.stats import wilson


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--suite", default="standard", help="a conf/eval preset with a limit")
    parser.add_argument("--tasks", nargs="+", default=["piqa", "arc_easy", "boolq", "winogrande"])
    parser.add_argument("--backend", default=None, help="hf | fast (default: the suite's)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--render", action="store_true", help="only the table, from --out")
    args = parser.parse_args()
    if args.render:
        write_table(json.loads(args.out.read_text()), args.out.with_suffix(".md"))
        return

    cfg = compose([f"model={args.model}", f"eval={args.suite}"])
    suite = build(cfg.eval)
    full = replace(suite, tasks=args.tasks, limit=None, perplexity=None,
                   backend=args.backend or suite.backend)  # fmt: skip
    source = prepare(full, cfg.data.mirror, cache_root(cfg.paths.cache) / "tasks")
    sampled = chosen_documents(replace(suite, tasks=args.tasks), source) or {}
    loaded = build(cfg.model)
    start = time.perf_counter()
    result = evaluate(loaded, full, source)
    seconds = time.perf_counter() - start

    rows = {}
    for task in args.tasks:
        metric = suite.headline_metric(task)
        right = {
            s.doc_id: (s.pred_norm if metric == "acc_norm" else s.pred_acc) == s.gold
            for s in result.samples[task]
        }
        ids = sampled.get(task, sorted(right))
        k = sum(right[i] for i in ids)
        low, high = wilson(k, len(ids))
        value = sum(right.values()) / len(right)
        rows[task] = {
            "metric": metric, "full_n": len(right), "full": value, "sample_n": len(ids),
            "sample": k / len(ids), "ci95": [low, high], "inside": low <= value <= high,
        }  # fmt: skip
        where = "inside" if rows[task]["inside"] else "OUTSIDE"
        print(f"{task:12s} full {value:.4f} (n={len(right)})  sample {k / len(ids):.4f} "
              f"[{low:.4f}, {high:.4f}] (n={len(ids)})  {where}")  # fmt: skip
    print(f"full-set evaluation: {seconds:.0f} s ({full.backend} backend)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"model": args.model, "suite": args.suite, "seed": suite.seed,
              "backend": full.backend, "seconds": seconds, "tasks": rows}  # fmt: skip
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    write_table(record, args.out.with_suffix(".md"))


def write_table(record: dict, path: Path) -> None:
    """The record as a markdown table: full-set accuracy against the sample's interval."""
    lines = [
        f"{record['model']}, `{record['suite']}` sample (seed {record['seed']}) against the full "
        f"sets ({record['backend']} backend, {record['seconds'] / 60:.0f} min)",
        "",
        "| task | metric | full set | documents | sample | documents | 95% interval | inside |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for task, r in record["tasks"].items():
        low, high = r["ci95"]
        lines.append(f"| {task} | {r['metric']} | {r['full']:.3f} | {r['full_n']} | "
                     f"{r['sample']:.3f} | {r['sample_n']} | [{low:.3f}, {high:.3f}] | "
                     f"{'yes' if r['inside'] else 'no'} |")  # fmt: skip
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
