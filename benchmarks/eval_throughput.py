"""Loglikelihood throughput of two evaluation setups over the same requests, side by side.

    python benchmarks/eval_throughput.py --model smollm2_135m --suite quick
    python benchmarks/eval_throughput.py --model smollm2_135m --suite lm_eval_paper --docs 200
    python benchmarks/eval_throughput.py --model smollm2_135m --a fast:float32 --b fast:bfloat16

A setup is ``backend:dtype``: ``hf`` is lm-eval's HFLM, ``fast`` the shared-token backend
(layerprune.fastlm). Both score the same requests (the suite's multiple-choice tasks, built
once by lm-eval from the data mirror, ``--docs`` seeded documents per task, or the suite's own
limit), in the same process, alternating, ``--repeats`` times. Printed: the requests' tokens
(each request's context and continuation) and the tokens the fast backend packs them into,
each setup's median seconds, tokens/s (of the requests' tokens) and peak memory, the speed
ratio b / a, the largest per-request difference of log-likelihoods, the greedy flags that
differ, and how many documents get the same prediction (the option of highest
log-likelihood, lm-eval's ``acc``) under both.
"""

from __future__ import annotations

import argparse
import random
import statistics
from collections import defaultdict
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


def predictions(reqs: list[Any], answers: list[tuple[float, bool]]) -> dict[Any, int]:
    """Per document, the index of its option of highest log-likelihood (lm-eval's ``acc``)."""
    options: dict[Any, list[tuple[int, float]]] = defaultdict(list)
    for r, (ll, _) in zip(reqs, answers, strict=True):
        options[(r.task_name, r.doc_id)].append((r.idx, ll))
    return {doc: max(opts, key=lambda o: o[1])[0] for doc, opts in options.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", default="smollm2_135m", help="a conf/model config name")
    parser.add_argument("--suite", default="quick", help="a conf/eval config name")
    parser.add_argument("--docs", type=int, default=None, help="documents per task (seeded)")
    parser.add_argument("--a", default="hf:float32", help="backend:dtype (the reference)")
    parser.add_argument("--b", default="fast:float32", help="backend:dtype (compared with a)")
    parser.add_argument("--batch-size", type=int, default=16, help="HFLM's batch size")
    parser.add_argument("--batch-tokens", type=int, default=1024, help="the fast backend's budget")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    setups = {name: tuple(getattr(args, name).split(":")) for name in ("a", "b")}
    loaded = {}  # one model per dtype
    for _, dtype in setups.values():
        if dtype not in loaded:
            cfg = compose([f"model={args.model}", f"model.dtype={dtype}", f"eval={args.suite}"])
            loaded[dtype] = build(cfg.model)
    reqs = instances(cfg, args.docs, args.seed)
    lms: dict[str, Any] = {}
    for name, (backend, dtype) in setups.items():
        model = loaded[dtype]
        device = next(model.model.parameters()).device
        common = {"pretrained": model.model, "tokenizer": model.tokenizer, "device": str(device)}
        lms[name] = (
            SharedContextLM(**common, batch_tokens=args.batch_tokens)
            if backend == "fast"
            else HFLM(**common, batch_size=args.batch_size)
        )
    some = next(iter(loaded.values()))
    # the requests' own tokens, each context counted once per request (the common measure of
    # both setups' tokens/s); _encode_pair splits the encoding of context + continuation
    tokens = sum(len(some.tokenizer(c + t, add_special_tokens=False).input_ids) for c, t in
                 (r.args for r in reqs))  # fmt: skip
    packer = SharedContextLM(pretrained=some.model, tokenizer=some.tokenizer, device="cpu",
                             batch_tokens=args.batch_tokens)  # fmt: skip
    pairs = [packer._encode_pair(*r.args) for r in reqs]
    contexts: dict[tuple[int, ...], list[int]] = {}
    for i, (context, _) in enumerate(pairs):
        contexts.setdefault(tuple(context), []).append(i)
    rows = packer._rows([(r.args, c, t) for r, (c, t) in zip(reqs, pairs, strict=True)], contexts)
    packed = sum(r.length for r in rows)
    padded = sum(len(b) * b[0].length for b in packer._batches(rows))
    scored = sum(len(t) for _, t in pairs)

    times: dict[str, list[float]] = {name: [] for name in lms}
    peaks: dict[str, list[float]] = {name: [] for name in lms}
    answers: dict[str, Any] = {}
    for _ in range(args.repeats):
        for name, lm in lms.items():

            def run(lm: Any = lm) -> Any:
                return lm.loglikelihood(reqs, True)

            answers[name], seconds, peak = measure(run, lm.device)
            times[name].append(seconds)
            peaks[name].append(peak)
    a, b = answers["a"], answers["b"]
    diff = max(abs(x[0] - y[0]) for x, y in zip(a, b, strict=True))
    flags = sum(x[1] != y[1] for x, y in zip(a, b, strict=True))
    pred_a, pred_b = predictions(reqs, a), predictions(reqs, b)
    same = sum(pred_a[d] == pred_b[d] for d in pred_a)
    print(f"{args.model}, suite {args.suite}: {len(reqs)} requests, {len(pred_a)} documents; "
          f"{tokens} tokens in the requests, {packed} packed as trees ({padded} with padding), "
          f"{scored} scored; median of {args.repeats}")  # fmt: skip
    for name, (backend, dtype) in setups.items():
        t = statistics.median(times[name])
        print(f"  {name}: {backend + ':' + dtype:16s} {t:8.2f} s  {tokens / t:8.0f} tokens/s  "
              f"peak +{statistics.median(peaks[name]):.2f} GiB")  # fmt: skip
    ratios = [x / y for x, y in zip(times["a"], times["b"], strict=True)]
    print(f"  speed ratio b / a: {statistics.median(ratios):.2f}x "
          f"(per repeat: {', '.join(f'{r:.2f}' for r in ratios)})")  # fmt: skip
    print(
        f"  max |ll difference| {diff:.2e}, greedy flags differing: {flags}, "
        f"same prediction: {same}/{len(pred_a)} documents ({same / len(pred_a):.1%})"
    )


if __name__ == "__main__":
    main()
