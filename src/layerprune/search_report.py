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
    return f"{100 * c['accuracy']:.1f}{_half(ci, 100)}"


def _versus(paired: dict[str, float] | None) -> str:
    """Δ in points with its 95% interval; "undecided" where the interval holds zero."""
    if paired is None:
        return "–"
    lo, hi = 100 * paired["lo"], 100 * paired["hi"]
    undecided = " undecided" if lo <= 0 <= hi else ""
    return f"{100 * paired['delta']:+.1f} [{lo:+.1f}, {hi:+.1f}]{undecided}"


def _half(ci: dict[str, float] | None, scale: float = 1.0) -> str:
    return "" if not ci else f" ± {scale * (ci['hi'] - ci['lo']) / 2:.1f}"


def _texts(record: dict[str, Any]) -> list[str]:
    """The perplexity texts of the evaluated plans (WikiText-2, C4, ...), in recorded order."""
    names: dict[str, None] = {}
    for budget in record["budgets"]:
        for c in budget["candidates"]:
            names |= dict.fromkeys((c.get("evaluation") or {}).get("perplexity") or {})
    return list(names)


def _ppl(c: dict[str, Any], text: str, side: str = "pruned") -> str:
    """The evaluation's perplexity of ``text`` ± the half-width of its 95% interval."""
    got = ((c.get("evaluation") or {}).get("perplexity") or {}).get(text, {}).get(side)
    return "–" if not got or got.get("ppl") is None else f"{got['ppl']:.1f}{_half(got.get('ci'))}"


def _dense(record: dict[str, Any], texts: list[str]) -> list[str]:
    """The dense model's evaluation, read from the first evaluated plan (every plan is
    evaluated on the same documents and windows)."""
    for budget in record["budgets"]:
        for c in budget["candidates"]:
            average = (c.get("evaluation") or {}).get("average") or {}
            if average.get("dense") is not None:
                ppl = "".join(f"; {t} {_ppl(c, t, 'dense')}" for t in texts)
                dense = f"{100 * average['dense']:.1f}{_half(average.get('dense_ci'), 100)}"
                return [f"Dense model: accuracy {dense}{ppl}.", ""]
    return []


def search_table(record: dict[str, Any]) -> str:
    """Markdown: per budget, its candidates best first (the chosen one is rank 1), which of
    them were evaluated (accuracy in points and the evaluation's perplexities, each ± the
    half-width of its 95% interval; Δ vs rank 1: the paired difference from the chosen plan
    with its interval), then the correlations and the fronts."""
    before = record["params_before"]
    texts = _texts(record)
    lines = [f"# Budgeted search: {record['model']['name']}", "", *_dense(record, texts)]
    for budget in record["budgets"]:
        ranks = budget["evaluated_ranks"]
        which = "the best by the proxy" if budget["evaluate"] == "top" else "spread over the ranks"
        if also := budget.get("also_evaluate"):
            which += f", and the plans of {', '.join(also)}"
        lines += [
            f"## budget {budget['budget']} ({budget['k']} layers)", "",
            f"Timed and evaluated: ranks {', '.join(map(str, ranks)) or '–'} of "
            f"{len(budget['candidates'])} ({which}).", "",
            "| rank | removed | proposed by | params | held-out KL/token | held-out PPL | "
            "prefill s | accuracy | Δ vs rank 1 |" + "".join(f" {t} PPL |" for t in texts),
            "|---|---|---|---|---|---|---|---|---|" + "---|" * len(texts),
        ]  # fmt: skip
        for rank, c in enumerate(budget["candidates"], 1):
            lines.append(
                f"| {rank} | {c['removed']} | {', '.join(c['proposers'])} | "
                f"{c['params_after'] / before:.1%} | {_cell(c['kl'], '.4f')} | "
                f"{_cell(c['ppl'], '.2f')} | {_cell(c['prefill_s'], '.3f')} | "
                f"{_accuracy(c)} | {_versus(c.get('vs_chosen'))} |"
                + "".join(f" {_ppl(c, t)} |" for t in texts)
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


def render(record: dict[str, Any], out: Path) -> str:
    """search.md and search.png of ``record`` into ``out``; returns the table's text."""
    table = search_table(record)
    write_text(out / "search.md", table)
    plot_search(record, out / "search.png")
    return table
