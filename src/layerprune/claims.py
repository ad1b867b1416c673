"""The papers' claims, each marked supported, contradicted or undecided by a paired interval.

A claim compares two methods of one model at one sparsity, on the same documents (accuracy,
stability) or the same perplexity windows. Its verdict reads only the 95% interval: supported
when the whole interval is on the claimed side, contradicted when it is on the other side, and
undecided when it holds the boundary (0 for a difference, 1 for a perplexity ratio, minus the
margin for "comes close"). A claim with a side not run is a gap, so the table shows what is
missing rather than leaving it out. A perplexity on the text a side's recovery trained on is
not held out: it is marked in-sample, and no verdict is drawn from it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from layerprune.controls import block_report, pair
from layerprune.errors import LayerpruneError
from layerprune.report import (
    Key,
    Run,
    Table,
    finished,
    get,
    load_side,
    paired_comparison,
    perplexities,
    row_key,
    sparsity_label,
    to_markdown,
    uncertainty,
)
from layerprune.stability import stability_columns
from layerprune.stats import percentile_ci, resample_means

RECOVERED = "trained replacement"  # a: every run whose block was replaced by a trained module
PLAIN = "plain removal of its block"  # b: that run's control (layerprune.controls.pair)


@dataclass(frozen=True)
class Claim:
    """``a`` is better than ``b`` on ``measure`` (accuracy | stability | perplexity); with a
    ``margin`` (accuracy, a fraction), ``a`` comes within it of ``b``."""

    text: str
    a: str
    b: str
    measure: str
    margin: float = 0.0


BEATS_ACC = "LLM-Streamline beats ShortGPT in accuracy"
BEATS_STAB = "LLM-Streamline beats ShortGPT in stability"
REPLACES = "A trained replacement beats plain removal of the same block"
HEALS = "LoRA healing helps"
CLOSE_MARGIN = 0.02  # "comes close": trails by at most 2 points of average accuracy
CLOSE = (
    f"ReplaceMe's training-free map comes within {100 * CLOSE_MARGIN:g} points of a trained "
    "replacement"
)
CLAIMS = (
    Claim(BEATS_ACC, "streamline_layer", "shortgpt", "accuracy"),
    Claim(BEATS_ACC, "streamline_layer_lm", "shortgpt", "accuracy"),
    Claim(BEATS_STAB, "streamline_layer", "shortgpt", "stability"),
    Claim(BEATS_STAB, "streamline_layer_lm", "shortgpt", "stability"),
    Claim(REPLACES, RECOVERED, PLAIN, "accuracy"),
    Claim(REPLACES, RECOVERED, PLAIN, "perplexity"),
    Claim(HEALS, "gromov", "gromov_removal", "accuracy"),
    Claim(HEALS, "gromov", "gromov_removal", "perplexity"),
    Claim(HEALS, "ppl", "ppl_removal", "accuracy"),
    Claim(HEALS, "taylor", "taylor_removal", "accuracy"),
    Claim(HEALS, "ppl", "ppl_removal", "perplexity"),
    Claim(HEALS, "taylor", "taylor_removal", "perplexity"),
    Claim(CLOSE, "replaceme", "streamline_layer", "accuracy", margin=CLOSE_MARGIN),
    Claim("SLEB beats ShortGPT on perplexity", "sleb", "shortgpt", "perplexity"),
)

COLUMNS = ["Model", "Sparsity", "Claim", "A", "B", "Measure", "A − B", "95% interval", "Verdict"]
NOTE = (
    "A − B: average accuracy or stability of A minus B's in points, on the same documents "
    "(paired bootstrap over documents, each task resampled on its own); for perplexity, A's "
    "perplexity over B's on the same windows (paired bootstrap over windows), per text. "
    "Supported: the whole 95% interval on the claimed side (above 0, below a ratio of 1, above "
    "minus the margin); contradicted: the whole interval on the other side; undecided: it "
    "holds the boundary. gap: a side was not run (or kept no samples). in-sample: a side's "
    "recovery trained on the text of these perplexity windows, so they are not held out."
)
VERDICTS = ("supported", "contradicted", "undecided", "gap")
IN_SAMPLE = "in-sample"


@dataclass
class Verdict:
    measure: str  # "accuracy" or "stability", or "perplexity <text>"
    value: float
    ci: tuple[float, float]
    verdict: str


def decide(claim: Claim, value: float, ci: tuple[float, float]) -> str:
    """The verdict of a difference (higher is better) or a perplexity ratio (lower is)."""
    lo, hi = ci
    if math.isnan(lo) or math.isnan(hi):
        return "undecided"
    if claim.measure == "perplexity":
        lo, hi, bound = -math.log(hi), -math.log(lo), 0.0  # better: a log-ratio below 0
    else:
        bound = -claim.margin
    return "supported" if lo > bound else "contradicted" if hi < bound else "undecided"


def paired_stability(a: Run, b: Run) -> tuple[float, tuple[float, float]] | None:
    """Stability of ``a`` minus ``b`` (the mean over tasks, as the runs report it): each task's
    documents resampled on their own, the same for both, the weights those of the dense
    model's samples, which both runs must share. None without the samples."""
    seed, iters = uncertainty(a)
    per_task, observed = [], []
    for row in get(a, "eval.tasks") or []:
        task, norm = row["task"], row["metric"] == "acc_norm"
        dense, pa, pb = (load_side(a, "dense", task), load_side(a, "pruned", task),
                         load_side(b, "pruned", task))  # fmt: skip
        if not dense or not pa or not pb or row["metric"] not in ("acc", "acc_norm"):
            return None
        try:
            ca, cb = stability_columns(dense, pa, norm), stability_columns(dense, pb, norm)
        except LayerpruneError:  # not the same documents: no paired comparison
            return None
        columns = np.stack([ca[:, 0], cb[:, 0], ca[:, 1]], axis=1)  # e m_a, e m_b, e
        draws = resample_means({task: columns}, iters, seed)[task]
        per_task.append((draws[:, 0] - draws[:, 1]) / draws[:, 2])
        observed.append(float((columns[:, 0].sum() - columns[:, 1].sum()) / columns[:, 2].sum()))
    if not per_task:
        return None
    return float(np.mean(observed)), percentile_ci(np.mean(per_task, axis=0))


def paired_perplexity(a: Run, b: Run) -> dict[str, tuple[float, tuple[float, float]]]:
    """Per text both runs measured on the same windows: ``a``'s perplexity over ``b``'s, with
    the paired bootstrap interval over windows."""
    seed, iters = uncertainty(a)
    out = {}
    mine, theirs = perplexities(a.get("eval") or {}), perplexities(b.get("eval") or {})
    for name, entry in mine.items():
        pa, pb = entry.get("pruned") or {}, (theirs.get(name) or {}).get("pruned") or {}
        tokens = pa.get("window_tokens")
        if (
            not tokens
            or tokens != pb.get("window_tokens")
            or pa.get("seq_len") != pb.get("seq_len")
        ):
            continue
        columns = np.stack([pa["window_nll"], pb["window_nll"], tokens], axis=1).astype(float)
        draws = resample_means({f"ppl {name}": columns}, iters, seed)[f"ppl {name}"]
        ratio = np.exp((draws[:, 0] - draws[:, 1]) / draws[:, 2])
        value = math.exp((math.fsum(pa["window_nll"]) - math.fsum(pb["window_nll"]))
                         / sum(tokens))  # fmt: skip
        out[name] = (value, percentile_ci(ratio))
    return out


def trained_texts(run: Run) -> set[str]:
    """The names of the perplexity texts whose file the run's recovery trained on."""
    trained = get(run, "config.recovery.train_data.path")
    return {name for name, entry in perplexities(run.get("eval") or {}).items()
            if trained and get(entry, "pruned.path") == trained}  # fmt: skip


def verdicts(claim: Claim, a: Run, b: Run) -> list[Verdict]:
    """The claim's verdicts on one pair of runs: one, or one per perplexity text."""
    if claim.measure == "perplexity":
        seen = trained_texts(a) | trained_texts(b)
        return [Verdict(f"perplexity {name or ''}".strip(), v, ci,
                        IN_SAMPLE if name in seen else decide(claim, v, ci))
                for name, (v, ci) in paired_perplexity(a, b).items()]  # fmt: skip
    found: tuple[float, tuple[float, float]] | None
    if claim.measure == "stability":
        found = paired_stability(a, b)
    else:
        comparison = paired_comparison(a, b)
        found = (comparison.delta, comparison.ci) if comparison else None
    if not found:
        return []
    return [Verdict(claim.measure, found[0], found[1], decide(claim, *found))]


def run_pairs(claim: Claim, runs: Sequence[Run]) -> list[tuple[Key, Run | None, Run | None]]:
    """``(cell, a, b)`` for every model and sparsity where either side was run."""
    done = [r for r in runs if finished(r) and r.get("eval")]
    if claim.a == RECOVERED:
        trained = [(r, c) for r, c in pair(done)
                   if (block_report(r) or {}).get("method") == "replace_block"]  # fmt: skip
        return [(row_key(r, ())[:3], r, c) for r, c in trained]
    cells: dict[Key, dict[str, Run]] = {}
    for run in sorted(done, key=lambda r: r["created"]):  # the newest of a cell wins
        key = row_key(run, ())
        if key[3] in (claim.a, claim.b):
            cells.setdefault(key[:3], {})[key[3]] = run
    return [(cell, sides.get(claim.a), sides.get(claim.b)) for cell, sides in sorted(
        cells.items(), key=lambda kv: str(kv[0]))]  # fmt: skip


def claims_table(runs: Sequence[Run], claims: Sequence[Claim] = CLAIMS) -> Table:
    """Every claim on every model and sparsity where one of the claims' sides was run: a
    claim with a side not run there is a gap row, so the table shows what is missing."""
    rows: list[dict[str, Any]] = []
    met: set[tuple[Key, Claim]] = set()
    for claim in claims:
        for cell, a, b in run_pairs(claim, runs):
            met.add((cell, claim))
            found = verdicts(claim, a, b) if a and b else []
            base = row_base(cell, claim, a, b)
            if not found:
                rows.append({**base, "Measure": claim.measure, "Verdict": "gap"})
            for v in found:
                rows.append({**base, "Measure": v.measure, "A − B": show(v), "95% interval":
                             show(v, v.ci), "Verdict": v.verdict})  # fmt: skip
    for cell in sorted({cell for cell, _ in met}, key=str):
        rows += [{**row_base(cell, claim, None, None), "Measure": claim.measure, "Verdict": "gap"}
                 for claim in claims if (cell, claim) not in met]  # fmt: skip
    rows.sort(key=lambda r: (r["Model"], r["Claim"], r["Sparsity"], r["A"], r["Measure"]))
    return Table(COLUMNS, rows)


def row_base(cell: Key, claim: Claim, a: Run | None, b: Run | None) -> dict[str, Any]:
    """The columns naming a claim's row: its model, sparsity, text and sides."""
    model, unit, amount = cell
    return {"Model": model, "Sparsity": sparsity_label(unit, amount), "Claim": claim.text,
            "A": label(a, claim.a), "B": label(b, claim.b)}  # fmt: skip


def claims_markdown(table: Table) -> str:
    """``claims.md``: the verdict counts per model, then the table."""
    return "\n".join(["# Claims", "", *summary(table), "", to_markdown(table, NOTE)])


def label(run: Run | None, name: str) -> str:
    """A side by its method (a trained replacement: its run's method)."""
    if run is None:
        return f"{name} (not run)"
    return row_key(run, ())[3] if name in (RECOVERED, PLAIN) else name


def number(v: Verdict, x: float) -> str:
    """A difference in points, signed; a ratio to 3 decimals below 10, fewer above."""
    if not v.measure.startswith("perplexity"):
        return f"{100 * x:+.1f}"
    return f"{x:.3f}" if x < 10 else f"{x:.1f}" if x < 100 else f"{x:,.0f}"


def show(v: Verdict, ci: tuple[float, float] | None = None) -> str:
    """The value (a ratio with ×); with ``ci``, the interval instead."""
    if ci is None:
        return number(v, v.value) + ("×" if v.measure.startswith("perplexity") else "")
    return f"[{number(v, ci[0])}, {number(v, ci[1])}]"


def summary(table: Table) -> list[str]:
    """Per model, how many of its claims are supported, contradicted, undecided, gaps (and
    in-sample, where any is)."""
    lines = []
    for model in sorted({r["Model"] for r in table.rows}):
        mine = [r["Verdict"] for r in table.rows if r["Model"] == model]
        shown = VERDICTS + ((IN_SAMPLE,) if IN_SAMPLE in mine else ())
        counts = ", ".join(f"{mine.count(v)} {v}" for v in shown)
        lines.append(f"- {model}: {counts}.")
    return lines
