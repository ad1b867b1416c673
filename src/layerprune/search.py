"""Which plan is best for a budget: every scorer's plan, ranked by a cheap proxy.

For each budget (a sparsity), every proposer (a scorer with a selection; random with several
seeds) makes its plan; plans removing the same layers are one candidate, credited to all its
proposers. The candidates are ranked by a proxy measured on held-out calibration windows
(windows of the calibration text that scoring did not use): the mean KL divergence per token of
the pruned model's next-token distribution from the dense model's, then the pruned model's
perplexity. Both come from the dense model's cached boundary states
(:class:`~layerprune.engine.SkipEngine`): a candidate runs from its first removed layer on. The
best ``top_k`` (``evaluate="top"``), or ``top_k`` spread over the proxy's ranks from the best to
the worst (``evaluate="spread"``), are timed (prefill of the held-out windows on a pruned copy)
and evaluated with the run's evaluator, with the plans of the proposers named in
``also_evaluate`` (a preset's own plan, say); every evaluated plan is compared with the chosen
one, paired on the same documents. :func:`spearman` tells, per budget, how well the proxy
ranked what was evaluated (the headline is the mean over budgets: candidates of different
budgets are not pooled, since the budget alone would correlate them), and :func:`front` which
of them no other beats in both quality and cost, over all budgets. A model scorer is measured
once, for the largest budget it can reach: an iterative criterion's order for fewer layers is
a prefix of it.
"""

from __future__ import annotations

import copy
import logging
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from layerprune.calibration import Calibration
from layerprune.criteria import ModelScorer
from layerprune.engine import SkipEngine
from layerprune.errors import LayerpruneError
from layerprune.layers import param_count
from layerprune.models import LoadedModel
from layerprune.pipeline import (
    Evaluator,
    ScoringSettings,
    criterion_scores,
    layer_stats,
    plan_for,
    removal_count,
)
from layerprune.scoring import Scorer
from layerprune.search_report import SEARCH
from layerprune.selection import Plan, Sparsity
from layerprune.speed import alternate, prefill
from layerprune.surgery import remove_layers

log = logging.getLogger("layerprune")


@dataclass
class Candidate:
    """One distinct plan of a budget and what was measured of it."""

    removed: list[int]
    proposers: list[str]
    params_after: int
    kl: float | None = None  # mean KL(dense || pruned) per held-out token, nats
    ppl: float | None = None  # held-out perplexity of the pruned model
    prefill_s: float | None = None  # median seconds of a prefill of the held-out windows
    accuracy: float | None = None  # the evaluation's average over tasks
    evaluation: dict[str, Any] | None = None
    samples: str | None = None  # the evaluation's folder, relative to the search's
    vs_chosen: dict[str, float] | None = None  # accuracy minus the chosen plan's, paired

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SearchSettings:
    budgets: tuple[float, ...]
    unit: str = "layer_ratio"
    heldout: int = 16  # held-out calibration windows for the proxy
    top_k: int = 3  # candidates timed and evaluated per budget
    prefill_repeats: int = 3
    evaluate: str = "top"  # which candidates: the best top_k, or top_k spread over the ranks
    also_evaluate: tuple[str, ...] = ()  # proposers whose plans are evaluated too, every budget


EVALUATE = ("top", "spread")


def evaluated_ranks(n: int, top_k: int, evaluate: str) -> list[int]:
    """The ranks (0 = best by the proxy) of the candidates timed and evaluated: the first
    ``top_k``, or ``top_k`` evenly spread from the best to the worst."""
    if evaluate not in EVALUATE:
        raise LayerpruneError(f"search.evaluate: {evaluate}; allowed: {', '.join(EVALUATE)}")
    if evaluate == "top" or n <= top_k:
        return list(range(min(n, top_k)))
    if top_k == 1:
        return [0]
    return sorted({round(i * (n - 1) / (top_k - 1)) for i in range(top_k)})


def candidates(proposals: Iterable[tuple[str, Plan]]) -> list[Candidate]:
    """One candidate per distinct set of removed layers, with every proposer's label."""
    found: dict[tuple[int, ...], Candidate] = {}
    for label, plan in proposals:
        key = tuple(plan.removed_layers)
        if key in found:
            found[key].proposers.append(label)
        else:
            found[key] = Candidate(list(key), [label], plan.params_after)
    return list(found.values())


def measure_proxy(engine: SkipEngine, found: Sequence[Candidate]) -> None:
    """Each candidate's held-out KL per token and perplexity (``engine`` holds the dense model)."""
    n_tokens = engine.n_tokens
    for candidate in found:
        kl, nll = engine.divergence(engine.final_without(candidate.removed))
        candidate.kl = float(kl.sum()) / n_tokens
        candidate.ppl = math.exp(float(nll.sum()) / n_tokens)


def ranked(found: Sequence[Candidate]) -> list[Candidate]:
    """Best first: lowest KL, then lowest perplexity, then the removed layers."""
    return sorted(found, key=lambda c: (c.kl, c.ppl, c.removed))


def _ranks(values: Sequence[float]) -> list[float]:
    """Ranks from 1, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for m in range(i, j + 1):
            ranks[order[m]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (Pearson's on mid-ranks); None below 3 points or when one
    side is constant."""
    if len(x) != len(y) or len(x) < 3:
        return None
    rx, ry = _ranks(x), _ranks(y)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    return sxy / math.sqrt(sxx * syy) if sxx and syy else None


def front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points (cost, quality) that no other point beats: lower or equal cost
    with higher quality, or lower cost with equal or higher quality. Sorted by cost."""
    keep = [
        i
        for i, (c, q) in enumerate(points)
        if not any((c2 <= c and q2 > q) or (c2 < c and q2 >= q) for c2, q2 in points)
    ]
    return sorted(keep, key=lambda i: points[i])


def heldout_windows(
    calibration: Calibration, tokenizer: PreTrainedTokenizerBase, n: int
) -> torch.Tensor:
    """``n`` windows of the calibration text that its own draw does not hold: a second seeded
    draw (seed + 1) over the same aligned chunks, with the scoring windows taken out."""
    used = calibration.windows(tokenizer)
    draw = replace(calibration, n=calibration.n + n, seed=calibration.seed + 1)
    try:
        extra = draw.windows(tokenizer)
    except LayerpruneError as e:
        raise LayerpruneError(f"{e}; the search needs {n} held-out windows beyond them") from None
    seen = {tuple(row.tolist()) for row in used}
    rows = [row for row in extra if tuple(row.tolist()) not in seen][:n]
    if len(rows) < n:
        raise LayerpruneError(
            f"calibration text {calibration.describe()} holds {len(rows)} windows beyond the "
            f"{calibration.n} scored; the search needs search.heldout={n}"
        )
    return torch.stack(rows)


@torch.no_grad()
def prefill_seconds(
    model: PreTrainedModel, removed: Sequence[int], ids: torch.Tensor, repeats: int
) -> float:
    """Median seconds of one forward of ``ids`` (no KV cache) through a pruned copy."""
    pruned = copy.deepcopy(model)
    remove_layers(pruned, removed)
    ids = ids.to(next(pruned.parameters()).device)
    (times,) = alternate({"pruned": partial(prefill, pruned, ids)}, repeats).values()
    return statistics.median(times)


def ranks_to_evaluate(order: Sequence[Candidate], settings: SearchSettings) -> list[int]:
    """:func:`evaluated_ranks`, and the rank of every plan a proposer of ``also_evaluate``
    made (so that the chosen plan can be compared with the presets' own)."""
    ranks = set(evaluated_ranks(len(order), settings.top_k, settings.evaluate))
    also = set(settings.also_evaluate)
    ranks |= {i for i, c in enumerate(order) if also & set(c.proposers)}
    return sorted(ranks)


def evaluate_candidate(
    loaded: LoadedModel, candidate: Candidate, evaluator: Evaluator, out: Path, where: str
) -> None:
    """The evaluator's record of a pruned copy, its samples under ``out/where``; its average
    over tasks is the accuracy. The evaluation of a plain removal is cached, so a search
    started again skips what it evaluated."""
    pruned = copy.deepcopy(loaded.model)
    remove_layers(pruned, candidate.removed)
    name = f"{loaded.name}-without-{'-'.join(map(str, candidate.removed))}"
    copy_of = LoadedModel(pruned, loaded.tokenizer, name, loaded.fingerprint, loaded.source)
    record = evaluator.pruned(copy_of, out / where, removed=candidate.removed).get("eval")
    if record:
        candidate.evaluation, candidate.samples = record, where
        candidate.accuracy = float(record["average"]["pruned"])


def compare_with_chosen(order: Sequence[Candidate], out: Path) -> None:
    """Each evaluated plan's accuracy minus the chosen plan's (rank 1), on the same documents:
    the paired bootstrap interval over documents of ``layerprune-report``'s comparisons. Plans
    whose evaluation kept no per-document samples get none."""
    from layerprune.report import paired_comparison

    def as_run(c: Candidate) -> dict[str, Any]:
        return {"run_dir": str(out / (c.samples or "")), "eval": c.evaluation}

    if not order or order[0].evaluation is None:
        return
    chosen = order[0]
    for candidate in order[1:]:
        if candidate.evaluation is not None:
            paired = paired_comparison(as_run(candidate), as_run(chosen))
            if paired is not None:
                lo, hi = paired.ci
                candidate.vs_chosen = {"delta": paired.delta, "lo": lo, "hi": hi}


def quality(candidate: Candidate) -> float | None:
    """Higher is better: the evaluated accuracy, else minus the held-out perplexity."""
    if candidate.accuracy is not None:
        return candidate.accuracy
    return None if candidate.ppl is None else -candidate.ppl


@dataclass
class BudgetResult:
    budget: float
    k: int
    candidates: list[Candidate]  # ranked, best first; empty when no proposer made a plan
    skipped: dict[str, str] = field(default_factory=dict)  # proposer -> why it made no plan
    evaluated: list[int] = field(default_factory=list)  # ranks (0 = best) timed and evaluated
    evaluate: str = "top"
    also_evaluate: tuple[str, ...] = ()

    @property
    def chosen(self) -> Candidate | None:
        return self.candidates[0] if self.candidates else None

    def to_dict(self) -> dict[str, Any]:
        evaluated = [c for c in self.candidates if c.accuracy is not None and c.kl is not None]
        return {
            "budget": self.budget,
            "k": self.k,
            "chosen": None if self.chosen is None else self.chosen.to_dict(),
            "candidates": [c.to_dict() for c in self.candidates],
            "skipped": self.skipped,
            "evaluate": self.evaluate,
            "also_evaluate": list(self.also_evaluate),
            "evaluated_ranks": [r + 1 for r in self.evaluated],
            "spearman_proxy_accuracy": spearman(
                [-(c.kl or 0.0) for c in evaluated], [c.accuracy or 0.0 for c in evaluated]
            ),
        }


def search(
    loaded: LoadedModel,
    calibration: Calibration,
    proposers: Sequence[tuple[str, Scorer]],
    settings: SearchSettings,
    evaluator: Evaluator,
    out: Path,
    scoring: ScoringSettings | None = None,
    cache_dir: str | None = None,
) -> list[BudgetResult]:
    """Every proposer's plan for every budget, ranked by the proxy; ``top_k`` candidates of
    each budget (see :func:`evaluated_ranks`) timed and evaluated (``evaluator`` has evaluated
    the dense model already). A budget no proposer can reach is recorded with no candidates."""
    scoring = scoring or ScoringSettings()
    stats, _ = layer_stats(loaded, calibration, scoring, cache_dir)
    heldout = heldout_windows(calibration, loaded.tokenizer, settings.heldout)
    engine = SkipEngine(loaded.model, heldout, scoring.batch_size)
    num = engine.stack.num_layers
    counts = {budget: removal_count(loaded, Sparsity(budget, settings.unit), 0)
              for budget in settings.budgets}  # fmt: skip
    # A model scorer is measured once, for the most layers any budget asks of it and it can
    # remove: a one-shot criterion's measurement does not depend on k, and an iterative one's
    # order for fewer layers is the prefix of its order for more.
    measured: dict[str, Any] = {}
    for label, scorer in proposers:
        if isinstance(scorer, ModelScorer):
            reachable = [k for k in counts.values() if k <= scorer.max_removable(num)]
            if reachable:
                measured[label], _ = criterion_scores(
                    loaded, calibration, scorer, max(reachable), scoring, cache_dir
                )
    results = []
    for budget in settings.budgets:
        sparsity = Sparsity(budget, settings.unit)
        k = counts[budget]
        proposals, skipped = [], {}
        for label, scorer in proposers:
            if isinstance(scorer, ModelScorer) and k > scorer.max_removable(num):
                skipped[label] = f"removes at most {scorer.max_removable(num)} of {num} layers"
                continue
            evidence = measured.get(label, stats)
            proposals.append((label, plan_for(loaded, evidence, scorer, sparsity, 0)))
        found = candidates(proposals)
        measure_proxy(engine, found)
        order = ranked(found)
        ranks = ranks_to_evaluate(order, settings)
        for rank in ranks:
            candidate = order[rank]
            candidate.prefill_s = prefill_seconds(
                loaded.model, candidate.removed, heldout, settings.prefill_repeats
            )
            evaluate_candidate(loaded, candidate, evaluator, out, f"budget-{budget}/rank{rank + 1}")
        compare_with_chosen(order, out)
        if order:
            log.info(
                "budget %s (%d layers): %d distinct plans from %d proposers; best %s by %s",
                budget, k, len(found), len(proposals), order[0].removed, order[0].proposers,
            )  # fmt: skip
        else:
            log.warning("budget %s (%d layers): no proposer makes a plan: %s", budget, k, skipped)
        also = settings.also_evaluate
        results.append(BudgetResult(budget, k, order, skipped, ranks, settings.evaluate, also))
    return results


def search_record(
    loaded: LoadedModel, results: Sequence[BudgetResult], config: dict[str, Any]
) -> dict[str, Any]:
    """search.json: every budget's ranked candidates, the proxy-vs-accuracy rank correlation
    (per budget, and their mean over the budgets that have one) and the front of quality
    against parameters and prefill time."""
    budgets = [r.to_dict() for r in results]
    top = [c for r in results for c in r.candidates if c.prefill_s is not None]
    evaluated = [c for c in top if c.accuracy is not None]
    rhos = [rho for b in budgets if (rho := b["spearman_proxy_accuracy"]) is not None]
    rated = [(c, q) for c in top if (q := quality(c)) is not None]
    by_params = front([(float(c.params_after), q) for c, q in rated])
    by_prefill = front([(c.prefill_s or 0.0, q) for c, q in rated])
    return {
        "schema_version": 1,
        "kind": SEARCH,
        "model": {"name": loaded.name, "fingerprint": loaded.fingerprint},
        "params_before": param_count(loaded.model),
        "budgets": budgets,
        "spearman_proxy_accuracy": statistics.fmean(rhos) if rhos else None,  # mean per budget
        "quality": "evaluation average" if evaluated else "minus held-out perplexity",
        "front_params": [rated[i][0].to_dict() for i in by_params],
        "front_prefill": [rated[i][0].to_dict() for i in by_prefill],
        "config": config,
    }
