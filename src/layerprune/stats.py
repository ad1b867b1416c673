"""Uncertainty of evaluation numbers, computed from per-document (or per-window) values.

Everything here is a plain function of arrays, so that a report can recompute every interval
from the samples a run keeps:

* :func:`wilson` — the 95% Wilson score interval of a proportion (one accuracy);
* :func:`resample_means` — the seeded bootstrap: each task's documents are resampled on their
  own, and every column of a task (dense correct, pruned correct, ...) with the same indices,
  so that differences are paired;
* :func:`percentile_ci` and :func:`bootstrap_p` — the percentile interval of a bootstrap
  distribution, and the two-sided p-value of a difference from its bootstrap standard error;
* :func:`mcnemar` — the exact McNemar test on the discordant pairs;
* :func:`holm` — Holm's step-down correction of a family of p-values;
* :func:`effective_sample_size` — 1 / sum(w^2) of normalised weights.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence

import numpy as np

Z95 = 1.959963984540054  # the 97.5% quantile of the standard normal
ITERS = 2000  # bootstrap resamples unless asked otherwise
CHUNK = 5_000_000  # indices drawn at once (bounds memory on 10k-document tasks)


def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of ``successes`` out of ``n`` (95% by default)."""
    if n <= 0:
        return (math.nan, math.nan)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def standard_error(values: Sequence[float] | np.ndarray) -> float:
    """The standard error of a mean, sqrt(var / n) with the population variance (ddof=0): for
    0/1 values (one accuracy) it is sqrt(p(1 - p) / n)."""
    x = np.asarray(values, dtype=np.float64)
    return float(np.sqrt(x.var() / len(x))) if len(x) else math.nan


def _generator(seed: int, key: str) -> np.random.Generator:
    """A generator for one task: the same (seed, task) draws the same indices whatever other
    tasks are resampled beside it."""
    return np.random.default_rng([seed, zlib.crc32(key.encode())])


def resample_means(
    columns: Mapping[str, np.ndarray], iters: int = ITERS, seed: int = 0
) -> dict[str, np.ndarray]:
    """Bootstrap means: ``{task: (n_t, c) values}`` -> ``{task: (iters, c) means}``.

    Resample r of task t draws n_t document indices with replacement (the generator seeded by
    ``seed`` and the task's name) and takes every column's mean over them, all columns with the
    same indices: column differences are paired.
    """
    out = {}
    for key, values in columns.items():
        x = np.asarray(values, dtype=np.float64)
        x = x[:, None] if x.ndim == 1 else x
        n = len(x)
        rng = _generator(seed, key)
        means = np.empty((iters, x.shape[1]))
        step = max(1, CHUNK // max(n, 1))
        for start in range(0, iters, step):
            k = min(step, iters - start)
            idx = rng.integers(0, n, size=(k, n))
            means[start : start + k] = x[idx].mean(axis=1)
        out[key] = means
    return out


def percentile_ci(draws: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The percentile interval of bootstrap draws (NaN draws, e.g. a 0/0 ratio, are left out)."""
    x = np.asarray(draws, dtype=np.float64)
    x = x[np.isfinite(x)]
    if not len(x):
        return (math.nan, math.nan)
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(x, [tail, 100 - tail])
    return (float(lo), float(hi))


def bootstrap_p(draws: np.ndarray, observed: float) -> float:
    """Two-sided p-value of ``observed`` = 0, the normal test with the bootstrap standard
    error: p = 2 Phi(-|d| / sd(d*)) = erfc(|d| / (sd(d*) sqrt 2)).

    Why not the share of draws beyond the observed value: with B resamples that p cannot fall
    below 1 / (B + 1), and Holm's correction of a family of m comparisons multiplies the
    smallest p by m, so with 2,000 resamples no family of 100 pairs could ever reach 0.05.
    A mean over hundreds of documents is close to normal, and the normal tail resolves any p.
    """
    x = np.asarray(draws, dtype=np.float64)
    x = x[np.isfinite(x)]
    if observed == 0:
        return 1.0
    se = float(x.std(ddof=1)) if len(x) > 1 else 0.0
    if se == 0:  # every resample agrees: nothing varies, the difference is certain
        return 0.0
    return math.erfc(abs(observed) / (se * math.sqrt(2)))


def mcnemar(right_to_wrong: int, wrong_to_right: int) -> float:
    """Exact two-sided McNemar p-value: under the null, each of the n = b + c discordant
    documents flips either way with probability 1/2, so p = min(1, 2 P(Bin(n, 1/2) <= min(b, c)))
    (computed with exact integers; 1.0 when there is no discordant document)."""
    b, c = right_to_wrong, wrong_to_right
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**n)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (in the input order): the i-th smallest of m is
    multiplied by m - i (i from 0), then made non-decreasing and capped at 1."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def effective_sample_size(weights: Sequence[float] | np.ndarray) -> float:
    """1 / sum(w^2) of weights normalised to sum 1: n for equal weights, 1 for one weight."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    return float(1.0 / np.sum(w * w))
