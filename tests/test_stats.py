"""The statistics behind every interval and p-value, against explicit loops and hand values."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
from scipy.stats import binomtest

from layerprune.stats import (
    bootstrap_p,
    effective_sample_size,
    holm,
    mcnemar,
    percentile_ci,
    resample_means,
    standard_error,
    wilson,
)


def naive_paired_bootstrap(
    tasks: dict[str, tuple[list[float], list[float]]], iters: int, seed: int
) -> list[float]:
    """The average over tasks of (pruned − dense) per resample, one document at a time: each
    task's indices drawn from its own generator, the same indices for both sides."""
    rngs = {t: np.random.default_rng([seed, zlib.crc32(t.encode())]) for t in tasks}
    indices = {t: rngs[t].integers(0, len(d), size=(iters, len(d))) for t, (d, _) in tasks.items()}
    out = []
    for r in range(iters):
        deltas = []
        for t, (dense, pruned) in tasks.items():
            total = 0.0
            for i in indices[t][r]:
                total += pruned[i] - dense[i]
            deltas.append(total / len(dense))
        out.append(sum(deltas) / len(deltas))
    return out


def test_paired_bootstrap_matches_the_explicit_loops() -> None:
    rng = np.random.default_rng(5)
    tasks = {
        name: (rng.integers(0, 2, n).astype(float).tolist(),
               rng.integers(0, 2, n).astype(float).tolist())
        for name, n in (("piqa", 13), ("boolq", 7), ("arc_easy", 21))
    }  # fmt: skip
    means = resample_means(
        {t: np.array([d, p]).T for t, (d, p) in tasks.items()}, iters=300, seed=11
    )
    got = np.mean([m[:, 1] - m[:, 0] for m in means.values()], axis=0)
    assert got == pytest.approx(naive_paired_bootstrap(tasks, 300, 11), abs=1e-12)


def test_chunked_draws_equal_one_draw(monkeypatch: pytest.MonkeyPatch) -> None:
    x = np.arange(10.0)
    whole = resample_means({"t": x}, iters=50, seed=3)["t"]
    monkeypatch.setattr("layerprune.stats.CHUNK", 25)  # 2 resamples at a time
    assert resample_means({"t": x}, iters=50, seed=3)["t"] == pytest.approx(whole)


def test_paired_bootstrap_by_hand() -> None:
    # Two documents: dense right/wrong, pruned right/right, so the per-document differences
    # are 0 and 1. A resample of 2 documents has mean difference 0, 1/2 or 1 with
    # probabilities 1/4, 1/2, 1/4: the 95% interval is [0, 1] and the mean 1/2.
    cols = np.array([[1.0, 1.0], [0.0, 1.0]])
    draws = resample_means({"t": cols}, iters=20000, seed=0)["t"]
    diff = draws[:, 1] - draws[:, 0]
    assert set(np.unique(diff)) == {0.0, 0.5, 1.0}
    assert np.mean(diff == 0.5) == pytest.approx(0.5, abs=0.02)
    assert np.mean(diff == 0.0) == pytest.approx(0.25, abs=0.02)
    assert percentile_ci(diff) == (0.0, 1.0)
    # a document resampled for one side is resampled for the other: the dense mean is the
    # fraction of doc 0 in the resample, the pruned mean always 1
    assert np.all(draws[:, 1] == 1.0)


def test_the_same_seed_and_task_give_the_same_draws() -> None:
    x = np.arange(30.0)
    a = resample_means({"piqa": x, "boolq": x}, iters=100, seed=1)
    b = resample_means({"piqa": x}, iters=100, seed=1)
    assert np.array_equal(a["piqa"], b["piqa"])  # other tasks do not shift the draw
    assert not np.array_equal(a["piqa"], a["boolq"])  # each task has its own
    assert not np.array_equal(a["piqa"], resample_means({"piqa": x}, 100, seed=2)["piqa"])


def test_wilson_by_hand() -> None:
    # 30 of 40, z = 1.96: centre (0.75 + z^2/80) / (1 + z^2/40) = 0.728100,
    # half-width z sqrt(0.75 * 0.25 / 40 + z^2 / 6400) / (1 + z^2/40) = 0.130036
    lo, hi = wilson(30, 40)
    assert (lo + hi) / 2 == pytest.approx(0.728100, abs=1e-5)
    assert (hi - lo) / 2 == pytest.approx(0.130036, abs=1e-5)
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == pytest.approx(1.0)
    assert standard_error([1, 0, 1, 1]) == pytest.approx(math.sqrt(0.75 * 0.25 / 4))


@pytest.mark.parametrize(("b", "c"), [(0, 0), (2, 0), (5, 1), (3, 3), (12, 4), (40, 25), (1, 99)])
def test_mcnemar_is_the_exact_binomial_test(b: int, c: int) -> None:
    expected = 1.0 if b + c == 0 else binomtest(b, b + c, 0.5).pvalue
    assert mcnemar(b, c) == pytest.approx(expected, rel=1e-9)
    assert mcnemar(b, c) == mcnemar(c, b)


def test_mcnemar_by_hand() -> None:
    # b = 5, c = 1: 2 * (C(6,0) + C(6,1)) / 2^6 = 2 * 7 / 64
    assert mcnemar(5, 1) == pytest.approx(14 / 64)
    assert mcnemar(2, 0) == pytest.approx(0.5)


def test_holm_by_hand() -> None:
    # sorted 0.01, 0.02, 0.03, 0.04 times 4, 3, 2, 1: 0.04, 0.06, 0.06, 0.04 -> running
    # maximum 0.04, 0.06, 0.06, 0.06; given out of order
    assert holm([0.03, 0.01, 0.04, 0.02]) == pytest.approx([0.06, 0.04, 0.06, 0.06])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([]) == []


def test_bootstrap_p_by_hand() -> None:
    # draws 0, 1, 2: sd (ddof 1) = 1; observed 1.96 is 1.96 standard errors from 0: p = 0.05
    assert bootstrap_p(np.array([0.0, 1.0, 2.0]), 1.96) == pytest.approx(0.05, abs=1e-4)
    assert bootstrap_p(np.array([0.0, 1.0, 2.0]), -1.0) == pytest.approx(0.3173, abs=1e-4)
    assert bootstrap_p(np.array([0.5]), 0.0) == 1.0
    assert bootstrap_p(np.array([0.5, 0.5]), 0.5) == 0.0  # no spread: certain


def test_bootstrap_p_is_the_paired_z_test_below_the_resample_floor() -> None:
    # 500 paired 0/1 documents, A right on 60 more: the analytic paired z-test (standard error
    # of the per-document difference) against the p from 20,000 bootstrap resamples; the
    # p is far below 1 / 20,001, the smallest a count of resamples could give
    rng = np.random.default_rng(3)
    b = (rng.random(500) < 0.5).astype(float)
    a = b.copy()
    a[np.flatnonzero(b == 0)[:60]] = 1.0
    diff = a - b
    analytic = math.erfc(abs(diff.mean()) / (diff.std() / math.sqrt(len(diff)) * math.sqrt(2)))
    draws = resample_means({"t": np.stack([a, b], axis=1)}, iters=20_000, seed=0)["t"]
    p = bootstrap_p(draws[:, 0] - draws[:, 1], float(diff.mean()))
    assert analytic < 1e-10
    assert math.log(p) == pytest.approx(math.log(analytic), rel=0.05)


def test_effective_sample_size() -> None:
    assert effective_sample_size([1, 1, 1, 1]) == pytest.approx(4)
    assert effective_sample_size([1e-30, 1.0]) == pytest.approx(1.0)
    assert effective_sample_size([3, 1]) == pytest.approx(1 / (0.75**2 + 0.25**2))
