from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from layerprune.errors import LayerpruneError
from layerprune.layers import decoder_stack
from layerprune.scoring import (
    Angular,
    BlockInfluence,
    Last,
    LayerStats,
    Random,
    Streamline,
    _unit,
    collect_layer_stats,
    layer_metric_definitions,
    layer_metrics,
)

from .conftest import TINY_MODELS, load


@torch.no_grad()
def naive_states(model, windows: torch.Tensor, post_norm_last: bool) -> list[torch.Tensor]:
    """h_0..h_L from HF's output_hidden_states; the pre-norm h_L by disabling the final norm."""
    hidden = model(input_ids=windows, output_hidden_states=True).hidden_states
    states = [h.double() for h in hidden]
    if not post_norm_last:
        stack = decoder_stack(model)
        norm = stack.norm
        stack.base.norm = nn.Identity()
        states[-1] = model(input_ids=windows, output_hidden_states=True).hidden_states[-1].double()
        stack.base.norm = norm
    return states


def naive_stats(states: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    size = len(states)
    cos = torch.zeros(size, size, dtype=torch.float64)
    ang = torch.zeros(size, size, dtype=torch.float64)
    n_windows = states[0].shape[0]
    for a in range(size):
        for b in range(size):
            c = torch.cosine_similarity(states[a], states[b], dim=-1)  # (N, T)
            cos[a, b] = c.mean()
            ang[a, b] = (
                sum(
                    math.acos(max(-1.0, min(1.0, float(c[w, -1])))) / math.pi
                    for w in range(n_windows)
                )
                / n_windows
            )
    return cos, ang


@pytest.mark.parametrize("name", TINY_MODELS)
@pytest.mark.parametrize("convention", ["residual", "hf_hidden_states"])
def test_one_pass_statistics_equal_naive_reference(name: str, convention: str) -> None:
    model = load(name).model
    windows = torch.randint(3, 250, (5, 20), generator=torch.Generator().manual_seed(1))
    stats = collect_layer_stats(model, windows, batch_size=2, convention=convention)  # 3 batches
    cos, ang = naive_stats(naive_states(model, windows, convention == "hf_hidden_states"))
    torch.testing.assert_close(stats.cosine, cos, atol=1e-5, rtol=0)
    torch.testing.assert_close(stats.angular, ang, atol=1e-4, rtol=0)
    assert (stats.n_tokens, stats.n_windows) == (100, 5)
    bi = [1 - float(cos[i, i + 1]) for i in range(stats.num_layers)]
    torch.testing.assert_close(
        stats.block_influence(), torch.tensor(bi, dtype=torch.float64), atol=1e-5, rtol=0
    )


def test_residual_and_hf_conventions_differ_only_in_the_last_state() -> None:
    model = load("tiny_llama").model
    windows = torch.randint(3, 250, (2, 16), generator=torch.Generator().manual_seed(2))
    a = collect_layer_stats(model, windows, convention="residual")
    b = collect_layer_stats(model, windows, convention="hf_hidden_states")
    torch.testing.assert_close(a.cosine[:-1, :-1], b.cosine[:-1, :-1])
    assert not torch.allclose(a.cosine[-1], b.cosine[-1], atol=1e-4)


def test_zero_states_give_zero_cosine_not_nan() -> None:
    unit = _unit([torch.zeros(1, 2, 4), torch.ones(1, 2, 4)])
    assert torch.isfinite(unit).all()
    assert float((unit[0] * unit[1]).sum()) == 0.0


def toy_stats() -> LayerStats:
    """4 layers; cos(h_a, h_b) = 1 - |a - b| * w for hand-picked per-layer changes."""
    step = [0.4, 0.05, 0.1, 0.3]  # layer i moves the residual by step[i]
    size = 5
    cos = torch.eye(size, dtype=torch.float64)
    for a in range(size):
        for b in range(a + 1, size):
            cos[a, b] = cos[b, a] = 1 - sum(step[a:b])
    ang = torch.arccos(cos.clamp(-1, 1)) / math.pi
    return LayerStats(cos, ang, n_tokens=10, n_windows=2, convention="residual")


def test_scorers_on_a_hand_computed_example() -> None:
    stats = toy_stats()
    torch.testing.assert_close(
        stats.block_influence(), torch.tensor([0.4, 0.05, 0.1, 0.3], dtype=torch.float64)
    )
    # Streamline, n=2: similarities (1 + cos) / 2 of blocks [0,1], [1,2], [2,3]
    torch.testing.assert_close(
        Streamline.similarity(stats, 2), torch.tensor([0.775, 0.925, 0.8], dtype=torch.float64)
    )
    assert int(Streamline().block_importance(stats, 2).argmin()) == 1
    assert int(Angular().block_importance(stats, 2).argmin()) == 1
    assert int(BlockInfluence().layer_importance(stats).argmin()) == 1
    assert Last().block_importance(stats, 2).tolist() == [1.0, 0.0, 1.0]
    assert Last().layer_importance(stats).tolist() == [3.0, 2.0, 1.0, 4.0]


def test_random_scorer_is_seeded() -> None:
    stats = toy_stats()
    assert torch.equal(
        Random(seed=3).layer_importance(stats), Random(seed=3).layer_importance(stats)
    )
    assert not torch.equal(
        Random(seed=3).layer_importance(stats), Random(seed=4).layer_importance(stats)
    )


def test_bad_selection_and_convention() -> None:
    with pytest.raises(
        LayerpruneError, match="unknown selection 'blocky'; allowed: independent, contiguous"
    ):
        BlockInfluence(selection="blocky")  # type: ignore[arg-type]
    with pytest.raises(LayerpruneError, match="unknown convention 'post'"):
        collect_layer_stats(
            load("tiny_llama").model, torch.zeros(1, 4, dtype=torch.long), convention="post"
        )  # type: ignore[arg-type]


def test_stats_round_trip_through_json() -> None:
    stats = toy_stats()
    again = LayerStats.from_dict(stats.to_dict())
    assert torch.equal(again.cosine, stats.cosine) and again.n_tokens == 10


def test_layer_metrics_on_the_hand_computed_example() -> None:
    stats = toy_stats()
    metrics = layer_metrics(stats, 2)
    assert list(metrics) == ["layer_metrics", "block_metrics"]
    layer, block = metrics["layer_metrics"], metrics["block_metrics"]
    assert list(layer) == ["block_influence", "streamline_similarity", "angular_distance"]
    assert list(block) == ["size", *layer]
    assert layer["block_influence"] == pytest.approx([0.4, 0.05, 0.1, 0.3])
    assert layer["streamline_similarity"] == pytest.approx([0.8, 0.975, 0.95, 0.85])
    assert layer["angular_distance"] == pytest.approx([math.acos(c) / math.pi
                                                       for c in (0.6, 0.95, 0.9, 0.7)])  # fmt: skip
    assert block["size"] == 2
    assert block["block_influence"] == pytest.approx([0.45, 0.15, 0.4])
    assert block["streamline_similarity"] == pytest.approx([0.775, 0.925, 0.8])
    assert block["angular_distance"] == pytest.approx([math.acos(c) / math.pi
                                                       for c in (0.55, 0.85, 0.6)])  # fmt: skip


def test_each_statistic_scorer_defines_its_metric() -> None:
    stats = toy_stats()
    assert [m.key for m in layer_metric_definitions()] == [
        "block_influence", "streamline_similarity", "angular_distance"]  # fmt: skip
    # Drawn as importance, every metric orders the layers as its scorer does.
    for scorer in (BlockInfluence(), Streamline(), Angular()):
        assert scorer.metric is not None
        drawn = scorer.metric.importance(scorer.metric.of_blocks(stats, 1).tolist())
        order = scorer.layer_importance(stats).argsort().tolist()
        assert sorted(range(len(drawn)), key=drawn.__getitem__) == order
    assert Random().metric is None and Last().metric is None


RUNS = Path(__file__).parents[1] / "results" / "runs"


@pytest.mark.skipif(not RUNS.is_dir(), reason="no committed results")
def test_layer_metrics_reproduce_the_committed_scores_files_exactly() -> None:
    """scores.json stays byte-identical: recomputed from its own matrices, the fields match."""
    paths = sorted(RUNS.glob("**/scores.json"))
    assert paths
    for path in paths[:: max(1, len(paths) // 8)]:
        scores = json.loads(path.read_text())
        stats = LayerStats(
            cosine=torch.tensor(scores["cosine_matrix"], dtype=torch.float64),
            angular=torch.tensor(scores["angular_matrix"], dtype=torch.float64),
            n_tokens=scores["n_tokens"],
            n_windows=scores["n_windows"],
            convention=scores["convention"],
        )
        metrics = layer_metrics(stats, scores["block_metrics"]["size"])
        expected = {k: scores[k] for k in ("layer_metrics", "block_metrics")}
        if "criterion" in scores:  # a model scorer's values join them; they are not statistics
            measured = scores["criterion"]
            assert expected["layer_metrics"].pop(measured["key"]) == measured["values"], path
        assert json.dumps(metrics) == json.dumps(expected), path
