"""Loglikelihood throughput of the shared-context backend against lm-eval's HFLM.

    python benchmarks/eval_throughput.py --model smollm2_135m --suite quick
    python benchmarks/eval_throughput.py --model smollm2_135m --suite lm_eval_paper --docs 200

Both backends score the same requests (the suite's multiple-choice tasks, built once by lm-eval
from the data mirror, ``--docs`` seeded documents per task, or the suite's own limit), in the
same process, alternating, ``--repeats`` times. Printed: the requests' token count, each
backend's median seconds, tokens/s and peak memory, the speed ratio, and the largest
per-request difference of log-likelihoods and of greedy flags between the two.
"""

from __future__ import annotations

import argparse
import random
import statistics
from typing import Any

from lm_eval.models.huggingface import HFLM

from layerprune.app import build, compose
from layerprune.fastlm import SharedContextLM
from layerprune.files import cache_root
from layerprune.mirror import prepare_tasks
from layerprune.resources import measure


def instances(cfg: Any, docs: int | None, seed: int) -> list[Any]:
    """The suite's loglikelihood requests, as lm-eval builds them."""
    suite = build(cfg.eval)
    source = prepare_tasks(list(suite.tasks), cfg.data.mirror, suite.num_fewshot,
                           cache_root(cfg.paths.cache) / "tasks")  # fmt: skip
    leaves = [leaf.name for leaf in source.leaves if leaf.output_type == "multiple_choice"]
    tasks = source.manager.load(leaves)["tasks"]
    out = []
    for name in leaves:
        task = tasks[name]
        task.set_config(key="num_fewshot", value=suite.num_fewshot)
        n = len(task.eval_docs)
        limit = docs if docs is not None else suite.limit
        ids = sorted(random.Random(seed).sample(range(n), min(limit, n))) if limit else None
        task.build_all_requests(samples=ids)
        out += [inst for inst in task.instances if inst.request_type == "loglikelihood"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", default="smollm2_135m", help="a conf/model config name")
    parser.add_argument("--suite", default="quick", help="a conf/eval config name")
    parser.add_argument("--docs", type=int, default=None, help="documents per task (seeded)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch-size", type=int, default=16, help="HFLM's batch size")
    parser.add_argument("--batch-tokens", type=int, default=1024, help="the fast backend's budget")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    cfg = compose([f"model={args.model}", f"model.dtype={args.dtype}", f"eval={args.suite}"])
    loaded = build(cfg.model)
    reqs = instances(cfg, args.docs, args.seed)
    device = next(loaded.model.parameters()).device
    common = {"pretrained": loaded.model, "tokenizer": loaded.tokenizer, "device": str(device)}
    backends = {
        "hf": HFLM(**common, batch_size=args.batch_size),
        "shared-context": SharedContextLM(**common, batch_tokens=args.batch_tokens),
    }
    # _encode_pair splits the encoding of context + continuation: its length is the request's
    tokens = sum(len(loaded.tokenizer(c + t, add_special_tokens=False).input_ids) for c, t in
                 (r.args for r in reqs))  # fmt: skip
    times: dict[str, list[float]] = {name: [] for name in backends}
    peaks: dict[str, list[float]] = {name: [] for name in backends}
    answers: dict[str, Any] = {}
    for _ in range(args.repeats):
        for name, lm in backends.items():
            answers[name], seconds, peak = measure(
                lambda lm=lm: lm.loglikelihood(reqs, True), device
            )
            times[name].append(seconds)
            peaks[name].append(peak)
    diff = max(
        abs(a[0] - b[0]) for a, b in zip(answers["hf"], answers["shared-context"], strict=True)
    )
    flags = sum(a[1] != b[1] for a, b in zip(answers["hf"], answers["shared-context"], strict=True))
    print(f"{args.model} ({args.dtype}, {device}), suite {args.suite}: {len(reqs)} requests, "
          f"{tokens} tokens as HFLM runs them; median of {args.repeats}")  # fmt: skip
    for name in backends:
        t = statistics.median(times[name])
        print(f"  {name:15s} {t:8.2f} s  {tokens / t:8.0f} tokens/s  "
              f"peak +{statistics.median(peaks[name]):.2f} GiB")  # fmt: skip
    ratios = [a / b for a, b in zip(times["hf"], times["shared-context"], strict=True)]
    print(f"  speed ratio shared-context / hf: {statistics.median(ratios):.2f}x "
          f"(per repeat: {', '.join(f'{r:.2f}' for r in ratios)})")  # fmt: skip
    print(f"  max |ll difference| {diff:.2e}, greedy flags differing: {flags}")


if __name__ == "__main__":
    main()
