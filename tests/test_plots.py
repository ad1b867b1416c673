"""The importance figures draw each scorer's metric, oriented as importance (low = prune)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pytest
import torch

from layerprune.plots import draw_metrics, plot_importance
from layerprune.scoring import LayerStats


def test_each_recorded_metric_is_one_curve_of_importance() -> None:
    fig, ax = plt.subplots()
    recorded = {"angular_distance": [0.3, 0.4], "streamline_similarity": [0.9, 0.7],
                "block_influence": [0.1, 0.2], "not_a_metric": [5.0, 6.0]}  # fmt: skip
    draw_metrics(ax, recorded)
    curves = {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}
    plt.close(fig)
    labels = ["block influence (ShortGPT)", "1 - Streamline similarity",
              "angular distance (Gromov)"]  # fmt: skip
    assert list(curves) == labels  # in scores.json's order, whatever the recorded order
    assert curves["block influence (ShortGPT)"] == [0.1, 0.2]
    assert curves["1 - Streamline similarity"] == pytest.approx([0.1, 0.3])  # similarity flipped
    assert curves["angular distance (Gromov)"] == [0.3, 0.4]


def test_the_run_figure_is_written(tmp_path: Path) -> None:
    cos = torch.tensor([[1.0 - abs(i - j) / 8 for j in range(5)] for i in range(5)])
    stats = LayerStats(cos.double(), torch.arccos(cos).double() / torch.pi, 40, 4, "residual")
    path = plot_importance(stats, tmp_path / "importance.png", "tiny", 2, [1, 2])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
