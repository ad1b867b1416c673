"""The Hydra app: load -> score -> select -> prune -> (save) -> write results.

Everything here composes the library; the only Hydra-specific parts are config composition,
instantiation with ``_target_`` and the run folder.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
from pathlib import Path
from typing import Any

import hydra
import torch
import transformers
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import layerprune
from layerprune.cache import JsonCache
from layerprune.calibration import Calibration
from layerprune.errors import LayerpruneError
from layerprune.files import commit_dir, write_json
from layerprune.layers import layer_param_counts, param_count
from layerprune.models import LoadedModel
from layerprune.plots import plot_importance
from layerprune.scoring import LayerStats, Scorer, Streamline, collect_layer_stats
from layerprune.selection import Plan, Sparsity, make_plan
from layerprune.surgery import remove_layers

log = logging.getLogger("layerprune")
PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = PROJECT_ROOT / "conf"
SCHEMA_VERSION = 1
SCORES_VERSION = 1  # bump when the statistics' definition changes (invalidates the cache)


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


def scores_record(loaded: LoadedModel, cal: Calibration, stats: LayerStats, k: int) -> dict[str, Any]:
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
    tmp = out.with_name(f".{out.name}.tmp")
    loaded.model.save_pretrained(tmp)
    loaded.tokenizer.save_pretrained(tmp)
    commit_dir(tmp, out)


def summary(loaded: LoadedModel, plan: Plan, hit: bool, out: Path) -> str:
    d = plan.to_dict()
    return "\n".join(
        [
            f"model      {loaded.name}: {plan.num_layers} -> {d['num_layers_after']} layers",
            f"scorer     {plan.scorer} ({plan.selection}), scores {'from cache' if hit else 'computed'}",
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


def run(cfg: DictConfig, out: Path) -> Plan:
    sparsity = Sparsity(float(cfg.sparsity), str(cfg.sparsity_unit))
    scorer: Scorer = build(cfg.scorer)
    calibration: Calibration = build(cfg.calibration)
    loaded: LoadedModel = build(cfg.model)
    stats, hit = layer_stats(loaded, calibration, cfg)
    plan = make_plan(
        scorer, stats, sparsity, layer_param_counts(loaded.model), param_count(loaded.model)
    )
    remove_layers(loaded.model, plan.removed_layers)
    if cfg.save_model:
        save_model(loaded, out / "model")
    config = OmegaConf.to_container(cfg, resolve=True)
    write_json(out / "scores.json", scores_record(loaded, calibration, stats, len(plan.removed_layers)))
    write_json(
        out / "plan.json",
        {
            "schema_version": SCHEMA_VERSION,
            "kind": "layerprune.plan",
            "model": {"name": loaded.name, "fingerprint": loaded.fingerprint},
            "plan": plan.to_dict(),
            "config": config,
            "versions": versions(),
        },
    )
    title = f"{loaded.name}: {stats.n_windows} windows x {stats.n_tokens // stats.n_windows} tokens"
    plot_importance(stats, out / "importance.png", title, len(plan.removed_layers), plan.removed_layers)
    print(summary(loaded, plan, hit, out))
    return plan


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        run(cfg, Path(HydraConfig.get().runtime.output_dir))
    except LayerpruneError as e:
        print(f"layerprune: error: {e}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    _hydra_main()
