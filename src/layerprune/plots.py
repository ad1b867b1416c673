"""Figures of layer importance, drawn from the statistics and what a model scorer measured."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from layerprune.criteria import CriterionScores
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


def draw_criterion(ax: Any, measured: CriterionScores, removed: list[int]) -> None:
    """A model scorer's measured values on their own axis (log where they span decades, as
    perplexities do), and the removal order written above each removed layer."""
    twin = ax.twinx()
    values = [math.nan if v is None else v for v in measured.values]
    twin.plot(values, color="black", marker="x", linestyle="--", label=measured.label)
    finite = [v for v in values if math.isfinite(v)]
    if finite and min(finite) > 0 and max(finite) > 10 * min(finite):
        twin.set_yscale("log")
    twin.set_ylabel(f"{measured.criterion} (low = prune)")
    twin.legend(fontsize=8, loc="upper left")
    for rank, layer in enumerate(layer for layer in measured.order if layer in removed):
        ax.text(layer, 0.02, f"#{rank + 1}", transform=ax.get_xaxis_transform(), ha="center",
                va="bottom", fontsize=7)  # fmt: skip


def plot_importance(
    stats: LayerStats,
    path: str | Path,
    title: str,
    block_size: int,
    removed: list[int],
    measured: CriterionScores | None = None,
) -> Path:
    """Per-layer scores (left) and block scores for the chosen block size (right); a model
    scorer's values join the left panel with the order in which it removes the layers."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4), constrained_layout=True)
    definitions = layer_metric_definitions()
    per_layer = {m.key: m.of_blocks(stats, 1).tolist() for m in definitions}
    draw_metrics(ax1, per_layer)
    for i in removed:
        ax1.axvspan(i - 0.5, i + 0.5, color="grey", alpha=0.15, lw=0)
    if measured is not None:
        draw_criterion(ax1, measured, removed)
    ax1.set(xlabel="layer", ylabel="importance (low = prune)", title="per-layer importance")
    per_block = {m.key: m.of_blocks(stats, block_size).tolist() for m in definitions}
    draw_metrics(ax2, per_block)
    ax2.set(xlabel="block start", title=f"blocks of {block_size} layers")
    fig.suptitle(title)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return Path(path)
