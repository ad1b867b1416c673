"""Figures of layer importance, drawn from the statistics alone."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from layerprune.files import atomic_write
from layerprune.scoring import LayerStats, layer_metric_definitions

MARKERS = ("o", "^", "s", "D", "v", "P")


def draw_metrics(ax: Any, recorded: Mapping[str, Sequence[float]]) -> None:
    """Every scorer's metric found in ``recorded`` (keyed as in scores.json), drawn as
    importance (low = prune) against the layer (or block start); the curves, labels and markers
    follow the scorers' metric definitions, so a new scorer's metric shows without touching
    the figures."""
    present = [m for m in layer_metric_definitions() if m.key in recorded]
    for metric, marker in zip(present, MARKERS, strict=False):
        ax.plot(metric.importance(recorded[metric.key]), marker=marker, label=metric.label)
    ax.legend(fontsize=8)


def plot_importance(
    stats: LayerStats, path: str | Path, title: str, block_size: int, removed: list[int]
) -> Path:
    """Per-layer scores (left) and block scores for the chosen block size (right)."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4), constrained_layout=True)
    definitions = layer_metric_definitions()
    per_layer = {m.key: m.of_blocks(stats, 1).tolist() for m in definitions}
    draw_metrics(ax1, per_layer)
    for i in removed:
        ax1.axvspan(i - 0.5, i + 0.5, color="grey", alpha=0.15, lw=0)
    ax1.set(xlabel="layer", ylabel="importance (low = prune)", title="per-layer importance")
    per_block = {m.key: m.of_blocks(stats, block_size).tolist() for m in definitions}
    draw_metrics(ax2, per_block)
    ax2.set(xlabel="block start", title=f"blocks of {block_size} layers")
    fig.suptitle(title)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return Path(path)
