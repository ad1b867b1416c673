"""lm-eval-harness on an in-memory (pruned) model, with per-sample predictions kept.

``EvalSuite`` is what a ``conf/eval`` preset instantiates. ``evaluate`` wraps the model object
and its tokenizer in lm-eval's ``HFLM`` and runs ``simple_evaluate`` on tasks prepared by
:mod:`layerprune.mirror`, on the documents :func:`chosen_documents` draws (a seeded random
subset per task under ``limit``, nested across limits); it returns the metrics of every task
and group, and for each multiple-choice document the per-option loglikelihoods and token counts
that the stability metric needs. ``Evaluator`` runs a whole run's evaluation in order: tasks
checked before any model is loaded, the dense model through a cache, the pruned model, the
comparison (with 95% intervals from the per-document samples, :mod:`layerprune.stats`) and the
per-sample files; ``NoEvaluator`` stands in for it without a suite.
"""

from __future__ import annotations

import logging
import math
import time
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import lm_eval
import numpy as np
from lm_eval.api.task import Task
from lm_eval.models.huggingface import HFLM

from layerprune.cache import JsonCache
from layerprune.errors import LayerpruneError
from layerprune.fastlm import SharedContextLM
from layerprune.files import cache_root
from layerprune.lm_eval_compat import (
    continuation_tokens,
    effective_sample_counts,
    logged_doc,
    quiet_git_hash,
)
from layerprune.mirror import TaskSource, prepare_tasks
from layerprune.models import LoadedModel
from layerprune.perplexity import perplexity_ci, perplexity_of_file
from layerprune.resources import Stage, untimed
from layerprune.stability import (
    Sample,
    accuracy_stats,
    average_intervals,
    average_over_tasks,
    interval,
    paired_correct,
    stability_draws,
    task_stability,
    write_samples,
)
from layerprune.stats import ITERS, percentile_ci, resample_means

log = logging.getLogger(__name__)
LM_EVAL_VERSION = version("lm-eval")
EVAL_VERSION = 2  # bump when an evaluation's definition changes (invalidates the dense cache)


@dataclass
class PerplexitySpec:
    """Perplexity on a text file: non-overlapping windows unless ``stride`` is set; named by
    ``name``, else by the file's stem."""

    path: str
    seq_len: int = 512
    stride: int | None = None
    batch_size: int = 8
    max_tokens: int | None = None
    name: str | None = None

    @property
    def label(self) -> str:
        return self.name or Path(self.path).stem


SAMPLING = ("random", "first")


BACKENDS = ("hf", "fast")  # the lm-eval model class that runs the loglikelihood requests


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
    perplexity: PerplexitySpec | list[PerplexitySpec] | None = None  # one text or several
    unavailable: dict[str, str] = field(default_factory=dict)  # paper tasks lm-eval lacks: why
    include_path: str | None = None  # a folder of the user's own lm-eval task YAMLs
    seed: int = 0
    sampling: str = "random"  # which `limit` documents: a seeded random subset, or the first
    bootstrap_iters: int = ITERS  # resamples behind every confidence interval
    note: str | None = None  # the first line of the printed table (e.g. "smoke test")
    backend: str = "hf"  # hf: lm-eval's HFLM; fast: each distinct context runs once (fastlm)
    batch_tokens: int = 1024  # the fast backend's padded tokens per forward

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise LayerpruneError(f"eval.backend: {self.backend}; allowed: {', '.join(BACKENDS)}")
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
        if self.batch_tokens < 1:
            raise LayerpruneError(f"eval.batch_tokens must be >= 1; got {self.batch_tokens}")
        if self.sampling not in SAMPLING:
            raise LayerpruneError(
                f"eval.sampling must be one of {', '.join(SAMPLING)}; got '{self.sampling}'"
            )
        if self.bootstrap_iters < 100:
            raise LayerpruneError(
                f"eval.bootstrap_iters must be >= 100; got {self.bootstrap_iters}"
            )
        if isinstance(self.perplexity, dict):
            self.perplexity = PerplexitySpec(**self.perplexity)
        elif isinstance(self.perplexity, list):
            self.perplexity = [p if isinstance(p, PerplexitySpec) else PerplexitySpec(**p)
                               for p in self.perplexity]  # fmt: skip
        labels = [p.label for p in self.texts()]
        if len(set(labels)) != len(labels):
            raise LayerpruneError(f"eval.perplexity names its texts {labels}; give each a name")

    def texts(self) -> list[PerplexitySpec]:
        """The perplexity texts, in order (none, one or several)."""
        if self.perplexity is None:
            return []
        return self.perplexity if isinstance(self.perplexity, list) else [self.perplexity]

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
    perplexity: dict[str, dict[str, Any]]  # per text name
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


def nested_sample(name: str, n_docs: int, k: int, seed: int) -> list[int]:
    """``k`` of a task's ``n_docs`` document ids, drawn at random: the first ``k`` of one
    permutation per (task, seed), so a smaller sample is inside a larger one. Sorted."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    return sorted(int(i) for i in rng.permutation(n_docs)[:k])


def document_counts(source: TaskSource) -> dict[str, int]:
    """Documents in each leaf task's evaluation split: the mirror's rows, else lm-eval's."""
    counts = {leaf.name: source.document_count(leaf) for leaf in source.leaves}
    missing = [name for name, n in counts.items() if n is None]
    if missing:
        objects = source.manager.load(missing)["tasks"]
        counts.update({name: len(objects[name].eval_docs) for name in missing})
    return {name: int(n) for name, n in counts.items() if n is not None}


def chosen_documents(suite: EvalSuite, source: TaskSource) -> dict[str, list[int]] | None:
    """lm-eval's ``samples``: the given ids, or per leaf task a seeded random ``limit``
    documents (tasks with no more than ``limit`` documents run whole); None for lm-eval's own
    ``limit`` (first-N, with ``sampling: first``) or all documents."""
    if suite.samples:
        return {task: list(ids) for task, ids in suite.samples.items()}
    if suite.limit is None or suite.sampling == "first":
        return None
    counts = document_counts(source)
    return {
        name: nested_sample(name, n, suite.limit, suite.seed)
        for name, n in counts.items()
        if n > suite.limit
    }


def evaluate(
    loaded: LoadedModel,
    suite: EvalSuite,
    source: TaskSource,
    documents: dict[str, list[int]] | None = None,
) -> Evaluation:
    """One model on ``suite``; ``documents`` (lm-eval's ``samples``) default to
    :func:`chosen_documents`."""
    start = time.perf_counter()
    if documents is None:
        documents = chosen_documents(suite, source)
    model = loaded.model
    common = {
        "pretrained": model,
        "tokenizer": loaded.tokenizer,
        "batch_size": suite.batch_size,
        "max_length": suite.max_length,
        "device": str(next(model.parameters()).device),
    }
    hflm = (
        SharedContextLM(**common, batch_tokens=suite.batch_tokens)
        if suite.backend == "fast"
        else HFLM(**common)
    )
    with quiet_git_hash():
        results = lm_eval.simple_evaluate(
            model=hflm,
            tasks=list(suite.tasks),
            num_fewshot=suite.num_fewshot,
            limit=suite.limit if documents is None else None,
            samples=documents,
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
    ppl = {}
    for spec in suite.texts():
        result = perplexity_of_file(
            model,
            loaded.tokenizer,
            spec.path,
            seq_len=spec.seq_len,
            stride=spec.stride,
            batch_size=spec.batch_size,
            max_tokens=spec.max_tokens,
        )
        ppl[spec.label] = {"path": spec.path, **asdict(result)}
    return Evaluation(
        task_metrics(results), samples, n_samples, ppl, time.perf_counter() - start, results
    )


def prepare(suite: EvalSuite, mirror: str | Path | None, work_dir: Path) -> TaskSource:
    """Check tasks, the mirror and the perplexity text before any model is loaded."""
    for spec in suite.texts():
        if not Path(spec.path).is_file():
            raise LayerpruneError(f"perplexity text '{spec.path}' does not exist")
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


def compare_perplexity(dense: Evaluation, pruned: Evaluation, seed: int, iters: int) -> dict:
    """Per text: both sides with a bootstrap CI over windows, and the pruned/dense ratio with a
    paired one (the same windows resampled for both)."""
    out: dict[str, Any] = {}
    for name, d in dense.perplexity.items():
        p = pruned.perplexity.get(name)
        if p is None:
            continue
        entry: dict[str, Any] = {"dense": dict(d), "pruned": dict(p), "ratio": p["ppl"] / d["ppl"]}
        for side in (entry["dense"], entry["pruned"]):
            side["ci"] = interval(*perplexity_ci(side["window_nll"], side["window_tokens"],
                                                 seed, iters))  # fmt: skip
        if d["window_tokens"] == p["window_tokens"]:
            cols = np.array([d["window_nll"], p["window_nll"], d["window_tokens"]]).T
            draws = resample_means({name: cols}, iters, seed)[name]
            ratio = np.exp((draws[:, 1] - draws[:, 0]) / draws[:, 2])
            entry["ratio_ci"] = interval(*percentile_ci(ratio))
        out[name] = entry
    return out


def compare(
    suite: EvalSuite, source: TaskSource, dense: Evaluation, pruned: Evaluation
) -> dict[str, Any]:
    """Per-task dense vs pruned headline metrics with their uncertainty, average, RP,
    stability and flips; every interval is a 95% one computed from the per-document samples."""
    seed, iters = suite.seed, suite.bootstrap_iters
    rows = []
    draws: dict[str, np.ndarray] = {}  # task -> (iters, 2) bootstrap means, dense and pruned
    stability_of: dict[str, np.ndarray] = {}  # task -> stability draws
    for task in suite.tasks:
        metric, d = headline(suite, task, dense.metrics)
        p = pruned.metrics[task][metric]
        row: dict[str, Any] = {"task": task, "metric": metric, "dense": d, "pruned": p,
                               "delta": p - d}  # fmt: skip
        norm = metric == "acc_norm"
        leaves = [leaf.name for leaf in source.members[task]]
        have = [name for name in leaves if name in dense.samples and name in pruned.samples]
        if have and len(have) == len(leaves) and metric in ("acc", "acc_norm"):
            # a group's documents are pooled, as lm-eval's size-weighted group mean pools them
            cols = np.concatenate(
                [paired_correct(dense.samples[n], pruned.samples[n], norm) for n in have]
            )
            golds = [s for n in have for s in dense.samples[n]]
            stats, draws[task] = accuracy_stats(cols, golds, seed, iters, task)
            row.update(stats)
        per_leaf = {
            name: task_stability(dense.samples[name], pruned.samples[name], norm, seed, iters, name)
            for name in have
        }
        if per_leaf:  # a group's stability is the mean over its tasks
            leaf_draws = [
                stability_draws(dense.samples[n], pruned.samples[n], norm, seed, iters, n)
                for n in per_leaf
            ]
            stability_of[task] = np.mean(leaf_draws, axis=0)
            row.update(average_over_tasks(per_leaf))
            row["stability_ci"] = interval(*percentile_ci(stability_of[task]))
            row["stability_ess"] = math.fsum(r["stability_ess"] for r in per_leaf.values())
        rows.append(row)
    avg_dense = sum(r["dense"] for r in rows) / len(rows)
    avg_pruned = sum(r["pruned"] for r in rows) / len(rows)
    average: dict[str, Any] = {"dense": avg_dense, "pruned": avg_pruned,
                               "delta": avg_pruned - avg_dense}  # fmt: skip
    rp_ci = None
    if len(draws) == len(rows):  # every task has per-document samples
        average.update(average_intervals([draws[r["task"]] for r in rows]))
        rp_ci = average.pop("rp_ci")
    else:
        average["no_samples"] = [r["task"] for r in rows if r["task"] not in draws]
    with_stability = {r["task"]: r for r in rows if "stability" in r}
    overall = average_over_tasks(with_stability) if with_stability else None
    if overall is not None:
        overall["stability_ci"] = interval(
            *percentile_ci(np.mean([stability_of[t] for t in with_stability], axis=0))
        )
    return {
        "tasks": rows,
        "average": average,
        "rp": avg_pruned / avg_dense if avg_dense else None,
        "rp_ci": rp_ci,
        "stability": overall,
        "perplexity": compare_perplexity(dense, pruned, seed, iters),
        "metrics": {"dense": dense.metrics, "pruned": pruned.metrics},
        "n_samples": pruned.n_samples,
        "unavailable": suite.unavailable,
        "uncertainty": UNCERTAINTY | {"bootstrap_iters": iters, "seed": seed},
    }


UNCERTAINTY = {
    "level": 0.95,
    "accuracy_ci": "Wilson score interval",
    "delta_ci": "paired percentile bootstrap over documents, each task resampled on its own",
    "stability_ci": "percentile bootstrap over documents, softmax renormalised per resample",
    "mcnemar": "exact two-sided binomial test on the discordant documents",
    "perplexity_ci": "percentile bootstrap over windows of exp(sum NLL / sum tokens)",
}


def half(ci: dict[str, float] | None) -> float | None:
    """Half the width of an interval (Wilson's is not symmetric around the value)."""
    return None if not ci else (ci["hi"] - ci["lo"]) / 2


def at_chance(row: dict[str, Any], side: str) -> bool:
    """Whether a side's value is at or below the majority-class or the chance accuracy."""
    floor = max(row.get("majority", -1.0), row.get("chance", -1.0))
    value = row.get(side)
    return value is not None and value <= floor + 1e-12


def pm(value: float | None, ci: dict[str, float] | None, mark: bool = False) -> str:
    if value is None:
        return "-"
    text = f"{value:.3f}" + (f"±{half(ci):.3f}" if ci else "")
    return text + ("†" if mark else "")


def table(comparison: dict[str, Any]) -> str:
    """The printed summary: per task value ± half-width of its 95% interval, agreement,
    stability and its effective sample size, flips (right->wrong / wrong->right) and McNemar's
    p; † marks a value at or below the majority-class or chance accuracy of the task's
    documents."""
    lines = [f"{'task':<16}{'metric':<10}{'dense':>14}{'pruned':>14}{'delta':>15}"
             f"{'agree':>7}{'stab':>7}{'ess':>6}{'flips':>10}{'p':>7}"]  # fmt: skip

    def num(v: float | None, width: int = 7) -> str:
        return f"{v:{width}.3f}" if v is not None else f"{'-':>{width}}"

    def ess(v: float | None) -> str:
        return f"{v:6.0f}" if v is not None else f"{'-':>6}"

    for r in comparison["tasks"]:
        flips = (f"{r['right_to_wrong']}/{r['wrong_to_right']}"
                 if "right_to_wrong" in r else "-")  # fmt: skip
        lines.append(
            f"{r['task']:<16}{r['metric']:<10}"
            f"{pm(r['dense'], r.get('dense_ci'), at_chance(r, 'dense')):>14}"
            f"{pm(r['pruned'], r.get('pruned_ci'), at_chance(r, 'pruned')):>14}"
            f"{pm(r['delta'], r.get('delta_ci')):>15}{num(r.get('agreement'))}"
            f"{num(r.get('stability'))}{ess(r.get('stability_ess'))}{flips:>10}"
            f"{num(r.get('mcnemar_p'))}"
        )
    avg, stab = comparison["average"], comparison["stability"] or {}
    lines.append(
        f"{'average':<26}{pm(avg['dense'], avg.get('dense_ci')):>14}"
        f"{pm(avg['pruned'], avg.get('pruned_ci')):>14}{pm(avg['delta'], avg.get('delta_ci')):>15}"
        f"{num(stab.get('agreement'))}{num(stab.get('stability'))}{ess(stab.get('stability_ess'))}"
    )
    for name, ppl in comparison["perplexity"].items():
        d, p = ppl["dense"], ppl["pruned"]
        lines.append(f"perplexity {name}: {pm(d['ppl'], d.get('ci'))} -> "
                     f"{pm(p['ppl'], p.get('ci'))} ({p['n_tokens']} tokens)")  # fmt: skip
    if comparison["rp"] is not None:
        lines.append(f"retained performance RP = {pm(comparison['rp'], comparison.get('rp_ci'))}")
    if avg.get("no_samples"):
        lines.append(f"no per-document samples (no interval): {', '.join(avg['no_samples'])}")
    lines.append("± half-width of the 95% interval; † at or below majority-class/chance accuracy")
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
        self.documents = chosen_documents(suite, self.source)
        self.cache = JsonCache("dense_eval", cache_dir)
        self.removal_cache = JsonCache("removal_eval", cache_dir)
        self._dense: Evaluation | None = None
        self._dense_hit = False
        self._pruned: Evaluation | None = None
        self._pruned_hit = False

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
                self.cache_key(loaded),
                lambda: evaluate(loaded, self.suite, self.source, self.documents).to_dict(),
            )
        log.info("dense evaluation %s", "reused from the cache" if hit else "computed and cached")
        self._dense, self._dense_hit = Evaluation.from_dict(payload), hit
        return hit

    def pruned(
        self,
        loaded: LoadedModel,
        out: Path,
        stage: Stage = untimed,
        removed: Sequence[int] | None = None,
    ) -> dict[str, Any]:
        """Evaluate the pruned model, write both sides' samples under ``out/samples`` and
        return ``{"eval": record}`` for metrics.json.

        ``removed``: the pruned model is the original (``loaded.fingerprint``) with these layers
        removed and nothing else changed. Such a model is evaluated once per cache key and
        layers, like the dense one, so that a search and the runs of several criteria that
        reach the same plan (or a run started again) share one evaluation."""
        if self._dense is None:
            raise RuntimeError("Evaluator.pruned needs Evaluator.dense on the original model first")

        key = None if removed is None else {**self.cache_key(loaded), "removed": sorted(removed)}
        with stage("eval_pruned"):
            cached = None if key is None else self.removal_cache.get(key)
            if cached is None:  # kept whole: lm-eval's own results are not cached
                self._pruned = evaluate(loaded, self.suite, self.source, self.documents)
                if key is not None:
                    self.removal_cache.put(key, self._pruned.to_dict())
            else:
                self._pruned = Evaluation.from_dict(cached)
            self._pruned_hit = cached is not None
        for label, evaluation in (("dense", self._dense), ("pruned", self._pruned)):
            for task, samples in evaluation.samples.items():
                write_samples(out / "samples" / label / f"{task}.jsonl.gz", samples)
        comparison = compare(self.suite, self.source, self._dense, self._pruned)
        return {"eval": {**comparison, "sampling": self.sampling(), "note": self.suite.note,
                         "dense_from_cache": self._dense_hit,
                         "pruned_from_cache": self._pruned_hit}}  # fmt: skip

    def sampling(self) -> dict[str, Any]:
        """Which documents were evaluated: ``method`` (random, first, given or all), ``limit``,
        ``seed``, and the ids of every task evaluated on a subset (``doc_ids``)."""
        suite = self.suite
        if suite.samples:
            method = "given"
        elif suite.limit is None:
            method = "all"
        else:
            method = suite.sampling
        ids = dict(self.documents or {})
        if method == "first" and self._pruned is not None:
            ids = {t: sorted(s.doc_id for s in ss) for t, ss in self._pruned.samples.items()}
        return {"method": method, "limit": suite.limit, "seed": suite.seed, "doc_ids": ids}

    def table(self, evaluated: dict[str, Any]) -> str:
        """The printed summary of what :meth:`pruned` returned."""
        record = evaluated["eval"]
        origin = "reused from the cache" if record["dense_from_cache"] else "computed"
        if record.get("pruned_from_cache"):
            origin += "; the same removal's eval reused from the cache"
        note = f"{record['note']}\n" if record.get("note") else ""
        return f"{note}dense eval {origin}\n{table(record)}"

    @property
    def lm_eval_results(self) -> dict[str, Any] | None:
        """lm-eval's own results of the pruned model (for its W&B logger); not cached."""
        return self._pruned.raw if self._pruned else None
