from __future__ import annotations

import math

import pytest
import torch

from layerprune.errors import LayerpruneError
from layerprune.recovery import LayerReplacement, LinearReplacement, Recovery
from layerprune.scoring import Angular, BlockInfluence, Last, LayerStats, Streamline
from layerprune.selection import Sparsity, make_plan

from .test_scoring import toy_stats

LAYER_PARAMS = [10, 10, 10, 10]  # toy model: 4 layers of 10 params + 60 embedding params
TOTAL = 100


def test_independent_removes_the_lowest_block_influence() -> None:
    plan = make_plan(BlockInfluence(), toy_stats(), Sparsity(2, "layers"), LAYER_PARAMS, TOTAL)
    assert plan.removed_layers == [1, 2]  # BI = [0.4, 0.05, 0.1, 0.3]
    assert plan.kept_layers == [0, 3]
    assert plan.block is None


def test_contiguous_removes_the_most_similar_block() -> None:
    plan = make_plan(Streamline(), toy_stats(), Sparsity(0.5), LAYER_PARAMS, TOTAL)
    assert plan.removed_layers == [1, 2] and plan.block == {"start": 1, "size": 2}
    d = plan.to_dict()
    assert (d["params_before"], d["params_after"], d["params_removed"]) == (100, 80, 20)
    assert d["removed_param_ratio"] == pytest.approx(0.2)
    assert d["removed_layer_ratio"] == pytest.approx(0.5)
    assert d["num_layers_after"] == 2


def test_block_influence_can_select_a_block() -> None:
    plan = make_plan(
        BlockInfluence("contiguous"), toy_stats(), Sparsity(3, "layers"), LAYER_PARAMS, TOTAL
    )
    # 1 - cos over 3 layers: start 0 -> 0.55, start 1 -> 0.45
    assert plan.removed_layers == [1, 2, 3]


@pytest.mark.parametrize(
    ("sparsity", "expected"),
    [
        (Sparsity(1, "layers"), 1),
        (Sparsity(0.25, "layer_ratio"), 1),
        (Sparsity(0.6, "layer_ratio"), 2),  # 2.4 layers -> 2
        (Sparsity(0.3, "param_ratio"), 3),  # 30 params / 10 per layer
        (Sparsity(0.14, "param_ratio"), 1),  # 1.4 layers -> 1
    ],
)
def test_sparsity_units(sparsity: Sparsity, expected: int) -> None:
    assert sparsity.num_layers_to_remove(LAYER_PARAMS, TOTAL) == expected


def test_last_keeps_the_final_layer() -> None:
    plan = make_plan(Last(), toy_stats(), Sparsity(2, "layers"), LAYER_PARAMS, TOTAL)
    assert plan.removed_layers == [1, 2]
    plan = make_plan(Last("independent"), toy_stats(), Sparsity(2, "layers"), LAYER_PARAMS, TOTAL)
    assert plan.removed_layers == [1, 2]


@pytest.mark.parametrize(
    ("amount", "unit", "message"),
    [
        (0, "layer_ratio", "sparsity must be > 0; got 0"),
        (-0.1, "layer_ratio", "sparsity must be > 0"),
        (1.0, "layer_ratio", "must be in \\(0, 1\\)"),
        (2.5, "layers", "whole number"),
        (
            0.2,
            "percent",
            "unknown sparsity unit 'percent'; allowed: layers, layer_ratio, param_ratio",
        ),
    ],
)
def test_bad_sparsity(amount: float, unit: str, message: str) -> None:
    with pytest.raises(LayerpruneError, match=message):
        Sparsity(amount, unit)


@pytest.mark.parametrize(
    ("sparsity", "message"),
    [
        (Sparsity(4, "layers"), "removes 4 of 4 layers"),
        (Sparsity(0.1, "layer_ratio"), "removes no layer"),
    ],
)
def test_sparsity_that_removes_all_or_nothing(sparsity: Sparsity, message: str) -> None:
    with pytest.raises(LayerpruneError, match=message):
        sparsity.num_layers_to_remove(LAYER_PARAMS, TOTAL)


def test_a_replacement_layer_grows_the_block_so_the_net_removal_meets_the_target() -> None:
    # 0.2 of 100 params = 2 layers of 10 net; one layer comes back, so the block is 3 layers
    plan = make_plan(
        Streamline(), toy_stats(), Sparsity(0.2, "param_ratio"), LAYER_PARAMS, TOTAL, 1
    )
    assert plan.removed_layers == [1, 2, 3] and plan.layers_added == 1
    d = plan.to_dict()
    assert d["num_layers_after"] == 2 and d["removed_layer_ratio"] == pytest.approx(0.5)
    with pytest.raises(LayerpruneError, match="needs a block of 4 of 4 layers"):
        make_plan(Streamline(), toy_stats(), Sparsity(3, "layers"), LAYER_PARAMS, TOTAL, 1)


def test_a_block_for_the_linear_fold_never_starts_at_layer_0() -> None:
    # layers 0 and 1 barely move the residual: the most similar block of 2 starts at 0, which
    # the fold cannot take (no layer before it); ReplaceMe never considers that start
    step = [0.01, 0.02, 0.4, 0.3]
    cos = torch.eye(5, dtype=torch.float64)
    for a in range(5):
        for b in range(a + 1, 5):
            cos[a, b] = cos[b, a] = 1 - sum(step[a:b])
    stats = LayerStats(cos, torch.arccos(cos) / math.pi, 10, 2, "residual")
    sparsity = Sparsity(2, "layers")
    assert make_plan(Angular(), stats, sparsity, LAYER_PARAMS, TOTAL).removed_layers == [0, 1]
    first_start = Recovery({"linear": LinearReplacement()}, None).first_start
    assert first_start == 1 and Recovery({"replace": LayerReplacement()}, None).first_start == 0
    plan = make_plan(Angular(), stats, sparsity, LAYER_PARAMS, TOTAL, 0, first_start)
    assert plan.removed_layers == [1, 2] and plan.block == {"start": 1, "size": 2}
    plan = make_plan(Angular(), stats, Sparsity(3, "layers"), LAYER_PARAMS, TOTAL, 0, 1)
    assert plan.removed_layers == [1, 2, 3]  # the largest block still has a start to take
