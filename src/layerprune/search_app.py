"""``layerprune experiment=search``: the budgeted search of :mod:`layerprune.search`, composed
from the config. The proposers are options of ``conf/scorer`` named in ``search.scorers``,
each with every selection of ``search.selections`` it supports, its settings overridden by
``search.settings.<name>``; ``random`` once per seed of ``search.random_seeds``. Every value is
checked before the model is loaded.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from layerprune.app import CONF_DIR, build, job_from_config
from layerprune.criteria import ModelScorer
from layerprune.files import write_json
from layerprune.pipeline import NoEvaluator
from layerprune.resources import Timer, reset_peak_memory, resource_use
from layerprune.scoring import SELECTIONS, Scorer
from layerprune.search import EVALUATE, SearchSettings, search, search_record
from layerprune.search_report import render
from layerprune.selection import Sparsity
from layerprune.validation import (
    MISSING,
    Config,
    check_model_scorer,
    choice,
    get,
    integer,
    invalid,
    is_int,
    is_number,
)

log = logging.getLogger("layerprune")


def scorer_options() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "scorer").glob("*.yaml"))


def check_search(cfg: Config) -> None:
    """The search's own settings, before any model work."""
    budgets = get(cfg, "search.budgets")
    if not isinstance(budgets, list) or not budgets:
        raise invalid("search.budgets", budgets, "a non-empty list of sparsities")
    unit = str(get(cfg, "sparsity_unit"))
    for budget in budgets:
        layers = unit == "layers"
        ok = is_number(budget) and (
            (budget >= 1 and float(budget).is_integer()) if layers else 0 < budget < 1
        )
        if not ok:
            allowed = "whole numbers of layers >= 1" if layers else f"numbers in (0, 1) as {unit}"
            raise invalid("search.budgets", budgets, f"{allowed} (sparsity_unit={unit})")
    scorers = get(cfg, "search.scorers")
    options = scorer_options()
    if not isinstance(scorers, list) or not scorers or any(s not in options for s in scorers):
        raise invalid("search.scorers", scorers, f"a non-empty list of {', '.join(options)}")
    selections = get(cfg, "search.selections")
    if not isinstance(selections, list) or not selections or set(selections) - set(SELECTIONS):
        raise invalid("search.selections", selections, f"a non-empty list of {SELECTIONS}")
    seeds = get(cfg, "search.random_seeds")
    if not isinstance(seeds, list) or any(not is_int(s) or s < 0 for s in seeds):
        raise invalid("search.random_seeds", seeds, "a list of integers >= 0")
    for key, low in (("heldout", 1), ("top_k", 1), ("prefill_repeats", 1)):
        integer(cfg, f"search.{key}", low)
    choice(cfg, "search.evaluate", EVALUATE)
    also = get(cfg, "search.also_evaluate")
    if also is not MISSING and (
        not isinstance(also, list) or any(not isinstance(a, str) for a in also)
    ):
        raise invalid("search.also_evaluate", also, "a list of proposer labels (scorer/selection)")
    settings = get(cfg, "search.settings")
    if settings is not MISSING and (
        not isinstance(settings, dict) or any(k not in scorers for k in settings)
    ):
        raise invalid("search.settings", settings, "a mapping {scorer of search.scorers: "
                      "{setting: value}}")  # fmt: skip
    for name, values in (settings if isinstance(settings, dict) else {}).items():
        check_scorer_settings(name, values)


# set for every proposer by the search itself, not by search.settings
SET_BY_SEARCH = {"selection": "search.selections", "seed": "search.random_seeds"}


def check_scorer_settings(name: str, values: Any) -> None:
    """``search.settings.<name>``: fields of the scorer option, and the option with them
    merged holds values its scorer accepts."""
    key = f"search.settings.{name}"
    node = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "scorer" / f"{name}.yaml"))
    assert isinstance(node, dict)
    fields = [str(f) for f in node if f != "_target_" and f not in SET_BY_SEARCH]
    if not isinstance(values, dict):
        raise invalid(key, values, f"a mapping {{setting: value}} of {', '.join(fields) or 'no'} "
                      f"setting(s) of scorer {name}")  # fmt: skip
    for field, value in values.items():
        if field in SET_BY_SEARCH and field in node:
            raise invalid(f"{key}.{field}", value, f"not set here: {SET_BY_SEARCH[field]} "
                          f"sets the {field} of every {name} proposer")  # fmt: skip
        if field not in fields:
            allowed = f"one of {', '.join(fields)}" if fields else "none"
            raise invalid(f"{key}.{field}", value, f"a setting of scorer {name}: {allowed}")
    merged = {k: v for k, v in node.items() if k not in SET_BY_SEARCH} | values
    check_model_scorer({"search": {"settings": {name: merged}}}, key)


def check_search_config(cfg: DictConfig) -> None:
    """:func:`check_search` on the composed config (before the rest is resolved)."""
    search = OmegaConf.to_container(cfg.search, resolve=True)
    check_search({"search": search, "sparsity_unit": cfg.get("sparsity_unit")})


def proposers(cfg: DictConfig) -> list[tuple[str, Scorer]]:
    """(label, scorer) for every named scorer option and selection it supports; ``random``
    once per seed."""
    found: list[tuple[str, Scorer]] = []
    for name in cfg.search.scorers:
        node = OmegaConf.load(CONF_DIR / "scorer" / f"{name}.yaml")
        assert isinstance(node, DictConfig)
        node.merge_with(cfg.search.get("settings", {}).get(name, {}))
        seeds = list(cfg.search.random_seeds) if "seed" in node else [None]
        for selection in cfg.search.selections:
            for seed in seeds:
                node.selection = selection
                if seed is not None:
                    node.seed = seed
                cls = get_class(str(node._target_))
                if issubclass(cls, ModelScorer) and selection not in cls.selections:
                    continue
                label = f"{name}/{selection}" + ("" if seed is None else f"/seed{seed}")
                found.append((label, build(node)))
    return found


def run_search(cfg: DictConfig, out: Path) -> dict[str, Any]:
    """The search for every budget of ``search.budgets``; writes search.json, search.md and
    search.png into ``out`` and returns the record."""
    check_search_config(cfg)
    job = job_from_config(cfg)
    found = proposers(cfg)
    also = list(cfg.search.get("also_evaluate") or [])
    labels = [label for label, _ in found]
    if unknown := [a for a in also if a not in labels]:
        raise invalid("search.also_evaluate", unknown, f"labels of this search's proposers: "
                      f"{', '.join(labels)}")  # fmt: skip
    settings = SearchSettings(
        budgets=tuple(float(b) for b in cfg.search.budgets),
        unit=str(cfg.sparsity_unit),
        heldout=int(cfg.search.heldout),
        top_k=int(cfg.search.top_k),
        prefill_repeats=int(cfg.search.prefill_repeats),
        evaluate=str(cfg.search.evaluate),
        also_evaluate=tuple(also),
    )
    from layerprune.validation import check_model

    evaluator = job.make_evaluator()
    timer = Timer()
    reset_peak_memory()
    loaded = job.load_model()
    for budget in settings.budgets:
        check_model(loaded, Sparsity(budget, settings.unit), job.recovery, job.lengths())
    if not isinstance(evaluator, NoEvaluator):
        with timer.stage("evaluate_dense"):
            evaluator.dense(loaded)
    with timer.stage("search"):
        results = search(
            loaded, job.calibration, found, settings, evaluator, out, job.scoring, job.cache_dir
        )
    record = search_record(loaded, results, job.config)
    record |= resource_use(timer)
    write_json(out / "search.json", record)
    log.info("%s", render(record, out))
    return record
