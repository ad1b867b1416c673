"""The Hydra app: compose a config, turn it into a :class:`~layerprune.pipeline.Job`, run it in
Hydra's run folder. Everything else lives in the library; this module only composes.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import shutil
import sys
import tempfile
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from layerprune import console
from layerprune.cache import warn_unwritable
from layerprune.errors import LayerpruneError
from layerprune.files import cache_root
from layerprune.pipeline import Evaluator, Job, NoEvaluator, ScoringSettings
from layerprune.pipeline import run as run_job
from layerprune.recovery import Recovery
from layerprune.selection import Sparsity
from layerprune.speed import SpeedSettings
from layerprune.validation import check_config, check_job, check_jsonl, invalid, is_int

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
OmegaConf.register_new_resolver("lp_pid", os.getpid, replace=True)  # unique run folder names

NAME_BYTES = 240  # a job folder's name; file systems refuse names over 255 bytes


def job_dirname(overrides: str, limit: int = NAME_BYTES) -> str:
    """A multirun job's folder name from its overrides, cut to ``limit`` bytes with a digest of
    the whole, so that long overrides neither fail the job nor make two folders alike."""
    if len(overrides.encode()) <= limit:
        return overrides
    digest = hashlib.blake2b(overrides.encode(), digest_size=4).hexdigest()
    head = overrides.encode()[: limit - len(digest) - 1].decode(errors="ignore")
    return f"{head}-{digest}"


OmegaConf.register_new_resolver("lp_dirname", job_dirname, replace=True)


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

    suite = build(cfg.eval)
    try:
        evaluator = LmEvalEvaluator(suite, cfg.data.mirror, cfg.paths.cache)
    except OSError as e:  # the task YAMLs cannot be written into the cache: a private one
        warn_unwritable(str(cache_root(cfg.paths.cache) / "tasks"), e)
        private = tempfile.mkdtemp(prefix="layerprune-cache-")
        atexit.register(shutil.rmtree, private, True)
        evaluator = LmEvalEvaluator(suite, cfg.data.mirror, private)
    if (mirror := evaluator.source.mirror) is not None:  # the files lm-eval will read
        for leaf in evaluator.source.leaves:
            for split in {leaf.eval_split, leaf.fewshot_split if suite.num_fewshot else None}:
                path = leaf.mirror_dir(mirror) / f"{split}.jsonl"
                if split and path.is_file():
                    check_jsonl("data.mirror", path, leaf.name, leaf.fields)
    return evaluator


def window_lengths(cfg: DictConfig) -> dict[str, int]:
    """Window lengths the loaded model must accept, by config key (checked after loading)."""
    lengths = {"calibration.seq_len": int(cfg.calibration.seq_len)}
    if cfg.recovery.get("steps") and cfg.recovery.get("train_data"):
        lengths["recovery.train_data.seq_len"] = int(cfg.recovery.train_data.seq_len)
    texts = cfg.eval.get("perplexity") if cfg.get("eval") else None
    if isinstance(texts, ListConfig):  # several perplexity texts
        lengths.update(
            {f"eval.perplexity.{i}.seq_len": int(t.seq_len) for i, t in enumerate(texts)}
        )
    elif texts:
        lengths["eval.perplexity.seq_len"] = int(texts.seq_len)
    return lengths


def job_from_config(cfg: DictConfig) -> Job:
    """Every object the run needs, built (and so checked) before any model is loaded; the
    evaluator is built by the run itself, once it knows the job is not already finished."""
    scorer = build(cfg.scorer)
    steps = build(cfg.recovery.steps) if cfg.recovery.get("steps") else {}
    train = cfg.recovery.get("train_data")  # read only when a step trains on it
    recovery = Recovery(steps, build(train) if steps and train else None, cfg.paths.cache)
    check_job(recovery, scorer)
    config = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(config, dict)
    return Job(
        load_model=build(cfg.model, partial=True),
        calibration=build(cfg.calibration),
        scorer=scorer,
        sparsity=Sparsity(float(cfg.sparsity), str(cfg.sparsity_unit)),
        recovery=recovery,
        make_evaluator=partial(evaluator_for, cfg),
        tracker=build(cfg.logger),
        config={str(k): v for k, v in config.items()},
        scoring=ScoringSettings(**cfg.scoring),
        speed=SpeedSettings(**cfg.speed, seed=int(cfg.seed)),
        cache_dir=cfg.paths.cache,
        runs_dir=Path(cfg.paths.runs),
        save_model=bool(cfg.save_model),
        force=bool(cfg.force),
        window_lengths=window_lengths(cfg),
        first_start=int(cfg.get("first_start", 0)),
    )


@contextmanager
def user_errors() -> Iterator[None]:
    """Environment problems become one-line errors naming the path: I/O errors on the run,
    cache or data folders (read-only, full disk, a file where a folder should be), a config
    value that does not resolve, a data mirror file that is not the JSON lm-eval expects."""
    try:
        yield
    except OSError as e:
        where = e.filename or "a file or folder"
        raise LayerpruneError(
            f"{where}: {e.strerror or e}; allowed: a readable and writable path "
            "(check permissions, free space, and that its parent is a folder)"
        ) from e
    except OmegaConfBaseException as e:
        raise LayerpruneError(f"{str(e).splitlines()[0]}; allowed: a complete config") from e


def run(cfg: DictConfig, out: Path) -> dict[str, Any]:
    """One job from a composed config; returns its metrics.json record. Every value the config
    decides is checked before any object is built or any model loaded."""
    with user_errors():
        if cfg.get("search"):  # experiment=search: its settings first, the sparsity reads them
            from layerprune.search_app import check_search_config, run_search

            check_search_config(cfg)
        plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
        assert isinstance(plain, dict)
        check_config({str(k): v for k, v in plain.items()})
        if plain.get("search"):
            return run_search(cfg, out)
        return run_job(job_from_config(cfg), out)


def share_sweep_group(cfg: DictConfig) -> None:
    """The jobs of one multirun log into one W&B group, named after the sweep folder."""
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN and "group" in cfg.logger and cfg.logger.group is None:
        cfg.logger.group = "sweep-" + "-".join(Path(hydra_cfg.sweep.dir).parts[-2:])


def limit_threads(launcher: Any) -> None:
    """A job of the submitit launchers runs beside other jobs on the same machine (the local
    launcher starts every job of a sweep at once): torch's default of one thread per core gives
    each of them every core, and their OpenMP threads, spinning against each other, slow every
    job severalfold (benchmarks/concurrent_jobs.py). Such a job runs on the launcher's
    ``cpus_per_task`` threads; Hydra's basic launcher, one job at a time, keeps torch's default.
    """
    cpus = launcher.get("cpus_per_task") if isinstance(launcher, DictConfig) else None
    if cpus is None:
        return
    if not is_int(cpus) or cpus < 1:
        raise invalid("hydra.launcher.cpus_per_task", cpus, "a whole number of threads, >= 1")
    torch.set_num_threads(cpus)


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    out = Path(hydra_cfg.runtime.output_dir)
    console.configure(verbose=bool(cfg.verbose))
    share_sweep_group(cfg)
    try:
        limit_threads(hydra_cfg.launcher)
        run(cfg, out)
    except LayerpruneError as e:
        if cfg.get("debug"):
            traceback.print_exc()
        print(f"layerprune: error: {e}", file=sys.stderr)
        if hydra_cfg.mode == RunMode.MULTIRUN:
            raise  # Hydra marks the job failed, runs the rest and exits non-zero at the end
        sys.exit(2)
    if holds_no_results(out):  # a skipped job: its finished run's folder has the results
        shutil.rmtree(out)
    else:
        log.info("results    %s", out)


def holds_no_results(out: Path) -> bool:
    """Hydra makes the run folder, with its config copy and log, before the job starts; a job
    skipped for a finished run of its config adds nothing to it, and the folder would only
    clutter the sweep."""
    return out.is_dir() and all(p.name == ".hydra" or p.suffix == ".log" for p in out.iterdir())


def check_output_folders(args: list[str]) -> None:
    """Hydra creates the run folder before the job starts, and reports a failure with a
    traceback: create the folders the command line names (``paths.runs``, ``hydra.run.dir``,
    ``hydra.sweep.dir``) first, and fail in one line."""
    given = dict(a.split("=", 1) for a in args if "=" in a and not a.startswith("-"))
    keys = ("paths.runs", "hydra.run.dir", "hydra.sweep.dir")
    folders = {k: given[k] for k in keys if k in given and "${" not in given[k]}
    for key, folder in folders.items():
        try:
            Path(folder).expanduser().mkdir(parents=True, exist_ok=True)
        except OSError as e:
            print(
                f"layerprune: error: {key}: {folder} ({e.filename}: {e.strerror}); allowed: a "
                "folder that can be created and written",
                file=sys.stderr,
            )
            sys.exit(2)


def main() -> None:
    check_output_folders(sys.argv[1:])
    _hydra_main()
