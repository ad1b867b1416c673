"""Figures of layer importance, drawn from the statistics alone."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from layerprune.files import atomic_write
from layerprune.scoring import LayerStats, Streamline


def plot_importance(
    stats: LayerStats, path: str | Path, title: str, block_size: int, removed: list[int]
) -> Path:
    """Per-layer scores (left) and block scores for the chosen block size (right)."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4), constrained_layout=True)
    layers = range(stats.num_layers)
    ax1.plot(layers, stats.block_influence(), marker="o", label="block influence (ShortGPT)")
    ax1.plot(layers, stats.block_angular(1), marker="s", label="angular distance, n=1 (Gromov)")
    ax1.plot(
        layers, 1 - Streamline.similarity(stats, 1), marker="^", label="1 - Streamline sim, n=1"
    )
    for i in removed:
        ax1.axvspan(i - 0.5, i + 0.5, color="grey", alpha=0.15, lw=0)
    ax1.set(xlabel="layer", ylabel="importance (low = prune)", title="per-layer importance")
    ax1.legend(fontsize=8)
    starts = range(stats.num_layers - block_size + 1)
    ax2.plot(starts, Streamline.similarity(stats, block_size), marker="^", label="Streamline sim")
    ax2.plot(starts, stats.block_angular(block_size), marker="s", label="angular distance")
    ax2.set(xlabel="block start", title=f"blocks of {block_size} layers")
    ax2.legend(fontsize=8)
    fig.suptitle(title)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return Path(path)
