"""lm-eval-harness on an in-memory (pruned) model, with per-sample predictions kept.

``EvalSuite`` is what a ``conf/eval`` preset instantiates. ``evaluate`` wraps the model object
and its tokenizer in lm-eval's ``HFLM`` and runs ``simple_evaluate`` on tasks prepared by
:mod:`layerprune.mirror`; it returns the metrics of every task and group, and for each
multiple-choice document the per-option loglikelihoods and token counts that the stability
metric needs. ``Evaluator`` runs a whole run's evaluation in order: tasks checked before any model
is loaded, the dense model through a cache, the pruned model, the comparison and the per-sample
files; ``NoEvaluator`` stands in for it without a suite.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import lm_eval
from lm_eval.api.task import Task
from lm_eval.models.huggingface import HFLM

from layerprune.cache import JsonCache
from layerprune.errors import LayerpruneError
from layerprune.files import cache_root
from layerprune.lm_eval_compat import (
    continuation_tokens,
    effective_sample_counts,
    logged_doc,
    quiet_git_hash,
)
from layerprune.mirror import TaskSource, prepare_tasks
from layerprune.models import LoadedModel
from layerprune.perplexity import perplexity_of_file
from layerprune.resources import Stage, untimed
from layerprune.stability import Sample, average_over_tasks, task_stability, write_samples

log = logging.getLogger(__name__)
LM_EVAL_VERSION = version("lm-eval")
EVAL_VERSION = 1  # bump when an evaluation's definition changes (invalidates the dense cache)


@dataclass
class PerplexitySpec:
    """Perplexity on a text file: non-overlapping windows unless ``stride`` is set."""

    path: str
    seq_len: int = 512
    stride: int | None = None
    batch_size: int = 8
    max_tokens: int | None = None


@dataclass
class EvalSuite:
    """A ``conf/eval`` preset: which lm-eval tasks, how, and the perplexity text."""

    tasks: list[str]
    num_fewshot: int = 0
    limit: int | None = None
    samples: dict[str, list[int]] | None = None
    batch_size: int = 16
    max_length: int | None = None
    headline: dict[str, str] = field(default_factory=dict)
    perplexity: PerplexitySpec | None = None
    unavailable: dict[str, str] = field(default_factory=dict)  # paper tasks lm-eval lacks: why
    include_path: str | None = None  # a folder of the user's own lm-eval task YAMLs
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.tasks:
            raise LayerpruneError("eval.tasks is empty; name at least one lm-eval task")
        if self.limit is not None and self.limit <= 0:
            raise LayerpruneError(
                f"eval.limit must be > 0 or null (all documents); got {self.limit}"
            )
        if self.limit is not None and self.samples:
            raise LayerpruneError("eval.limit and eval.samples exclude each other; set one")
        if self.num_fewshot < 0:
            raise LayerpruneError(f"eval.num_fewshot must be >= 0; got {self.num_fewshot}")
        if self.batch_size < 1:
            raise LayerpruneError(f"eval.batch_size must be >= 1; got {self.batch_size}")
        if isinstance(self.perplexity, dict):
            self.perplexity = PerplexitySpec(**self.perplexity)

    def headline_metric(self, task: str) -> str:
        """The literature reports acc_norm for some tasks (hellaswag, arc_challenge, ...)."""
        return self.headline.get(task, "acc")

    def identity(self) -> dict[str, Any]:
        return {**asdict(self), "lm_eval": LM_EVAL_VERSION}


def task_metrics(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``{"piqa": {"acc": .., "acc_stderr": .., "acc_norm": ..}}`` from lm-eval's results."""
    out: dict[str, dict[str, float]] = {}
    for task, values in results["results"].items():
        metrics: dict[str, float] = {}
        for key, value in values.items():
            name, _, filt = key.partition(",")
            if filt and isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics[name if filt == "none" else f"{name},{filt}"] = float(value)
        out[task] = metrics
    return out


def gold_index(task: Task, doc: dict[str, Any]) -> int:
    """The correct option, decided as lm-eval's ``process_results`` does."""
    gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
    if isinstance(gold, list):
        gold = gold[0]
    if isinstance(gold, str):
        gold = task.doc_to_choice(doc).index(gold)
    return int(gold)


def to_samples(hflm: HFLM, task: Task, logged: list[dict[str, Any]]) -> list[Sample]:
    """Per-document predictions of a multiple-choice task, as lm-eval scored them."""
    samples = []
    for row in map(logged_doc, logged):
        tokens = [len(continuation_tokens(hflm, ctx, cont)) for ctx, cont in row.requests]
        chars = [len(choice) for choice in task.doc_to_choice(row.doc)]  # acc_norm's length
        gold = gold_index(task, row.doc)
        samples.append(
            Sample.from_scores(row.doc_id, row.loglikelihoods, tokens, chars, gold, row.prompt_hash)
        )
    return samples


@dataclass
class Evaluation:
    """Everything one model's evaluation produced (what the dense cache stores)."""

    metrics: dict[str, dict[str, float]]
    samples: dict[str, list[Sample]]
    n_samples: dict[str, int]
    perplexity: dict[str, Any] | None
    seconds: float
    raw: dict[str, Any] | None = field(default=None, repr=False)  # lm-eval's own, not cached

    def to_dict(self) -> dict[str, Any]:
        return {
            "metrics": self.metrics,
            "samples": {t: [s.to_dict() for s in ss] for t, ss in self.samples.items()},
            "n_samples": self.n_samples,
            "perplexity": self.perplexity,
            "seconds": self.seconds,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Evaluation:
        return cls(
            metrics=d["metrics"],
            samples={t: [Sample.from_dict(s) for s in ss] for t, ss in d["samples"].items()},
            n_samples=d["n_samples"],
            perplexity=d["perplexity"],
            seconds=d["seconds"],
        )


def evaluate(loaded: LoadedModel, suite: EvalSuite, source: TaskSource) -> Evaluation:
    start = time.perf_counter()
    model = loaded.model
    hflm = HFLM(
        pretrained=model,
        tokenizer=loaded.tokenizer,
        batch_size=suite.batch_size,
        max_length=suite.max_length,
        device=str(next(model.parameters()).device),
    )
    with quiet_git_hash():
        results = lm_eval.simple_evaluate(
            model=hflm,
            tasks=list(suite.tasks),
            num_fewshot=suite.num_fewshot,
            limit=suite.limit,
            samples=suite.samples,
            task_manager=source.manager,
            log_samples=True,
            random_seed=suite.seed,
            numpy_random_seed=suite.seed,
            torch_random_seed=suite.seed,
            fewshot_random_seed=suite.seed,
            bootstrap_iters=0,
        )
    if results is None:
        raise RuntimeError("lm-eval returned no results")
    choice_tasks = [leaf.name for leaf in source.leaves if leaf.output_type == "multiple_choice"]
    objects = source.manager.load(choice_tasks)["tasks"] if choice_tasks else {}
    samples = {
        name: to_samples(hflm, objects[name], results["samples"][name])
        for name in choice_tasks
        if results["samples"].get(name)
    }
    n_samples = effective_sample_counts(results)
    ppl = None
    if suite.perplexity is not None:
        spec = suite.perplexity
        result = perplexity_of_file(
            model,
            loaded.tokenizer,
            spec.path,
            seq_len=spec.seq_len,
            stride=spec.stride,
            batch_size=spec.batch_size,
            max_tokens=spec.max_tokens,
        )
        ppl = {"path": spec.path, **asdict(result)}
    return Evaluation(
        task_metrics(results), samples, n_samples, ppl, time.perf_counter() - start, results
    )


def prepare(suite: EvalSuite, mirror: str | Path | None, work_dir: Path) -> TaskSource:
    """Check tasks, the mirror and the perplexity text before any model is loaded."""
    if suite.perplexity is not None and not Path(suite.perplexity.path).is_file():
        raise LayerpruneError(f"perplexity text '{suite.perplexity.path}' does not exist")
    return prepare_tasks(list(suite.tasks), mirror, suite.num_fewshot, work_dir, suite.include_path)


def headline(
    suite: EvalSuite, task: str, metrics: dict[str, dict[str, float]]
) -> tuple[str, float]:
    """The task's headline metric, falling back to acc where the task has no such metric."""
    metric = suite.headline_metric(task)
    values = metrics.get(task, {})
    if metric not in values:
        metric = "acc"
    if metric not in values:
        raise LayerpruneError(f"lm-eval task '{task}' reported no acc; got {sorted(values)}")
    return metric, values[metric]


def compare(
    suite: EvalSuite, source: TaskSource, dense: Evaluation, pruned: Evaluation
) -> dict[str, Any]:
    """Per-task dense vs pruned headline metrics, average, RP and stability."""
    rows = []
    for task in suite.tasks:
        metric, d = headline(suite, task, dense.metrics)
        p = pruned.metrics[task][metric]
        row: dict[str, Any] = {"task": task, "metric": metric, "dense": d, "pruned": p,
                               "delta": p - d}  # fmt: skip
        per_leaf = {
            leaf.name: task_stability(
                dense.samples[leaf.name], pruned.samples[leaf.name], norm=metric == "acc_norm"
            )
            for leaf in source.members[task]
            if leaf.name in dense.samples and leaf.name in pruned.samples
        }
        if per_leaf:  # a group's stability is the mean over its tasks
            row.update(average_over_tasks(per_leaf))
        rows.append(row)
    avg_dense = sum(r["dense"] for r in rows) / len(rows)
    avg_pruned = sum(r["pruned"] for r in rows) / len(rows)
    with_stability = {r["task"]: r for r in rows if "stability" in r}
    return {
        "tasks": rows,
        "average": {"dense": avg_dense, "pruned": avg_pruned, "delta": avg_pruned - avg_dense},
        "rp": avg_pruned / avg_dense if avg_dense else None,
        "stability": average_over_tasks(with_stability) if with_stability else None,
        "perplexity": {"dense": dense.perplexity, "pruned": pruned.perplexity},
        "metrics": {"dense": dense.metrics, "pruned": pruned.metrics},
        "n_samples": pruned.n_samples,
        "unavailable": suite.unavailable,
    }


def table(comparison: dict[str, Any]) -> str:
    """The printed summary: task, dense, pruned, delta, agreement, stability."""
    lines = [f"{'task':<16}{'metric':<10}{'dense':>8}{'pruned':>8}{'delta':>8}"
             f"{'agree':>8}{'stab':>8}"]  # fmt: skip

    def fmt(v: float | None) -> str:
        return f"{v:8.3f}" if v is not None else f"{'-':>8}"

    for r in comparison["tasks"]:
        lines.append(
            f"{r['task']:<16}{r['metric']:<10}{fmt(r['dense'])}{fmt(r['pruned'])}"
            f"{fmt(r['delta'])}{fmt(r.get('agreement'))}{fmt(r.get('stability'))}"
        )
    avg, stab = comparison["average"], comparison["stability"] or {}
    lines.append(
        f"{'average':<26}{fmt(avg['dense'])}{fmt(avg['pruned'])}{fmt(avg['delta'])}"
        f"{fmt(stab.get('agreement'))}{fmt(stab.get('stability'))}"
    )
    ppl = comparison["perplexity"]
    if ppl["dense"] and ppl["pruned"]:
        lines.append(f"perplexity {ppl['dense']['ppl']:.2f} -> {ppl['pruned']['ppl']:.2f} "
                     f"({ppl['pruned']['n_tokens']} tokens)")  # fmt: skip
    if comparison["rp"] is not None:
        lines.append(f"retained performance RP = {comparison['rp']:.3f}")
    return "\n".join(lines)


class Evaluator:
    """The whole evaluation of a run: dense (through the cache), pruned, comparison, files.

    Built before any model is loaded, so that a bad task name, a missing mirror split or a
    missing perplexity text fails in seconds rather than after loading and scoring. Call
    :meth:`dense` on the original model, prune, then :meth:`pruned`. Each may be given the
    caller's ``stage(name)`` context manager, entered around the work it times
    (``eval_dense``, ``eval_pruned``).
    """

    def __init__(
        self, suite: EvalSuite, mirror: str | Path | None, cache_dir: str | Path | None
    ) -> None:
        self.suite = suite
        self.source = prepare(suite, mirror, cache_root(cache_dir) / "tasks")
        self.cache = JsonCache("dense_eval", cache_dir)
        self._dense: Evaluation | None = None
        self._dense_hit = False
        self._pruned: Evaluation | None = None

    def cache_key(self, loaded: LoadedModel) -> dict[str, Any]:
        """Everything a dense evaluation depends on: model, device, suite and data."""
        return {
            "version": EVAL_VERSION,
            "model": loaded.fingerprint,
            "device": next(loaded.model.parameters()).device.type,
            "suite": self.suite.identity(),
            "data": self.source.identity(),
        }

    def dense(self, loaded: LoadedModel, stage: Stage = untimed) -> bool:
        """Evaluate the original model, once per cache key; True when read from the cache."""
        with stage("eval_dense"):
            payload, hit = self.cache.get_or_compute(
                self.cache_key(loaded), lambda: evaluate(loaded, self.suite, self.source).to_dict()
            )
        log.info("dense evaluation %s", "reused from the cache" if hit else "computed and cached")
        self._dense, self._dense_hit = Evaluation.from_dict(payload), hit
        return hit

    def pruned(self, loaded: LoadedModel, out: Path, stage: Stage = untimed) -> dict[str, Any]:
        """Evaluate the pruned model, write both sides' samples under ``out/samples`` and
        return ``{"eval": record}`` for metrics.json."""
        if self._dense is None:
            raise RuntimeError("Evaluator.pruned needs Evaluator.dense on the original model first")
        with stage("eval_pruned"):
            self._pruned = evaluate(loaded, self.suite, self.source)
        for label, evaluation in (("dense", self._dense), ("pruned", self._pruned)):
            for task, samples in evaluation.samples.items():
                write_samples(out / "samples" / label / f"{task}.jsonl.gz", samples)
        comparison = compare(self.suite, self.source, self._dense, self._pruned)
        return {"eval": {**comparison, "dense_from_cache": self._dense_hit}}

    def table(self, evaluated: dict[str, Any]) -> str:
        """The printed summary of what :meth:`pruned` returned."""
        record = evaluated["eval"]
        origin = "reused from the cache" if record["dense_from_cache"] else "computed"
        return f"dense eval {origin}\n{table(record)}"

    @property
    def lm_eval_results(self) -> dict[str, Any] | None:
        """lm-eval's own results of the pruned model (for its W&B logger); not cached."""
        return self._pruned.raw if self._pruned else None
