"""From importances and a sparsity target to a pruning plan.

``independent`` removes the k least important single layers (ShortGPT); ``contiguous`` removes
the least important block of k consecutive layers (LLM-Streamline, Gromov et al.). Sparsity is a
number of layers, a ratio of layers, or a ratio of all model parameters (embeddings included),
rounded to the nearest whole number of layers. A statistic scorer's choice is read from the
:class:`~layerprune.scoring.LayerStats`; a model scorer's from the
:class:`~layerprune.criteria.CriterionScores` it measured.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from layerprune.criteria import CriterionScores, ModelScorer
from layerprune.errors import LayerpruneError
from layerprune.scoring import LayerStats, Scorer, StatisticScorer

UNITS = ("layers", "layer_ratio", "param_ratio")


@dataclass(frozen=True)
class Sparsity:
    amount: float
    unit: str = "layer_ratio"

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise LayerpruneError(
                f"unknown sparsity unit '{self.unit}'; allowed: {', '.join(UNITS)}"
            )
        if not self.amount > 0:
            raise LayerpruneError(f"sparsity must be > 0; got {self.amount}")
        if self.unit == "layers" and self.amount != int(self.amount):
            raise LayerpruneError(f"sparsity in layers must be a whole number; got {self.amount}")
        if self.unit != "layers" and self.amount >= 1:
            raise LayerpruneError(
                f"sparsity as a {self.unit} must be in (0, 1); got {self.amount} "
                "(use sparsity_unit=layers for a number of layers)"
            )

    def num_layers_to_remove(self, layer_params: list[int], total_params: int) -> int:
        num = len(layer_params)
        if self.unit == "layers":
            k = int(self.amount)
        elif self.unit == "layer_ratio":
            k = math.floor(self.amount * num + 0.5)
        else:
            k = math.floor(self.amount * total_params / (sum(layer_params) / num) + 0.5)
        if k < 1:
            raise LayerpruneError(f"sparsity {self.amount} ({self.unit}) removes no layer of {num}")
        if k >= num:
            raise LayerpruneError(
                f"sparsity {self.amount} ({self.unit}) removes {k} of {num} layers; "
                "keep at least one"
            )
        return k


@dataclass
class Plan:
    """What to remove and what it costs, in layers and in parameters."""

    scorer: str
    selection: str
    sparsity: dict[str, Any]
    num_layers: int
    removed_layers: list[int]
    kept_layers: list[int]
    block: dict[str, int] | None
    params_before: int
    params_after: int
    importance: list[float]
    layers_added: int = 0  # modules a recovery puts back in place of the block (LLM-Streamline)
    first_start: int = 0  # the earliest layer the contiguous block could start at

    @property
    def params_removed(self) -> int:
        return self.params_before - self.params_after

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "num_layers_removed": len(self.removed_layers),
            "num_layers_after": len(self.kept_layers) + self.layers_added,
            "removed_layer_ratio": (len(self.removed_layers) - self.layers_added) / self.num_layers,
            "params_removed": self.params_removed,
            "removed_param_ratio": self.params_removed / self.params_before,
        }


Evidence = LayerStats | CriterionScores  # what a plan is read from


def select_layers(
    scorer: Scorer, evidence: Evidence, k: int, first_start: int = 0
) -> tuple[list[int], list[float]]:
    """The k layers to remove, and the importances the choice was read from; a contiguous
    block starts at layer ``first_start`` or later (the linear fold needs a layer before it)."""
    if isinstance(scorer, ModelScorer) != isinstance(evidence, CriterionScores):
        needs = "CriterionScores" if isinstance(scorer, ModelScorer) else "LayerStats"
        raise LayerpruneError(
            f"scorer '{scorer.name}' reads {needs}; got {type(evidence).__name__}"
        )
    if isinstance(evidence, CriterionScores):
        return evidence.choose(k)
    assert isinstance(scorer, StatisticScorer)
    stats = evidence
    if scorer.selection == "independent":
        imp = scorer.layer_importance(stats)
        order = sorted(range(len(imp)), key=lambda i: (float(imp[i]), i))
        return sorted(order[:k]), imp.tolist()
    imp = scorer.block_importance(stats, k)
    starts = range(first_start, len(imp))
    if not starts:
        raise LayerpruneError(
            f"a block of {k} of {evidence.num_layers} layers starting at layer {first_start} or "
            f"later does not fit; allowed: at most {evidence.num_layers - first_start} layers"
        )
    start = min(starts, key=lambda j: (float(imp[j]), j))
    return list(range(start, start + k)), imp.tolist()


def make_plan(
    scorer: Scorer,
    evidence: Evidence,
    sparsity: Sparsity,
    layer_params: list[int],
    total_params: int,
    layers_added: int = 0,
    first_start: int = 0,
) -> Plan:
    """``layers_added`` modules will replace the removed block: the sparsity target counts the
    NET removal, so the block is that much larger (LLM-Streamline replaces n+1 layers by one).
    ``first_start``: the earliest layer a contiguous block may start at (1 for the linear
    fold, which needs the layer before the block; ReplaceMe never considers block start 0)."""
    num = evidence.num_layers
    if len(layer_params) != num:
        raise LayerpruneError(f"scores cover {num} layers but the model has {len(layer_params)}")
    k = sparsity.num_layers_to_remove(layer_params, total_params) + layers_added
    if k >= num:
        raise LayerpruneError(
            f"sparsity {sparsity.amount} ({sparsity.unit}) with {layers_added} replacement "
            f"layer(s) needs a block of {k} of {num} layers; keep at least one"
        )
    removed, importance = select_layers(scorer, evidence, k, first_start)
    block = {"start": removed[0], "size": k} if scorer.selection == "contiguous" else None
    return Plan(
        scorer=scorer.name,
        selection=scorer.selection,
        sparsity=asdict(sparsity),
        num_layers=num,
        removed_layers=removed,
        kept_layers=[i for i in range(num) if i not in removed],
        block=block,
        params_before=total_params,
        params_after=total_params - sum(layer_params[i] for i in removed),
        importance=importance,
        layers_added=layers_added,
        first_start=first_start,
    )
