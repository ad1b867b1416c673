"""The Hydra app: load -> score -> select -> prune -> (save) -> write results.

Everything here composes the library; the only Hydra-specific parts are config composition,
instantiation with ``_target_`` and the run folder.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import hydra
import torch
import transformers
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import layerprune
from layerprune.cache import JsonCache, digest
from layerprune.calibration import Calibration
from layerprune.errors import LayerpruneError
from layerprune.evaluation import (
    LM_EVAL_VERSION,
    EvalSuite,
    Evaluation,
    compare,
    evaluate,
    prepare,
    table,
)
from layerprune.files import cache_root, commit_dir, read_json, write_json
from layerprune.layers import layer_param_counts, param_count
from layerprune.mirror import TaskSource
from layerprune.models import LoadedModel
from layerprune.plots import plot_importance
from layerprune.recovery import Recovery, save_recovered
from layerprune.scoring import LayerStats, Scorer, Streamline, collect_layer_stats
from layerprune.selection import Plan, Sparsity, make_plan
from layerprune.stability import write_samples

log = logging.getLogger("layerprune")
PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the checkout, for an editable install
CONF_DIR = Path(__file__).resolve().parent / "conf"  # shipped inside the package
SCHEMA_VERSION = 1
SCORES_VERSION = 1  # bump when the statistics' definition changes (invalidates the cache)
EVAL_VERSION = 1  # likewise for the dense-evaluation cache


def default_mirror() -> str:
    """``$LAYERPRUNE_DATA_MIRROR``, else a ``shared/data`` folder beside the checkout or cwd."""
    env = os.environ.get("LAYERPRUNE_DATA_MIRROR")
    if env:
        return env
    for base in (Path.cwd(), PROJECT_ROOT):
        candidate = (base / ".." / "shared" / "data").resolve()
        if candidate.is_dir():
            return str(candidate)
    return "LAYERPRUNE_DATA_MIRROR-is-unset"


OmegaConf.register_new_resolver("lp_mirror", default_mirror, replace=True)


def versions() -> dict[str, str]:
    return {
        "layerprune": layerprune.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "lm_eval": LM_EVAL_VERSION,
    }


def layer_stats(
    loaded: LoadedModel, calibration: Calibration, cfg: DictConfig
) -> tuple[LayerStats, bool]:
    """Scores of a (model, calibration) pair: computed once, then read from the cache."""
    key = {
        "version": SCORES_VERSION,
        "model": loaded.fingerprint,
        "calibration": calibration.identity(),
        "convention": cfg.scoring.convention,
        "batch_size": cfg.scoring.batch_size,
    }

    def compute() -> dict[str, Any]:
        windows = calibration.windows(loaded.tokenizer)
        log.info("scoring %d windows of %d tokens", *windows.shape)
        stats = collect_layer_stats(
            loaded.model, windows, cfg.scoring.batch_size, cfg.scoring.convention, progress=True
        )
        return stats.to_dict()

    if not cfg.scoring.cache:
        return LayerStats.from_dict(compute()), False
    payload, hit = JsonCache("scores", cfg.paths.cache).get_or_compute(key, compute)
    return LayerStats.from_dict(payload), hit


def scores_record(
    loaded: LoadedModel, cal: Calibration, stats: LayerStats, k: int
) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "layerprune.scores",
        "model": {"name": loaded.name, "fingerprint": loaded.fingerprint},
        "calibration": cal.identity(),
        "convention": stats.convention,
        "num_layers": stats.num_layers,
        "n_windows": stats.n_windows,
        "n_tokens": stats.n_tokens,
        "layer_metrics": {
            "block_influence": stats.block_influence().tolist(),
            "streamline_similarity": Streamline.similarity(stats, 1).tolist(),
            "angular_distance": stats.block_angular(1).tolist(),
        },
        "block_metrics": {
            "size": k,
            "block_influence": (1 - stats.block_cosine(k)).tolist(),
            "streamline_similarity": Streamline.similarity(stats, k).tolist(),
            "angular_distance": stats.block_angular(k).tolist(),
        },
        "cosine_matrix": stats.cosine.tolist(),
        "angular_matrix": stats.angular.tolist(),
    }


def save_model(loaded: LoadedModel, out: Path) -> None:
    """A standard checkpoint; with ``ffn`` replacements, plus their weights (see recovery)."""
    tmp = out.with_name(f".{out.name}.tmp")
    save_recovered(loaded.model, tmp)
    loaded.tokenizer.save_pretrained(tmp)
    commit_dir(tmp, out)


def summary(loaded: LoadedModel, plan: Plan, hit: bool, out: Path) -> str:
    d = plan.to_dict()
    return "\n".join(
        [
            f"model      {loaded.name}: {plan.num_layers} -> {d['num_layers_after']} layers",
            f"scorer     {plan.scorer} ({plan.selection}), "
            f"scores {'from cache' if hit else 'computed'}",
            f"removed    {plan.removed_layers}",
            f"params     {plan.params_before:,} -> {plan.params_after:,} "
            f"(-{d['removed_param_ratio']:.1%} params, -{d['removed_layer_ratio']:.1%} layers)",
            f"results    {out}",
        ]
    )


def build(node: DictConfig) -> Any:
    """``instantiate``, but a user error inside a constructor surfaces as itself."""
    try:
        return instantiate(node, _convert_="all")
    except InstantiationException as e:
        if isinstance(e.__cause__, LayerpruneError):
            raise e.__cause__ from None
        raise


class Timer:
    """Wall-clock seconds of each stage, recorded in metrics.json."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._start = time.perf_counter()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 3)

    def total(self) -> dict[str, float]:
        return {**self.seconds, "total": round(time.perf_counter() - self._start, 3)}


PROC_SELF = Path("/proc/self")


def reset_peak_memory() -> None:
    """Start the peak-memory count afresh: a multirun runs all its jobs in one process."""
    with suppress(OSError):  # elsewhere the process-wide peak stands
        (PROC_SELF / "clear_refs").write_text("5")  # resets VmHWM (Linux >= 4.0)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> dict[str, float]:
    """Peak resident memory since :func:`reset_peak_memory` (and of the GPU), in GiB."""
    match = None
    with suppress(OSError):
        match = re.search(r"VmHWM:\s+(\d+) kB", (PROC_SELF / "status").read_text())
    kib = int(match.group(1)) if match else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = {"cpu_rss": kib / 2**20}  # ru_maxrss is in KiB on Linux too
    if torch.cuda.is_available():
        peak["cuda"] = torch.cuda.max_memory_allocated() / 2**30
    return {k: round(v, 3) for k, v in peak.items()}


def dense_evaluation(
    loaded: LoadedModel, suite: EvalSuite, source: TaskSource, cfg: DictConfig
) -> tuple[Evaluation, bool]:
    """The original model's evaluation: computed once per (model, eval settings), then cached."""
    key = {
        "version": EVAL_VERSION,
        "model": loaded.fingerprint,
        "device": next(loaded.model.parameters()).device.type,
        "suite": suite.identity(),
        "data": source.identity(),
    }
    cache = JsonCache("dense_eval", cfg.paths.cache)
    payload, hit = cache.get_or_compute(key, lambda: evaluate(loaded, suite, source).to_dict())
    log.info("dense evaluation %s", "reused from the cache" if hit else "computed and cached")
    return Evaluation.from_dict(payload), hit


def write_samples_dir(out: Path, label: str, evaluation: Evaluation) -> None:
    for task, samples in evaluation.samples.items():
        write_samples(out / "samples" / label / f"{task}.jsonl.gz", samples)


NOT_HASHED = ("paths", "logger", "force")  # where results go and how they are logged


def config_hash(cfg: DictConfig) -> str:
    """Identifies what a run computes: the resolved config less paths, logger and force."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(resolved, dict)
    return digest({k: v for k, v in resolved.items() if k not in NOT_HASHED})[:16]


def finished_run(root: Path, key: str) -> Path | None:
    """A complete earlier run of the same config under the results root (metrics.json is
    written last and atomically, so its presence means the run finished)."""
    for path in sorted(root.glob("**/metrics.json")):
        try:
            if read_json(path).get("config_hash") == key:
                return path.parent
        except (OSError, ValueError):
            continue
    return None


def run(cfg: DictConfig, out: Path) -> dict[str, Any]:
    """One job; returns the record written to metrics.json (or the earlier one, if skipped)."""
    key = config_hash(cfg)
    if not cfg.get("force", False) and (done := finished_run(Path(cfg.paths.runs), key)):
        print(f"skipped: a finished run of this config (hash {key}) is in {done}")
        return dict(read_json(done / "metrics.json"))
    timer = Timer()
    reset_peak_memory()
    sparsity = Sparsity(float(cfg.sparsity), str(cfg.sparsity_unit))
    scorer: Scorer = build(cfg.scorer)
    calibration: Calibration = build(cfg.calibration)
    tracker = build(cfg.logger)
    recovery = Recovery(**build(cfg.recovery))
    recovery.check(scorer)
    suite: EvalSuite | None = build(cfg.eval) if cfg.get("eval") else None
    source = (
        prepare(suite, cfg.data.mirror, cache_root(cfg.paths.cache) / "tasks") if suite else None
    )
    with timer.stage("load"):
        loaded: LoadedModel = build(cfg.model)
    train_windows = recovery.windows(loaded)
    with timer.stage("score"):
        stats, hit = layer_stats(loaded, calibration, cfg)
    layer_params, params_before = layer_param_counts(loaded.model), param_count(loaded.model)
    plan = make_plan(scorer, stats, sparsity, layer_params, params_before, recovery.layers_added)
    dense = None
    if suite and source:
        with timer.stage("eval_dense"):
            dense, dense_hit = dense_evaluation(loaded, suite, source, cfg)
    with timer.stage("prune_recover"):
        recovery_reports = recovery.apply(loaded, plan.removed_layers, train_windows)
    plan = replace(plan, params_after=param_count(loaded.model))  # net of replacements
    pruned = None
    if suite and source:
        with timer.stage("eval_pruned"):
            pruned = evaluate(loaded, suite, source)
    if cfg.save_model:
        with timer.stage("save"):
            save_model(loaded, out / "model")
    scores = scores_record(loaded, calibration, stats, len(plan.removed_layers))
    write_json(out / "scores.json", scores)
    record: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "kind": "layerprune.plan",
        "model": {"name": loaded.name, "fingerprint": loaded.fingerprint},
        "plan": plan.to_dict(),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "versions": versions(),
    }
    write_json(out / "plan.json", record)
    title = f"{loaded.name}: {stats.n_windows} windows x {stats.n_tokens // stats.n_windows} tokens"
    plot_importance(
        stats, out / "importance.png", title, len(plan.removed_layers), plan.removed_layers
    )
    print(summary(loaded, plan, hit, out))
    record = {**record, "kind": "layerprune.run", "config_hash": key, "scores_from_cache": hit,
              "recovery": recovery_reports}  # fmt: skip
    if suite and source and dense and pruned:
        write_samples_dir(out, "dense", dense)
        write_samples_dir(out, "pruned", pruned)
        comparison = compare(suite, source, dense, pruned)
        record["eval"] = {**comparison, "dense_from_cache": dense_hit}
        print(f"dense eval {'reused from the cache' if dense_hit else 'computed'}")
        print(table(comparison))
    record["timings"] = timer.total()
    record["peak_memory_gib"] = peak_memory()
    record["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    write_json(out / "metrics.json", record)
    tracker.log_run({**record, "scores": scores}, out, pruned.raw if pruned else None)
    return record


def share_sweep_group(cfg: DictConfig) -> None:
    """The jobs of one multirun log into one W&B group, named after the sweep folder."""
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN and "group" in cfg.logger and cfg.logger.group is None:
        cfg.logger.group = "sweep-" + "-".join(Path(hydra_cfg.sweep.dir).parts[-2:])


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    share_sweep_group(cfg)
    try:
        run(cfg, Path(HydraConfig.get().runtime.output_dir))
    except LayerpruneError as e:
        print(f"layerprune: error: {e}", file=sys.stderr)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # Hydra marks the job failed, runs the rest and exits non-zero at the end
        sys.exit(2)


def main() -> None:
    _hydra_main()
