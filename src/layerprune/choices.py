"""How much a criterion's choice depends on its calibration data: ``choices.md``.

The calibration ablation runs each criterion on several texts, numbers of windows and seeds of
the window draw. Two questions follow, and this module answers them from the run folders:

* does the criterion pick the same layers? The agreement of two plans is the Jaccard overlap
  of their removed-layer sets (1: the same layers); a criterion's agreement is its mean over
  all pairs of its runs, and over the pairs that differ only in the seed (the draw of the
  windows alone). The random baseline over seeds gives the agreement of plans chosen by chance.
* what does the difference cost? Each distinct plan's average accuracy, and its paired
  difference from the plan picked most often, with the 95% interval on the same documents.

    layerprune-report RUNS --out DIR --group-by calibration.path,calibration.n --choices
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from layerprune.report import (
    GAP,
    Key,
    Run,
    finished,
    get,
    paired_comparison,
    recompute,
    row_key,
    sparsity_label,
)

Layers = tuple[int, ...]


def spans(layers: Iterable[int]) -> str:
    """``3,12-17,25,26``: runs of three or more consecutive layers as ranges."""
    out: list[str] = []
    for _, group in itertools.groupby(enumerate(sorted(layers)), lambda p: p[1] - p[0]):
        run = [layer for _, layer in group]
        out += [f"{run[0]}-{run[-1]}"] if len(run) > 2 else list(map(str, run))
    return ",".join(out)


def jaccard(a: Iterable[int], b: Iterable[int]) -> float:
    """|a ∩ b| / |a ∪ b| of two removed-layer sets; 1 for two empty ones."""
    a, b = set(a), set(b)
    return len(a & b) / len(a | b) if a | b else 1.0


def mean_agreement(pairs: Iterable[tuple[Layers, Layers]]) -> float | None:
    """The mean Jaccard overlap over ``pairs``; None without any."""
    values = [jaccard(a, b) for a, b in pairs]
    return sum(values) / len(values) if values else None


@dataclass
class Criterion:
    """One criterion's runs at one model and sparsity: each run's setting (its group-by values
    and seed) and the layers it removed."""

    key: Key  # (model, sparsity unit, sparsity amount, method)
    runs: list[tuple[tuple[object, ...], Run]]

    def plans(self) -> Counter[Layers]:
        return Counter(removed(run) for _, run in self.runs)

    def agreement(self) -> float | None:
        return mean_agreement(
            (removed(a), removed(b)) for (_, a), (_, b) in itertools.combinations(self.runs, 2)
        )

    def agreement_over_seeds(self) -> float | None:
        """Over the pairs of runs whose settings differ only in the seed."""
        return mean_agreement(
            (removed(a), removed(b))
            for (sa, a), (sb, b) in itertools.combinations(self.runs, 2)
            if sa[:-1] == sb[:-1]
        )

    def run_of(self, plan: Layers) -> Run:
        """The newest run of ``plan`` (a plan's evaluations are the same wherever it came from:
        the removal cache evaluates it once)."""
        return max(
            (run for _, run in self.runs if removed(run) == plan), key=lambda r: r["created"]
        )


def removed(run: Run) -> Layers:
    return tuple(sorted(get(run, "plan.removed_layers") or ()))


def criteria(runs: Iterable[Run], group_by: Sequence[str]) -> list[Criterion]:
    """The finished runs, by criterion (model, sparsity, method) and setting (group-by values,
    then the seed of the calibration windows; the newest run of a setting)."""
    cells: dict[Key, dict[tuple[object, ...], Run]] = {}
    for run in sorted(filter(finished, runs), key=lambda r: r["created"]):
        key = row_key(run, group_by)
        setting = (*key[4:], get(run, "config.calibration.seed"))
        cells.setdefault(key[:4], {})[setting] = run
    return [Criterion(key, sorted(by.items(), key=lambda kv: str(kv[0])))
            for key, by in sorted(cells.items(), key=lambda kv: str(kv[0]))]  # fmt: skip


def fmt(value: float | None, scale: float = 1.0) -> str:
    """An agreement with two decimals, a percentage (``scale=100``) with one."""
    return GAP if value is None else f"{scale * value:.{1 if scale != 1 else 2}f}"


def average(run: Run) -> tuple[float | None, float | None]:
    """A run's average accuracy and its interval's half-width."""
    if not run.get("eval"):
        return None, None
    avg = recompute(run)["average"]
    ci = avg.get("pruned_ci")
    return avg.get("pruned"), (ci["hi"] - ci["lo"]) / 2 if isinstance(ci, dict) else None


def setting_label(setting: tuple[object, ...]) -> str:
    *groups, seed = setting
    return " ".join([*map(str, groups), f"seed {seed}"])  # the windows' seed


def summary_rows(found: Sequence[Criterion]) -> list[str]:
    rows = [
        "| Model | Sparsity | Method | Runs | Plans | Agreement (all) | Agreement (seeds) "
        "| Most picked | Its Avg | Worst plan's ΔAvg [95%] |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in found:
        model, unit, amount, method = c.key
        plans = c.plans()
        modal, count = plans.most_common(1)[0]
        avg, _ = average(c.run_of(modal))
        worst = worst_difference(c, modal)
        rows.append(
            f"| {model} | {sparsity_label(unit, amount)} | {method} | {len(c.runs)} | {len(plans)} "
            f"| {fmt(c.agreement())} | {fmt(c.agreement_over_seeds())} | {spans(modal)} "
            f"({count}/{len(c.runs)}) | {fmt(avg, 100)} | {worst} |"
        )
    return rows


def worst_difference(c: Criterion, modal: Layers) -> str:
    """The lowest paired ΔAvg of another plan against the modal one, with its interval."""
    found = []
    for plan in c.plans():
        if plan != modal and (cmp := paired_comparison(c.run_of(plan), c.run_of(modal))):
            found.append(cmp)
    if not found:
        return GAP
    w = min(found, key=lambda cmp: cmp.delta)
    return f"{100 * w.delta:+.1f} [{100 * w.ci[0]:+.1f}, {100 * w.ci[1]:+.1f}]"


def plan_rows(c: Criterion) -> list[str]:
    """Each distinct plan of one criterion: the settings that picked it, its average accuracy
    and its paired difference from the plan picked most often."""
    plans = c.plans()
    modal = plans.most_common(1)[0][0]
    rows = ["| Removed layers | Picked by | Avg ± | ΔAvg vs most picked [95%] |",
            "|---|---|---|---|"]  # fmt: skip
    for plan, _ in plans.most_common():
        by = "; ".join(setting_label(s) for s, run in c.runs if removed(run) == plan)
        avg, half = average(c.run_of(plan))
        cmp = None if plan == modal else paired_comparison(c.run_of(plan), c.run_of(modal))
        delta = (
            GAP if cmp is None
            else f"{100 * cmp.delta:+.1f} [{100 * cmp.ci[0]:+.1f}, {100 * cmp.ci[1]:+.1f}]"
        )  # fmt: skip
        rows.append(f"| {spans(plan)} | {by} | {fmt(avg, 100)} ± {fmt(half, 100)} | {delta} |")
    return rows


NOTE = (
    "Agreement: the mean Jaccard overlap |A ∩ B| / |A ∪ B| of the removed-layer sets over all "
    "pairs of a criterion's runs (all) and over the pairs that differ only in the seed of the "
    "window draw (seeds); 1 = the same layers every time. Avg in %, ± the half-width of its 95% "
    "interval; ΔAvg: a plan's average accuracy minus the most picked plan's, paired on the same "
    "documents (95% bootstrap interval; undecided where it holds 0)."
)


def choices_markdown(runs: Iterable[Run], group_by: Sequence[str]) -> str:
    found = criteria(runs, group_by)
    lines = ["# How much each criterion's choice depends on its calibration", "", NOTE, ""]
    lines += [*summary_rows(found), ""]
    for c in found:
        model, unit, amount, method = c.key
        lines += [f"## {method}, {model}, {sparsity_label(unit, amount)}", "", *plan_rows(c), ""]
    return "\n".join(lines)
