"""The budgeted search's table and figure, written from its record (search.json) alone: by the
search run itself and again by ``layerprune-report``, so that both are regenerated from data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from layerprune.files import atomic_write, write_text

SEARCH = "layerprune.search"  # the record's kind


def _cell(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def _accuracy(c: dict[str, Any]) -> str:
    """The average accuracy in points, ± the half-width of its 95% interval where recorded."""
    if c["accuracy"] is None:
        return "–"
    ci = ((c.get("evaluation") or {}).get("average") or {}).get("pruned_ci")
    pm = f" ± {50 * (ci['hi'] - ci['lo']):.1f}" if ci else ""
    return f"{100 * c['accuracy']:.1f}{pm}"


def _versus(paired: dict[str, float] | None) -> str:
    """Δ in points with its 95% interval; "undecided" where the interval holds zero."""
    if paired is None:
        return "–"
    lo, hi = 100 * paired["lo"], 100 * paired["hi"]
    undecided = " undecided" if lo <= 0 <= hi else ""
    return f"{100 * paired['delta']:+.1f} [{lo:+.1f}, {hi:+.1f}]{undecided}"


def search_table(record: dict[str, Any]) -> str:
    """Markdown: per budget, its candidates best first (the chosen one is rank 1), which of
    them were evaluated (accuracy in points ± the half-width of its 95% interval; Δ vs rank 1:
    the paired difference from the chosen plan with its interval), then the correlations and
    the fronts."""
    before = record["params_before"]
    lines = [f"# Budgeted search: {record['model']['name']}", ""]
    for budget in record["budgets"]:
        ranks = budget["evaluated_ranks"]
        which = "the best by the proxy" if budget["evaluate"] == "top" else "spread over the ranks"
        if also := budget.get("also_evaluate"):
            which += f", and the plans of {', '.join(also)}"
        lines += [
            f"## budget {budget['budget']} ({budget['k']} layers)", "",
            f"Timed and evaluated: ranks {', '.join(map(str, ranks)) or '–'} of "
            f"{len(budget['candidates'])} ({which}).", "",
            "| rank | removed | proposed by | params | KL/token | PPL | prefill s | accuracy | "
            "Δ vs rank 1 |",
            "|---|---|---|---|---|---|---|---|---|",
        ]  # fmt: skip
        for rank, c in enumerate(budget["candidates"], 1):
            lines.append(
                f"| {rank} | {c['removed']} | {', '.join(c['proposers'])} | "
                f"{c['params_after'] / before:.1%} | {_cell(c['kl'], '.4f')} | "
                f"{_cell(c['ppl'], '.2f')} | {_cell(c['prefill_s'], '.3f')} | "
                f"{_accuracy(c)} | {_versus(c.get('vs_chosen'))} |"
            )
        rho = _cell(budget["spearman_proxy_accuracy"], ".3f")
        lines += ["", f"Spearman (−KL vs accuracy, the {len(ranks)} evaluated plans): {rho}", ""]
        if budget["skipped"]:
            lines += [f"Not proposed: {budget['skipped']}", ""]
    per_budget = ", ".join(_cell(b["spearman_proxy_accuracy"], ".3f") for b in record["budgets"])
    lines.append(
        f"Spearman (−KL vs accuracy), mean over budgets: "
        f"{_cell(record['spearman_proxy_accuracy'], '.3f')} (per budget: {per_budget}); "
        f"quality = {record['quality']}"
    )
    for key, cost in (("front_params", "parameters"), ("front_prefill", "prefill time")):
        points = [f"{c['removed']} ({c['params_after'] / before:.1%})" for c in record[key]]
        lines.append(f"Front against {cost}: {'; '.join(points) or '–'}")
    if timings := record.get("timings"):  # recorded by searches since they were measured
        dense = timings.get("evaluate_dense")
        lines.append(
            f"Wall time {timings['total'] / 60:.1f} min"
            + ("" if dense is None else f" (the dense evaluation {dense / 60:.1f})")
            + f"; peak resident memory {record['peak_memory_gib']['cpu_rss']:.1f} GiB"
        )
    return "\n".join(lines) + "\n"


def plot_search(record: dict[str, Any], path: Path) -> Path:
    """Quality of the timed plans of every budget against their parameters and prefill time,
    the front drawn through the points no other beats."""
    before = record["params_before"]
    evaluated = record["quality"] == "evaluation average"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for budget in record["budgets"]:
        top = [c for c in budget["candidates"] if c["prefill_s"] is not None]
        q = [c["accuracy"] if evaluated else -c["ppl"] for c in top]
        axes[0].scatter([c["params_after"] / before for c in top], q, label=str(budget["budget"]))
        axes[1].scatter([c["prefill_s"] for c in top], q, label=str(budget["budget"]))
    for ax, key, x in ((axes[0], "front_params", "params"), (axes[1], "front_prefill", "prefill")):
        line = record[key]
        xs = [c["params_after"] / before if x == "params" else c["prefill_s"] for c in line]
        ax.plot(xs, [c["accuracy"] if evaluated else -c["ppl"] for c in line], "k--", lw=1)
        ax.legend(title="budget", fontsize=8)
    ylabel = "average accuracy" if evaluated else "− held-out perplexity"
    axes[0].set(xlabel="parameters kept (fraction)", ylabel=ylabel)
    axes[1].set(xlabel="prefill seconds (held-out windows)", ylabel=ylabel)
    fig.suptitle(f"{record['model']['name']}: evaluated plans per budget and their front")
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return path


def render(record: dict[str, Any], out: Path) -> list[Path]:
    """search.md and search.png of ``record`` into ``out``."""
    table = write_text(out / "search.md", search_table(record))
    return [table, plot_search(record, out / "search.png")]
