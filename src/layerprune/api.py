"""The Python API: prune a model in a few calls, without Hydra.

    import layerprune as lp

    model = lp.load("path/to/model")                        # a folder or a hub id
    windows = lp.windows(model, "wiki.txt", n=64, seq_len=512)
    stats = lp.score(model, windows)                        # one pass; every scorer reads it
    plan = lp.plan(model, stats, lp.BlockInfluence(), sparsity=0.25)
    lp.prune(model, plan)
    lp.save(model, "pruned", plan)

Criteria that measure the model's loss (``lp.SLEB()``, ``lp.PPLCriterion()``,
``lp.TaylorPlus()``) are not read from the statistics: :func:`measure` gives their scores,
and :func:`plan` reads those in place of ``stats``.

Recovery steps are objects (``lp.LayerReplacement``, ``lp.LinearReplacement``,
``lp.LoraHealing``) given to :func:`recover` in place of :func:`prune`; :func:`evaluate` runs
an lm-eval suite. The command line composes exactly these pieces.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from layerprune.calibration import TextFile
from layerprune.criteria import CriterionScores, ModelScorer
from layerprune.export import save_checkpoint
from layerprune.files import cache_root
from layerprune.layers import layer_param_counts, param_count
from layerprune.models import LoadedModel, from_pretrained
from layerprune.recovery import Recovery
from layerprune.scoring import Convention, LayerStats, Scorer, collect_layer_stats
from layerprune.selection import Plan, Sparsity, make_plan
from layerprune.surgery import remove_layers

if TYPE_CHECKING:
    from layerprune.evaluation import EvalSuite, Evaluation


def load(
    path: str, dtype: str = "auto", device: str = "auto", name: str | None = None
) -> LoadedModel:
    """A model folder written by ``save_pretrained``, or a hub id (when the hub is reachable)."""
    return from_pretrained(name or Path(path).name, path, dtype=dtype, device=device)


def windows(
    model: LoadedModel, path: str | Path, n: int = 64, seq_len: int = 512, seed: int = 0
) -> torch.Tensor:
    """``n`` seeded windows of ``seq_len`` tokens (BOS first) from a text file."""
    return TextFile(n=n, seq_len=seq_len, seed=seed, path=str(path)).windows(model.tokenizer)


def score(
    model: LoadedModel,
    windows: torch.Tensor,
    batch_size: int = 8,
    convention: Convention = "residual",
) -> LayerStats:
    """The layer statistics every scorer, block size and sparsity is read from (one pass)."""
    return collect_layer_stats(model.model, windows, batch_size, convention)


def measure(
    model: LoadedModel,
    windows: torch.Tensor,
    scorer: ModelScorer,
    sparsity: float,
    unit: str = "layer_ratio",
    layers_added: int = 0,
    batch_size: int = 8,
) -> CriterionScores:
    """What a criterion that measures the model (SLEB, PPL, Taylor+) finds on ``windows``, for
    a plan removing ``sparsity`` in ``unit``: give it to :func:`plan` as its ``stats``."""
    m = model.model
    k = Sparsity(sparsity, unit).num_layers_to_remove(layer_param_counts(m), param_count(m))
    return scorer.measure(m, windows, k + layers_added, batch_size)


def plan(
    model: LoadedModel,
    stats: LayerStats | CriterionScores,
    scorer: Scorer,
    sparsity: float,
    unit: str = "layer_ratio",
    layers_added: int = 0,
    first_start: int = 0,
) -> Plan:
    """What to remove for ``sparsity`` in ``unit`` (layers, layer_ratio or param_ratio), with
    parameter counts read from the model; ``stats`` is :func:`measure`'s result for a criterion
    that measures the model. ``layers_added``: layers a recovery puts back (the
    sparsity then counts the net removal), e.g. ``lp.LayerReplacement().layers_added``.
    ``first_start``: the earliest layer a contiguous block may start at, e.g.
    ``lp.LinearReplacement.first_start`` (1: the fold needs the layer before the block)."""
    return make_plan(
        scorer,
        stats,
        Sparsity(sparsity, unit),
        layer_param_counts(model.model),
        param_count(model.model),
        layers_added,
        first_start,
    )


def prune(model: LoadedModel, plan: Plan) -> None:
    """Remove the planned layers in place; the model stays a standard checkpoint."""
    remove_layers(model.model, plan.removed_layers)


def recover(
    model: LoadedModel, plan: Plan, steps: Sequence[Any], windows: torch.Tensor
) -> list[dict[str, Any]]:
    """Prune and recover with ``steps`` trained on ``windows``; returns one report per step.

    Steps that replace the block get the dense model and prune it themselves, so call this
    instead of :func:`prune`. Make the plan with ``layers_added`` of the steps.
    """
    return Recovery(steps=list(steps), train_data=None).apply(model, plan.removed_layers, windows)


def evaluate(model: LoadedModel, suite: EvalSuite, mirror: str | Path | None = None) -> Evaluation:
    """lm-eval's metrics, per-document samples and perplexity of ``model`` on ``suite``;
    ``mirror`` is an offline data folder (None: the Hugging Face hub). Imports lm-eval."""
    from layerprune.evaluation import evaluate as evaluate_suite
    from layerprune.evaluation import prepare

    return evaluate_suite(model, suite, prepare(suite, mirror, cache_root() / "tasks"))


def save(
    model: LoadedModel,
    path: str | Path,
    plan: Plan,
    recovery: Sequence[dict[str, Any]] = (),
    calibration: TextFile | None = None,
) -> Path:
    """A checkpoint that loads with ``AutoModelForCausalLM.from_pretrained`` and records its
    recipe in ``config.json`` and a model card."""
    return save_checkpoint(model, Path(path), plan, calibration, list(recovery))
