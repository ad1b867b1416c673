"""The Hydra app: compose a config, turn it into a :class:`~layerprune.pipeline.Job`, run it in
Hydra's run folder. Everything else lives in the library; this module only composes.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from layerprune import console
from layerprune.errors import LayerpruneError
from layerprune.pipeline import Evaluator, Job, NoEvaluator, ScoringSettings
from layerprune.pipeline import run as run_job
from layerprune.recovery import Recovery
from layerprune.selection import Sparsity

log = logging.getLogger("layerprune")
CONF_DIR = Path(__file__).resolve().parent / "conf"  # shipped inside the package
CHECKOUT = Path(__file__).resolve().parents[2]  # the repository, for an editable install


def default_mirror() -> str:
    """``$LAYERPRUNE_DATA_MIRROR``, else a ``shared/data`` folder beside the cwd or checkout."""
    env = os.environ.get("LAYERPRUNE_DATA_MIRROR")
    if env:
        return env
    for base in (Path.cwd(), CHECKOUT):
        candidate = (base / ".." / "shared" / "data").resolve()
        if candidate.is_dir():
            return str(candidate)
    return "LAYERPRUNE_DATA_MIRROR-is-unset"


OmegaConf.register_new_resolver("lp_mirror", default_mirror, replace=True)


def compose(overrides: list[str] | None = None) -> DictConfig:
    """The config the command line would give, for Python use (tests, benchmarks, notebooks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides or [])


def build(node: DictConfig, partial: bool = False) -> Any:
    """``instantiate``, but a user error inside a constructor surfaces as itself."""
    try:
        return instantiate(node, _convert_="all", _partial_=partial)
    except InstantiationException as e:
        if isinstance(e.__cause__, LayerpruneError):
            raise e.__cause__ from None
        raise


def evaluator_for(cfg: DictConfig) -> Evaluator:
    """The evaluation the config asks for; lm-eval is imported only when there is one."""
    if not cfg.get("eval"):
        return NoEvaluator()
    from layerprune.evaluation import Evaluator as LmEvalEvaluator

    return LmEvalEvaluator(build(cfg.eval), cfg.data.mirror, cfg.paths.cache)


def job_from_config(cfg: DictConfig) -> Job:
    """Every object the run needs, built (and so checked) before any model is loaded."""
    scorer = build(cfg.scorer)
    recovery = Recovery(**build(cfg.recovery))
    recovery.check(scorer)
    config = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(config, dict)
    return Job(
        load_model=build(cfg.model, partial=True),
        calibration=build(cfg.calibration),
        scorer=scorer,
        sparsity=Sparsity(float(cfg.sparsity), str(cfg.sparsity_unit)),
        recovery=recovery,
        evaluator=evaluator_for(cfg),
        tracker=build(cfg.logger),
        config={str(k): v for k, v in config.items()},
        scoring=ScoringSettings(**cfg.scoring),
        cache_dir=cfg.paths.cache,
        runs_dir=Path(cfg.paths.runs),
        save_model=bool(cfg.save_model),
        force=bool(cfg.force),
    )


def run(cfg: DictConfig, out: Path) -> dict[str, Any]:
    """One job from a composed config; returns its metrics.json record."""
    return run_job(job_from_config(cfg), out)


def share_sweep_group(cfg: DictConfig) -> None:
    """The jobs of one multirun log into one W&B group, named after the sweep folder."""
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN and "group" in cfg.logger and cfg.logger.group is None:
        cfg.logger.group = "sweep-" + "-".join(Path(hydra_cfg.sweep.dir).parts[-2:])


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    out = Path(hydra_cfg.runtime.output_dir)
    console.configure(verbose=bool(cfg.verbose))
    share_sweep_group(cfg)
    try:
        run(cfg, out)
    except LayerpruneError as e:
        print(f"layerprune: error: {e}", file=sys.stderr)
        if hydra_cfg.mode == RunMode.MULTIRUN:
            raise  # Hydra marks the job failed, runs the rest and exits non-zero at the end
        sys.exit(2)
    log.info("results    %s", out)


def main() -> None:
    _hydra_main()
