"""How far a pruned model's multiple-choice answers stay those of the dense model.

Accuracy alone hides churn: a pruned model can keep its score while flipping many answers.
``agreement`` counts identical answers; ``stability`` is LLM-Streamline's metric, which weights
each question by how much the dense model's per-token NLLs of its options spread; ``flips``
counts the answers that turned right -> wrong and wrong -> right, which McNemar's test compares.
"""

from __future__ import annotations

import gzip
import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from layerprune.errors import LayerpruneError
from layerprune.files import atomic_write
from layerprune.stats import (
    ITERS,
    effective_sample_size,
    mcnemar,
    percentile_ci,
    resample_means,
    standard_error,
    wilson,
)


@dataclass
class Sample:
    """One multiple-choice question as scored by a model, with its lm-eval predictions.

    ``chars`` is each continuation's length in characters: acc_norm divides by it, as lm-eval
    does. ``prompt_hash`` identifies the prompt, so dense and pruned runs can be checked to
    have asked the same question.
    """

    doc_id: int
    loglikelihoods: list[float]
    tokens: list[int]
    chars: list[int]
    gold: int
    pred_acc: int
    pred_norm: int
    prompt_hash: str

    def __post_init__(self) -> None:
        k = len(self.loglikelihoods)
        if k == 0 or len(self.tokens) != k or len(self.chars) != k:
            raise LayerpruneError(
                f"doc {self.doc_id}: needs one loglikelihood, token count and char count per "
                f"option; got {k}, {len(self.tokens)} and {len(self.chars)}"
            )
        if min(self.tokens) < 1:
            raise LayerpruneError(
                f"doc {self.doc_id}: token counts must be >= 1; got {self.tokens}"
            )
        for name in ("gold", "pred_acc", "pred_norm"):
            if not 0 <= getattr(self, name) < k:
                raise LayerpruneError(
                    f"doc {self.doc_id}: {name}={getattr(self, name)} is not an option index "
                    f"0..{k - 1}"
                )

    @classmethod
    def from_scores(
        cls,
        doc_id: int,
        loglikelihoods: list[float],
        tokens: list[int],
        chars: list[int],
        gold: int,
        prompt_hash: str,
    ) -> Sample:
        """Predictions as lm-eval makes them: argmax of ll (acc) and of ll / chars (acc_norm)."""
        ll = np.asarray(loglikelihoods, dtype=np.float64)
        return cls(
            doc_id=doc_id,
            loglikelihoods=list(loglikelihoods),
            tokens=list(tokens),
            chars=list(chars),
            gold=gold,
            pred_acc=int(np.argmax(ll)),
            pred_norm=int(np.argmax(ll / np.asarray(chars, dtype=np.float64))),
            prompt_hash=prompt_hash,
        )

    def pred(self, norm: bool = False) -> int:
        return self.pred_norm if norm else self.pred_acc

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Sample:
        names = {f.name for f in fields(cls)}
        if set(data) != names:
            raise LayerpruneError(
                f"sample has fields {sorted(data)}; expected exactly {sorted(names)}"
            )
        return cls(**data)


def _paired(dense: Sequence[Sample], pruned: Sequence[Sample]) -> list[tuple[Sample, Sample]]:
    """Dense and pruned samples matched by doc_id, in doc_id order, after checking they agree."""
    by_id: list[dict[int, Sample]] = []
    for name, samples in (("dense", dense), ("pruned", pruned)):
        counts = Counter(s.doc_id for s in samples)
        dup = [i for i, c in counts.items() if c > 1]
        if dup:
            raise LayerpruneError(f"{name} samples list doc {min(dup)} more than once")
        by_id.append({s.doc_id: s for s in samples})
    d, p = by_id
    if not d and not p:
        raise LayerpruneError("no samples to compare; need at least one doc")
    if d.keys() != p.keys():
        first = min(d.keys() ^ p.keys())
        missing = "pruned" if first in d else "dense"
        raise LayerpruneError(
            f"doc {first} is missing from the {missing} samples; both runs must score the same docs"
        )
    pairs = [(d[i], p[i]) for i in sorted(d)]
    for a, b in pairs:
        if len(a.loglikelihoods) != len(b.loglikelihoods):
            raise LayerpruneError(
                f"doc {a.doc_id} has {len(a.loglikelihoods)} options in the dense samples but "
                f"{len(b.loglikelihoods)} in the pruned; both runs must score the same options"
            )
        if a.prompt_hash != b.prompt_hash or a.gold != b.gold:
            raise LayerpruneError(
                f"doc {a.doc_id} differs between runs (prompt hash {a.prompt_hash} vs "
                f"{b.prompt_hash}, gold {a.gold} vs {b.gold}); both must ask the same question"
            )
    return pairs


def _spread(pairs: list[tuple[Sample, Sample]], exp_ppl: bool) -> np.ndarray:
    """Per doc, the population std over options of the dense model's mean NLL per token of
    each option's continuation (of exp of it, the per-token perplexity, if ``exp_ppl``)."""
    nll = [-np.asarray(a.loglikelihoods, np.float64) / np.asarray(a.tokens) for a, _ in pairs]
    return np.array([np.std(np.exp(x) if exp_ppl else x) for x in nll])


def _weights(pairs: list[tuple[Sample, Sample]], exp_ppl: bool = False) -> np.ndarray:
    """softmax over docs of :func:`_spread`."""
    spread = _spread(pairs, exp_ppl)
    w = np.exp(spread - spread.max())
    return w / w.sum()


def _compare(
    dense: Sequence[Sample], pruned: Sequence[Sample], norm: bool
) -> tuple[list[tuple[Sample, Sample]], np.ndarray, np.ndarray]:
    """Per doc, in doc_id order: the pair, both right or both wrong, same answer."""
    pairs = _paired(dense, pruned)
    matches = np.array([(a.pred(norm) == a.gold) == (b.pred(norm) == b.gold) for a, b in pairs])
    same = np.array([a.pred(norm) == b.pred(norm) for a, b in pairs])
    return pairs, matches, same


def _stability(
    pairs: list[tuple[Sample, Sample]], m: np.ndarray, legacy: bool, exp_ppl: bool = False
) -> float:
    w = _weights(pairs, exp_ppl)
    return float(w[: int(m.sum())].sum() if legacy else w[m].sum())


def agreement(dense: Sequence[Sample], pruned: Sequence[Sample], norm: bool = False) -> float:
    """Fraction of docs where both models pick the same option (acc_norm's pick if ``norm``)."""
    return float(_compare(dense, pruned, norm)[2].mean())


def stability(
    dense: Sequence[Sample],
    pruned: Sequence[Sample],
    norm: bool = False,
    legacy: bool = False,
    exp_ppl: bool = False,
) -> float:
    """LLM-Streamline's stability: agreement on correctness, weighted toward hard-to-call docs.

    With NLL_ij = -ll_ij / tokens_ij the dense model's mean NLL per token of option j's
    continuation of doc i, s_i = std_j NLL_ij is the population std (ddof=0, numpy's default,
    as in the authors' script), w = softmax_i(s_i), and m_i = 1 when both models are right or
    both wrong (acc_norm's picks if ``norm``). The result is sum_i w_i m_i, docs in doc_id
    order. OpenCompass, whose outputs the authors' script reads, stores this mean NLL per token
    under the name "PPL".

    ``legacy`` reproduces the authors' released script: it sums the first sum_i m_i weights in
    doc order, whichever docs matched. It is kept only to compare with published numbers.
    ``exp_ppl`` takes the std of exp(NLL_ij) instead (a reading of the paper's "PPL" as a
    perplexity): on small models a few docs then take nearly all the weight, so it is reported
    only under the name ``stability_exp_ppl``, never as the headline.
    """
    pairs, m, _ = _compare(dense, pruned, norm)
    return _stability(pairs, m, legacy, exp_ppl)


def stability_columns(
    dense: Sequence[Sample], pruned: Sequence[Sample], norm: bool = False
) -> np.ndarray:
    """Per doc ``(e_i m_i, e_i)`` with e_i = exp(s_i - max s): stability is the ratio of the two
    columns' sums, so a bootstrap that resamples docs (rows) renormalises the softmax over the
    resampled docs."""
    pairs, m, _ = _compare(dense, pruned, norm)
    spread = _spread(pairs, exp_ppl=False)
    e = np.exp(spread - spread.max())
    return np.stack([e * m, e], axis=1)


def paired_correct(
    dense: Sequence[Sample], pruned: Sequence[Sample], norm: bool = False
) -> np.ndarray:
    """Per doc, in doc_id order, ``(dense right, pruned right)`` as 0/1 columns."""
    pairs = _paired(dense, pruned)
    return np.array(
        [[a.pred(norm) == a.gold, b.pred(norm) == b.gold] for a, b in pairs], dtype=np.float64
    ).reshape(len(pairs), 2)


def baselines(samples: Sequence[Sample]) -> dict[str, float]:
    """What needs no model on these docs: ``majority``, the accuracy of always picking the
    option index that is most often gold, and ``chance``, the mean of 1 / number of options."""
    golds = Counter(s.gold for s in samples)
    return {
        "majority": max(golds.values()) / len(samples),
        "chance": math.fsum(1 / len(s.loglikelihoods) for s in samples) / len(samples),
    }


def interval(lo: float, hi: float) -> dict[str, float]:
    """An interval as the run record keeps it (a mapping, so its ends reach W&B as numbers)."""
    return {"lo": lo, "hi": hi}


def accuracy_stats(
    columns: np.ndarray, dense: Sequence[Sample], seed: int, iters: int, key: str
) -> tuple[dict[str, Any], np.ndarray]:
    """Per task, from its per-document 0/1 ``columns`` (dense right, pruned right): the doc
    count, standard errors, 95% Wilson intervals, the paired bootstrap interval of the
    difference, and the majority-class and chance accuracies of the docs; with the bootstrap
    draws of both means (``(iters, 2)``, the generator seeded by ``seed`` and ``key``)."""
    n = len(columns)
    draws = resample_means({key: columns}, iters, seed)[key]
    stats: dict[str, Any] = {"n": n}
    for i, side in enumerate(("dense", "pruned")):
        stats[f"{side}_se"] = standard_error(columns[:, i])
        stats[f"{side}_ci"] = interval(*wilson(float(columns[:, i].sum()), n))
    stats["delta_ci"] = interval(*percentile_ci(draws[:, 1] - draws[:, 0]))
    stats.update(baselines(dense))
    return stats, draws


def average_intervals(task_draws: Sequence[np.ndarray]) -> dict[str, dict[str, float]]:
    """From each task's ``(iters, 2)`` bootstrap means (dense, pruned; drawn with the same
    indices for both): 95% intervals of the dense and pruned averages over tasks, of their
    difference and of RP = pruned / dense, as ``dense_ci``, ``pruned_ci``, ``delta_ci``,
    ``rp_ci``."""
    mean = np.mean(task_draws, axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        rp = mean[:, 1] / mean[:, 0]
    return {
        "dense_ci": interval(*percentile_ci(mean[:, 0])),
        "pruned_ci": interval(*percentile_ci(mean[:, 1])),
        "delta_ci": interval(*percentile_ci(mean[:, 1] - mean[:, 0])),
        "rp_ci": interval(*percentile_ci(rp)),
    }


def stability_draws(
    dense: Sequence[Sample], pruned: Sequence[Sample], norm: bool, seed: int, iters: int, key: str
) -> np.ndarray:
    """Bootstrap draws of stability: docs resampled with replacement, the softmax renormalised
    over each resample (the generator seeded by ``seed`` and ``key``)."""
    columns = stability_columns(dense, pruned, norm)
    draws = resample_means({key: columns}, iters, seed)[key]
    return draws[:, 0] / draws[:, 1]


def flips(dense: Sequence[Sample], pruned: Sequence[Sample], norm: bool = False) -> tuple[int, int]:
    """``(right -> wrong, wrong -> right)``: docs the dense model got right and the pruned one
    wrong, and the reverse."""
    pairs = _paired(dense, pruned)
    d = np.array([a.pred(norm) == a.gold for a, _ in pairs])
    p = np.array([b.pred(norm) == b.gold for _, b in pairs])
    return int(np.sum(d & ~p)), int(np.sum(~d & p))


def task_stability(
    dense: Sequence[Sample],
    pruned: Sequence[Sample],
    norm: bool = False,
    seed: int = 0,
    iters: int = ITERS,
    key: str = "",
) -> dict[str, Any]:
    """Every comparison for one task: agreement; stability with its effective sample size
    (1 / sum w^2) and bootstrap 95% CI (``iters`` resamples of the docs, seeded by ``seed`` and
    ``key``); the legacy and exp(NLL) variants; the right->wrong and wrong->right flips and
    McNemar's exact p-value; the doc count."""
    pairs, m, same = _compare(dense, pruned, norm)
    weights = stability_columns(dense, pruned, norm)[:, 1]
    lo, hi = percentile_ci(stability_draws(dense, pruned, norm, seed, iters, key))
    r2w, w2r = flips(dense, pruned, norm)
    return {
        "agreement": float(same.mean()),
        "stability": _stability(pairs, m, legacy=False),
        "stability_ci": interval(lo, hi),
        "stability_ess": effective_sample_size(weights),
        "stability_legacy": _stability(pairs, m, legacy=True),
        "stability_exp_ppl": _stability(pairs, m, legacy=False, exp_ppl=True),
        "right_to_wrong": r2w,
        "wrong_to_right": w2r,
        "mcnemar_p": mcnemar(r2w, w2r),
        "n": len(m),
    }


MEANS = ("agreement", "stability", "stability_legacy", "stability_exp_ppl")
SUMS = ("right_to_wrong", "wrong_to_right", "n")


def average_over_tasks(per_task: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Plain mean over tasks, each task counting once whatever its size (as papers report).

    Counts (``n`` and the flips) are totals rather than means; McNemar's p-value is that of
    the total flips. Keys a task lacks (older records) are left out.
    """
    if not per_task:
        raise LayerpruneError("no tasks to average; need at least one task's results")
    rows = list(per_task.values())
    out: dict[str, Any] = {
        k: math.fsum(float(r[k]) for r in rows) / len(rows)
        for k in MEANS
        if all(k in r for r in rows)
    }
    out.update({k: sum(int(r[k]) for r in rows) for k in SUMS if all(k in r for r in rows)})
    if "right_to_wrong" in out and "wrong_to_right" in out:
        out["mcnemar_p"] = mcnemar(out["right_to_wrong"], out["wrong_to_right"])
    return out


def write_samples(path: str | Path, samples: Iterable[Sample]) -> Path:
    """One task's samples as gzip JSON Lines; no timestamp in the header, so reruns match bytes."""
    body = "".join(json.dumps(s.to_dict()) + "\n" for s in samples).encode()

    def write(tmp: Path) -> None:
        with (
            tmp.open("wb") as raw,
            gzip.GzipFile(fileobj=raw, mode="wb", filename="", mtime=0) as f,
        ):
            f.write(body)

    return atomic_write(path, write)


def read_samples(path: str | Path) -> list[Sample]:
    path = Path(path)
    if not path.is_file():
        raise LayerpruneError(f"samples file '{path}' does not exist")
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.readlines()
    except (OSError, EOFError) as e:
        raise LayerpruneError(f"samples file '{path}' is not complete gzip: {e}") from e
    samples = []
    for n, line in enumerate(lines, start=1):
        try:
            samples.append(Sample.from_dict(json.loads(line)))
        except (ValueError, TypeError, LayerpruneError) as e:
            raise LayerpruneError(f"samples file '{path}' line {n} is not a sample: {e}") from e
    return samples
