"""One pruning job, start to end: load -> score -> plan -> evaluate dense -> prune and recover
-> evaluate pruned -> write records -> (save the checkpoint) -> log.

A :class:`Job` holds ready-made objects (scorer, calibration, recovery, tracker), the
evaluator's factory and plain settings; it never sees a Hydra config, so the same job can be
built in Python.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from layerprune.cache import JsonCache
from layerprune.calibration import Calibration
from layerprune.criteria import CriterionScores, ModelScorer
from layerprune.export import save_checkpoint
from layerprune.files import cache_root, clean_stale, read_json, write_json
from layerprune.layers import layer_param_counts, param_count
from layerprune.models import LoadedModel
from layerprune.plots import plot_importance
from layerprune.records import (
    config_hash,
    finished_run,
    plan_record,
    run_record,
    scores_record,
)
from layerprune.recovery import Recovery
from layerprune.resources import Stage, Timer, reset_peak_memory, resource_use, untimed
from layerprune.scoring import Convention, LayerStats, Scorer, collect_layer_stats
from layerprune.selection import Plan, Sparsity, make_plan
from layerprune.speed import SpeedSettings, compare_speed
from layerprune.validation import check_model

log = logging.getLogger("layerprune")
SCORES_VERSION = 1  # bump when the statistics' definition changes (invalidates the cache)
CRITERIA_VERSION = 1  # bump when a model scorer's measurement changes (invalidates the cache)
CACHES = ("models", "scores", "dense_eval", "tasks", "activations")


class Evaluator(Protocol):
    """Evaluates the dense model before pruning and the pruned one after, each inside the
    given timing stage; :class:`layerprune.evaluation.Evaluator` is the lm-eval one."""

    def dense(self, loaded: LoadedModel, stage: Stage = untimed) -> bool: ...

    def pruned(
        self,
        loaded: LoadedModel,
        out: Path,
        stage: Stage = untimed,
        removed: Sequence[int] | None = None,
    ) -> dict[str, Any]:
        """``{"eval": record}`` for metrics.json (empty when there is no evaluation);
        ``removed``: the model is the dense one without these layers, nothing else changed."""
        ...

    def table(self, evaluated: dict[str, Any]) -> str: ...

    @property
    def lm_eval_results(self) -> Any: ...


class NoEvaluator:
    """``eval=none``: the same calls, doing nothing (and importing no lm-eval)."""

    def dense(self, loaded: LoadedModel, stage: Stage = untimed) -> bool:
        return False

    def pruned(
        self,
        loaded: LoadedModel,
        out: Path,
        stage: Stage = untimed,
        removed: Sequence[int] | None = None,
    ) -> dict[str, Any]:
        return {}

    def table(self, evaluated: dict[str, Any]) -> str:
        return ""

    @property
    def lm_eval_results(self) -> Any:
        return None


class Tracker(Protocol):
    def log_run(
        self, record: dict[str, Any], run_dir: Path, lm_eval_results: Any = None
    ) -> None: ...


@dataclass(frozen=True)
class ScoringSettings:
    batch_size: int = 8
    convention: Convention = "residual"
    cache: bool = True


@dataclass
class Job:
    """Everything one run needs. ``config`` is the resolved configuration as plain data: it is
    recorded with the results and hashed to recognise a finished run."""

    load_model: Callable[[], LoadedModel]
    calibration: Calibration
    scorer: Scorer
    sparsity: Sparsity
    recovery: Recovery
    make_evaluator: Callable[[], Evaluator]  # built after the finished-run check (see run)
    tracker: Tracker
    config: dict[str, Any] = field(default_factory=dict)
    scoring: ScoringSettings = ScoringSettings()
    speed: SpeedSettings = field(default_factory=SpeedSettings)
    cache_dir: str | None = None
    runs_dir: Path | None = None
    save_model: bool = False
    force: bool = False
    window_lengths: dict[str, int] = field(default_factory=dict)  # config key -> tokens
    first_start: int = 0  # `++first_start`: the earliest start of a contiguous block (controls)

    def lengths(self) -> dict[str, int]:
        """Every window length the model must accept (checked after loading, by config key)."""
        lengths = {"calibration.seq_len": self.calibration.seq_len}
        if self.recovery.steps and self.recovery.train_data is not None:
            lengths["recovery.train_data.seq_len"] = self.recovery.train_data.seq_len
        return {**lengths, **self.window_lengths}


def layer_stats(
    loaded: LoadedModel, calibration: Calibration, settings: ScoringSettings, cache_dir: str | None
) -> tuple[LayerStats, bool]:
    """Statistics of a (model, calibration) pair: computed once, then read from the cache."""
    key = {
        "version": SCORES_VERSION,
        "model": loaded.fingerprint,
        "calibration": calibration.identity(),
        "convention": settings.convention,
        "batch_size": settings.batch_size,
    }

    def compute() -> dict[str, Any]:
        windows = calibration.windows(loaded.tokenizer)
        log.debug("scoring %d windows of %d tokens", *windows.shape)
        stats = collect_layer_stats(
            loaded.model, windows, settings.batch_size, settings.convention, progress=True
        )
        return stats.to_dict()

    if not settings.cache:
        return LayerStats.from_dict(compute()), False
    payload, hit = JsonCache("scores", cache_dir).get_or_compute(key, compute)
    return LayerStats.from_dict(payload), hit


class StepsCache:
    """An iterative criterion's steps so far, kept under its scores key without k, so that a
    measurement stopped part-way resumes, and one for more layers starts after one for fewer.
    Only a longer run of the same steps replaces the entry: jobs of several sizes may share it."""

    def __init__(self, key: dict[str, Any], scorer: ModelScorer, cache_dir: str | None) -> None:
        self.key = {**key, "criterion": scorer.identity(None)}
        self.cache = JsonCache("criterion-steps", cache_dir)

    def load(self) -> list[dict[str, Any]]:
        steps = self.cache.get(self.key)
        return steps if isinstance(steps, list) else []

    def save(self, steps: list[dict[str, Any]]) -> None:
        stored = self.load()
        if len(steps) > len(stored) and steps[: len(stored)] == stored:
            self.cache.put(self.key, steps)


def criterion_scores(
    loaded: LoadedModel,
    calibration: Calibration,
    scorer: Scorer,
    k: int,
    settings: ScoringSettings,
    cache_dir: str | None,
) -> tuple[CriterionScores | None, bool]:
    """What a model scorer measures on the calibration windows (None for a statistic scorer),
    computed once, then read from the scores cache. The key holds the scorer's class and
    settings and, for an iterative criterion, the number of layers ``k`` it removes."""
    if not isinstance(scorer, ModelScorer):
        return None, True
    key = {
        "version": CRITERIA_VERSION,
        "model": loaded.fingerprint,
        "calibration": calibration.identity(),
        "criterion": scorer.identity(k),
        "batch_size": settings.batch_size,
    }

    steps = StepsCache(key, scorer, cache_dir) if settings.cache and scorer.iterative else None

    def compute() -> dict[str, Any]:
        windows = calibration.windows(loaded.tokenizer)
        log.debug("measuring %s on %d windows of %d tokens", scorer.name, *windows.shape)
        done = steps.load() if steps else []
        if done:
            log.info("%s: resuming after %d measured step(s)", scorer.name, min(len(done), k))
        measured = scorer.measure(
            loaded.model, windows, k, settings.batch_size, progress=True, resume=done,
            on_step=steps.save if steps else None,
        )  # fmt: skip
        return measured.to_dict()

    if not settings.cache:
        return CriterionScores.from_dict(compute()), False
    payload, hit = JsonCache("scores", cache_dir).get_or_compute(key, compute)
    return CriterionScores.from_dict(payload), hit


def removal_count(loaded: LoadedModel, sparsity: Sparsity, layers_added: int) -> int:
    """How many layers the plan removes (a replacement's layers count against the target)."""
    model = loaded.model
    removed = sparsity.num_layers_to_remove(layer_param_counts(model), param_count(model))
    return removed + layers_added


def plan_for(
    loaded: LoadedModel,
    evidence: LayerStats | CriterionScores,
    scorer: Scorer,
    sparsity: Sparsity,
    layers_added: int,
    first_start: int = 0,
) -> Plan:
    """The plan, with the parameter counts read from the model itself."""
    model = loaded.model
    return make_plan(
        scorer,
        evidence,
        sparsity,
        layer_param_counts(model),
        param_count(model),
        layers_added,
        first_start,
    )


def summary(loaded: LoadedModel, plan: Plan, scores_hit: bool) -> str:
    d = plan.to_dict()
    return "\n".join(
        [
            f"model      {loaded.name}: {plan.num_layers} -> {d['num_layers_after']} layers",
            f"scorer     {plan.scorer} ({plan.selection}), "
            f"scores {'from cache' if scores_hit else 'computed'}",
            f"removed    {plan.removed_layers}",
            f"params     {plan.params_before:,} -> {plan.params_after:,} "
            f"(-{d['removed_param_ratio']:.1%} params, -{d['removed_layer_ratio']:.1%} layers)",
        ]
    )


def clean_litter(job: Job) -> None:
    """Remove what killed runs left (temporary files, half-written folders), never what a
    running process is still writing (see :func:`layerprune.files.clean_stale`)."""
    root = cache_root(job.cache_dir)
    removed = sum(clean_stale(root / kind) for kind in CACHES)
    if job.runs_dir is not None:
        removed += clean_stale(job.runs_dir, recursive=True)
    if removed:
        log.debug("removed %d stale temporary file(s) or folder(s)", removed)


def log_to_tracker(
    job: Job, record: dict[str, Any], scores: dict[str, Any], out: Path, results: Any = None
) -> dict[str, Any]:
    """Log a run and mark its metrics.json ``logged``; a tracker that fails leaves the mark
    false, and the next run of the same config logs it (see :func:`run`)."""
    try:
        job.tracker.log_run({**record, "scores": scores}, out, results)
    except Exception as e:  # the results stand; logging them is retried by the next run
        log.warning("warning: logging the run failed (%s); the next run of this config logs it", e)
        return record
    record = {**record, "logged": True}
    write_json(out / "metrics.json", record)
    return record


def finish_logging(job: Job, done: Path) -> dict[str, Any]:
    """A finished run whose logging did not complete: log it now."""
    record = dict(read_json(done / "metrics.json"))
    if record.get("logged") is not False:
        return record
    log.info("logging the finished run in %s, whose logging did not complete", done)
    scores_path = done / "scores.json"
    scores = dict(read_json(scores_path)) if scores_path.is_file() else {}
    return log_to_tracker(job, record, scores, done)


def run(job: Job, out: Path) -> dict[str, Any]:
    """Run ``job`` into the folder ``out``; return the metrics.json record (or, when a finished
    run of the same config exists under ``job.runs_dir``, that run's record).

    metrics.json is written with ``logged: false``, then the tracker logs the run, then the
    mark turns true: a run killed or failing in between counts as finished, and the next run
    of its config completes the logging instead of computing it again.
    """
    key = config_hash(job.config)
    clean_litter(job)
    if not job.force and job.runs_dir and (done := finished_run(job.runs_dir, key)):
        log.info("skipped: a finished run of this config (hash %s) is in %s", key, done)
        return finish_logging(job, done)
    # Preparing the evaluation (indexing lm-eval's tasks, checking the mirror) takes ~20 s: a
    # resumed sweep pays it only for the jobs that run, still before any model work.
    evaluator = job.make_evaluator()
    timer = Timer()
    reset_peak_memory()
    with timer.stage("load"):
        loaded = job.load_model()
    check_model(loaded, job.sparsity, job.recovery, job.lengths(), job.scorer)
    train_windows = job.recovery.windows(loaded)
    layers_added = job.recovery.layers_added
    with timer.stage("score"):
        stats, scores_hit = layer_stats(loaded, job.calibration, job.scoring, job.cache_dir)
        k = removal_count(loaded, job.sparsity, layers_added)
        measured, measured_hit = criterion_scores(
            loaded, job.calibration, job.scorer, k, job.scoring, job.cache_dir
        )
    scores_hit = scores_hit and measured_hit
    plan = plan_for(
        loaded,
        measured or stats,
        job.scorer,
        job.sparsity,
        layers_added,
        max(job.first_start, job.recovery.first_start),
    )
    evaluator.dense(loaded, timer.stage)
    dense = copy.deepcopy(loaded.model) if job.speed.enabled else None
    with timer.stage("prune_recover"):
        reports = job.recovery.apply(loaded, plan.removed_layers, train_windows)
    speed = None
    if dense is not None:
        with timer.stage("speed"):
            speed = compare_speed(dense, copy.deepcopy(loaded.model), job.speed)  # both copies
        del dense
    plan = replace(plan, params_after=param_count(loaded.model))  # net of replacements
    log.info("%s", summary(loaded, plan, scores_hit))
    plain = None if reports else plan.removed_layers  # plain removal: its evaluation is shared
    evaluated = evaluator.pruned(loaded, out, timer.stage, plain)
    if table := evaluator.table(evaluated):
        log.info("%s", table)
    scores = scores_record(loaded, job.calibration, stats, len(plan.removed_layers), measured)
    write_json(out / "scores.json", scores)
    planned = plan_record(loaded, plan, job.config)
    write_json(out / "plan.json", planned)
    title = f"{loaded.name}: {stats.n_windows} windows x {stats.n_tokens // stats.n_windows} tokens"
    plot_importance(
        stats, out / "importance.png", title, len(plan.removed_layers), plan.removed_layers,
        measured,
    )  # fmt: skip
    evaluation = evaluated.get("eval")
    if job.save_model:
        with timer.stage("save"):
            save_checkpoint(
                loaded, out / "model", plan, job.calibration, reports, evaluation, table or None
            )
    record = run_record(planned, key, scores_hit, reports, evaluation, resource_use(timer))
    if speed is not None:
        record["speed"] = speed
    record["logged"] = False
    write_json(out / "metrics.json", record)
    return log_to_tracker(job, record, scores, out, evaluator.lm_eval_results)
