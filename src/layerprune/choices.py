"""How much a criterion's choice depends on its calibration data: ``choices.md``.

The calibration ablation runs each criterion on several texts, numbers of windows and seeds of
the window draw. Two questions follow, and this module answers them from the run folders:

* does the criterion pick the same layers? The agreement of two plans is the Jaccard overlap
  of their removed-layer sets (1: the same layers); a criterion's agreement is its mean over
  all pairs of its runs, and over the pairs that differ only in their seeds (the draw of the
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
from typing import Any

from layerprune.report import (
    DRAW,
    GAP,
    Comparison,
    Key,
    Run,
    draw,
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


@dataclass(frozen=True)
class Setting:
    """What a run of a criterion was given: its group-by values and its seeds."""

    groups: tuple[Any, ...]
    draw: tuple[Any, ...]  # report.draw(run), in the order of DRAW

    def order(self) -> list[tuple[int, float | str]]:
        """A sort key that puts 16 before 64 before 256 (numbers as numbers, before text)."""
        out: list[tuple[int, float | str]] = []
        for value in (*self.groups, *self.draw):
            try:
                out.append((0, float(value)))
            except (TypeError, ValueError):
                out.append((1, str(value)))
        return out


@dataclass
class Criterion:
    """One criterion's runs at one model and sparsity, each with its setting."""

    key: Key  # (model, sparsity unit, sparsity amount, method)
    runs: list[tuple[Setting, Run]]

    def plans(self) -> list[tuple[Layers, int]]:
        """The distinct plans and how often each was picked, the most picked first (a tie: the
        lower layers first)."""
        counts = Counter(removed(run) for _, run in self.runs)
        return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))

    def modal(self) -> tuple[Layers, bool]:
        """The plan picked most often, and whether another was picked as often."""
        plans = self.plans()
        return plans[0][0], len(plans) > 1 and plans[1][1] == plans[0][1]

    def agreement(self) -> float | None:
        return mean_agreement(
            (removed(a), removed(b)) for (_, a), (_, b) in itertools.combinations(self.runs, 2)
        )

    def agreement_over_seeds(self) -> float | None:
        """Over the pairs of runs whose settings differ only in the seeds."""
        return mean_agreement(
            (removed(a), removed(b))
            for (sa, a), (sb, b) in itertools.combinations(self.runs, 2)
            if sa.groups == sb.groups
        )

    def run_of(self, plan: Layers) -> Run:
        """The newest run of ``plan`` (a plan's evaluations are the same wherever it came from:
        the removal cache evaluates it once)."""
        runs = [run for _, run in self.runs if removed(run) == plan]
        return max(runs, key=lambda r: r["created"])

    def label(self, setting: Setting) -> str:
        """A setting in words: its group-by values and the seeds that vary between the runs
        (``wiki 64 calibration.seed 2``)."""
        varying = [i for i in range(len(DRAW)) if len({s.draw[i] for s, _ in self.runs}) > 1]
        seeds = (f"{DRAW[i]} {setting.draw[i]}" for i in varying)
        return " ".join([*map(str, setting.groups), *seeds])

    def costs(self) -> dict[Layers, Comparison | None]:
        """Each plan's average accuracy against the most picked plan's, paired on the same
        documents (None for the most picked, and where the two cannot be paired)."""
        modal = self.run_of(self.modal()[0])
        return {
            plan: None if plan == removed(modal) else paired_comparison(self.run_of(plan), modal)
            for plan, _ in self.plans()
        }


def removed(run: Run) -> Layers:
    return tuple(sorted(get(run, "plan.removed_layers") or ()))


def criteria(runs: Iterable[Run], group_by: Sequence[str]) -> list[Criterion]:
    """The finished runs, by criterion (model, sparsity, method) and setting (the newest run of
    a setting; a note names each run it supersedes, since a setting left out of ``group_by``
    would merge runs unseen)."""
    cells: dict[Key, dict[Setting, Run]] = {}
    for run in sorted(filter(finished, runs), key=lambda r: r["created"]):
        key = row_key(run, group_by)
        setting = Setting(tuple(key[4:]), draw(run))
        if (old := cells.get(key[:4], {}).get(setting)) is not None:
            print(f"note: {run['run_dir']} supersedes {old['run_dir']} in choices.md")
        cells.setdefault(key[:4], {})[setting] = run
    return [Criterion(key, sorted(by.items(), key=lambda kv: kv[0].order()))
            for key, by in sorted(cells.items(), key=lambda kv: str(kv[0]))]  # fmt: skip


def fmt(value: float | None, scale: float = 1.0) -> str:
    """An agreement with two decimals, a percentage (``scale=100``) with one."""
    return GAP if value is None else f"{scale * value:.{1 if scale != 1 else 2}f}"


def difference(cmp: Comparison | None) -> str:
    """A paired difference in points with its 95% interval."""
    if cmp is None:
        return GAP
    return f"{100 * cmp.delta:+.1f} [{100 * cmp.ci[0]:+.1f}, {100 * cmp.ci[1]:+.1f}]"


def average(run: Run) -> tuple[float | None, float | None]:
    """A run's average accuracy and its interval's half-width."""
    if not run.get("eval"):
        return None, None
    avg = recompute(run)["average"]
    ci = avg.get("pruned_ci")
    return avg.get("pruned"), (ci["hi"] - ci["lo"]) / 2 if isinstance(ci, dict) else None


def summary_rows(found: Sequence[tuple[Criterion, dict[Layers, Comparison | None]]]) -> list[str]:
    rows = [
        "| Model | Sparsity | Method | Runs | Plans | Agreement (all) | Agreement (seeds) "
        "| Most picked | Its Avg | Worst plan's ΔAvg [95%] |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c, costs in found:
        model, unit, amount, method = c.key
        (modal, count), tie = c.plans()[0], c.modal()[1]
        avg, _ = average(c.run_of(modal))
        measured = [cmp for cmp in costs.values() if cmp is not None]
        worst = min(measured, key=lambda cmp: cmp.delta) if measured else None
        rows.append(
            f"| {model} | {sparsity_label(unit, amount)} | {method} | {len(c.runs)} "
            f"| {len(c.plans())} | {fmt(c.agreement())} | {fmt(c.agreement_over_seeds())} "
            f"| {spans(modal)} ({count}/{len(c.runs)}{', tie' if tie else ''}) | {fmt(avg, 100)} "
            f"| {difference(worst)} |"
        )
    return rows


def plan_rows(c: Criterion, costs: dict[Layers, Comparison | None]) -> list[str]:
    """Each distinct plan of one criterion: the settings that picked it, its average accuracy
    and its paired difference from the plan picked most often."""
    rows = ["| Removed layers | Picked by | Avg ± | ΔAvg vs most picked [95%] |",
            "|---|---|---|---|"]  # fmt: skip
    for plan, _ in c.plans():
        by = "; ".join(c.label(s) for s, run in c.runs if removed(run) == plan)
        avg, half = average(c.run_of(plan))
        rows.append(
            f"| {spans(plan)} | {by} | {fmt(avg, 100)} ± {fmt(half, 100)} "
            f"| {difference(costs[plan])} |"
        )
    return rows


NOTE = (
    "Agreement: the mean Jaccard overlap |A ∩ B| / |A ∪ B| of the removed-layer sets over all "
    "pairs of a criterion's runs (all) and over the pairs that differ only in their seeds "
    "(seeds: the draw of the calibration windows, or of a random plan); 1 = the same layers "
    "every time. Most picked: (runs that picked it / runs), a tie named. Avg in %, ± the "
    "half-width of its 95% interval; ΔAvg: a plan's average accuracy minus the most picked "
    "plan's, paired on the same documents (95% bootstrap interval; undecided where it holds 0)."
)


def choices_markdown(runs: Iterable[Run], group_by: Sequence[str]) -> str:
    found = [(c, c.costs()) for c in criteria(runs, group_by)]  # each bootstrap once
    lines = ["# How much each criterion's choice depends on its calibration", "", NOTE, ""]
    lines += [*summary_rows(found), ""]
    for c, costs in found:
        model, unit, amount, method = c.key
        title = f"## {method}, {model}, {sparsity_label(unit, amount)}"
        lines += [title, "", *plan_rows(c, costs), ""]
    return "\n".join(lines)
