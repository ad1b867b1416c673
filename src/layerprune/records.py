"""The files a run writes, and how finished runs are found again.

Three self-describing JSON records, each with ``schema_version`` and ``kind``:

* ``scores.json`` (``layerprune.scores``): the layer statistics and every scorer's metrics;
* ``plan.json`` (``layerprune.plan``): what is removed, written before any evaluation;
* ``metrics.json`` (``layerprune.run``): everything, written last and atomically, so its
  presence means the run finished. Its ``config_hash`` identifies the computation, which is
  how a sweep skips the jobs it already finished.
"""

from __future__ import annotations

import platform
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
import transformers

import layerprune
from layerprune.cache import digest
from layerprune.calibration import Calibration
from layerprune.criteria import CriterionScores
from layerprune.files import read_json
from layerprune.models import LoadedModel
from layerprune.scoring import LayerStats, layer_metrics
from layerprune.selection import Plan

SCHEMA_VERSION = 1
SCORES, PLAN, RUN = "layerprune.scores", "layerprune.plan", "layerprune.run"
# where results go and how they are shown
NOT_HASHED = ("paths", "logger", "force", "verbose", "debug")


def versions() -> dict[str, str]:
    """The software a record was made with."""
    try:
        lm_eval = version("lm-eval")
    except PackageNotFoundError:
        lm_eval = "not installed"
    return {
        "layerprune": layerprune.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "lm_eval": lm_eval,
    }


def config_hash(config: Mapping[str, Any]) -> str:
    """Identifies what a run computes: the resolved config less paths, logger and display, and
    less the speed measurement while it is off (it adds a measurement and changes nothing
    else, so runs made before it existed keep their hash)."""
    kept = {k: v for k, v in config.items() if k not in NOT_HASHED}
    if not (kept.get("speed") or {}).get("enabled"):
        kept.pop("speed", None)
    return digest(kept)[:16]


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def model_record(loaded: LoadedModel) -> dict[str, str]:
    return {"name": loaded.name, "source": loaded.source, "fingerprint": loaded.fingerprint}


def scores_record(
    loaded: LoadedModel,
    calibration: Calibration,
    stats: LayerStats,
    block_size: int,
    measured: CriterionScores | None = None,
) -> dict[str, Any]:
    """The statistics' metrics and, for a model scorer, what it measured: its per-layer values
    join ``layer_metrics`` under their key, and ``criterion`` holds them with the removal order,
    the protected layers and, for an iterative criterion, every step."""
    metrics = layer_metrics(stats, block_size)
    if measured is not None:
        metrics["layer_metrics"][measured.key] = measured.values
    record = {
        "schema_version": SCHEMA_VERSION,
        "kind": SCORES,
        "model": {"name": loaded.name, "fingerprint": loaded.fingerprint},
        "calibration": calibration.identity(),
        "convention": stats.convention,
        "num_layers": stats.num_layers,
        "n_windows": stats.n_windows,
        "n_tokens": stats.n_tokens,
        **metrics,
        "cosine_matrix": stats.cosine.tolist(),
        "angular_matrix": stats.angular.tolist(),
    }
    if measured is not None:
        record["criterion"] = measured.to_dict()
    return record


def plan_record(loaded: LoadedModel, plan: Plan, config: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": PLAN,
        "model": {"name": loaded.name, "fingerprint": loaded.fingerprint},
        "plan": plan.to_dict(),
        "config": dict(config),
        "versions": versions(),
    }


def run_record(
    plan: Mapping[str, Any],
    key: str,
    scores_from_cache: bool,
    recovery: list[dict[str, Any]],
    evaluation: dict[str, Any] | None,
    resources: Mapping[str, Any],
) -> dict[str, Any]:
    """metrics.json: the plan record plus what the run measured and what it cost
    (:func:`layerprune.resources.resource_use`)."""
    record = {**plan, "kind": RUN, "config_hash": key, "scores_from_cache": scores_from_cache,
              "recovery": recovery}  # fmt: skip
    if evaluation is not None:
        record["eval"] = evaluation
    return {**record, **resources, "created": now()}


def run_records(root: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Every finished run (its folder and metrics.json) under ``root``; unreadable ones are
    passed over, since a half-copied tree must not stop a sweep or a report."""
    for path in sorted(root.glob("**/metrics.json")):
        try:
            record = read_json(path)
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and record.get("kind") == RUN:
            yield path.parent, record


def finished_run(root: Path, key: str) -> Path | None:
    """A complete earlier run of the same config hash under ``root``."""
    return next(
        (folder for folder, rec in run_records(root) if rec.get("config_hash") == key), None
    )
