from __future__ import annotations

import dataclasses
import gzip
import json
import math
import random
from pathlib import Path

import pytest

from layerprune.errors import LayerpruneError
from layerprune.stability import (
    Sample,
    agreement,
    average_over_tasks,
    read_samples,
    stability,
    task_stability,
    write_samples,
)

LN = math.log


def sample(
    doc_id: int, ppl: list[float], tokens: list[int], gold: int, acc: int, norm: int
) -> Sample:
    """A sample whose options have the given per-token perplexities: ll = -tokens * ln(PPL)."""
    return Sample(
        doc_id=doc_id,
        loglikelihoods=[-t * LN(p) for p, t in zip(ppl, tokens, strict=True)],
        tokens=tokens,
        chars=[5 * t for t in tokens],
        gold=gold,
        pred_acc=acc,
        pred_norm=norm,
        prompt_hash=f"h{doc_id}",
    )


# Dense per-token PPLs per doc; the headline weights use their log, the mean NLL per token
# (what OpenCompass stores as "PPL"); ``exp_ppl`` uses the PPLs themselves.
# The PPLs and their population std (ddof=0):
#   doc 3:  [1, 3]        mean 2, deviations ±1          -> s = 1   (ddof=1 would give 1.414)
#   doc 7:  [2, 2]        -> s = 0
#   doc 10: [1, 1, 5, 5]  mean 3, deviations ±2          -> s = 2   (ddof=1 would give 2.309)
# softmax over docs in doc_id order: [e, 1, e^2] / (1 + e + e^2)
#   = [2.718282, 1, 7.389056] / 11.107338 = [0.244728, 0.090031, 0.665241]
W = [math.e / (1 + math.e + math.e**2), 1 / (1 + math.e + math.e**2)]
W.append(math.e**2 / (1 + math.e + math.e**2))
# headline and legacy weights use the per-token NLL ln(PPL): stds ln(3)/2, 0, ln(5)/2,
# so softmax = [sqrt 3, 1, sqrt 5] / (1 + sqrt 3 + sqrt 5) = [0.348633, 0.201284, 0.450083]
WL = [x / (1 + math.sqrt(3) + math.sqrt(5)) for x in (math.sqrt(3), 1, math.sqrt(5))]

# acc picks: doc 3 dense right / pruned wrong (m=0), doc 7 dense right / pruned wrong (m=0),
# doc 10 both wrong with different options (m=1, yet they disagree).
# acc_norm picks: doc 3 both right, doc 7 both right (m=1, 1), doc 10 dense right / pruned wrong.
# Listed out of doc_id order on purpose.
DENSE = [
    sample(10, [1, 1, 5, 5], [1, 2, 3, 1], gold=2, acc=0, norm=2),
    sample(3, [1, 3], [2, 3], gold=0, acc=0, norm=0),
    sample(7, [2, 2], [1, 4], gold=1, acc=1, norm=1),
]
PRUNED = [
    dataclasses.replace(DENSE[1], loglikelihoods=[-9.0, -1.0], pred_acc=1, pred_norm=0),
    dataclasses.replace(DENSE[2], pred_acc=0, pred_norm=1),
    dataclasses.replace(DENSE[0], pred_acc=3, pred_norm=1),
]


def test_weights_by_hand() -> None:
    assert pytest.approx([0.244728, 0.090031, 0.665241], abs=1e-6) == W
    assert pytest.approx([0.348633, 0.201284, 0.450083], abs=1e-6) == WL


def test_stability_acc_where_legacy_differs() -> None:
    # m = [0, 0, 1]: stability = wl[10] = 0.450083; legacy sums the first sum(m) = 1 weight,
    # wl[3] = 0.348633; with exp(NLL) weights it would be w[10] = 0.665241
    assert stability(DENSE, PRUNED) == pytest.approx(0.450083, abs=1e-6)
    assert stability(DENSE, PRUNED) == pytest.approx(WL[2], abs=1e-12)
    assert stability(DENSE, PRUNED, legacy=True) == pytest.approx(WL[0], abs=1e-12)
    assert stability(DENSE, PRUNED, exp_ppl=True) == pytest.approx(W[2], abs=1e-12)
    assert agreement(DENSE, PRUNED) == 0.0


def test_stability_norm_where_legacy_agrees() -> None:
    # m = [1, 1, 0]: the matching docs are the leading ones, so both sum the weights of docs
    # 3 and 7: 0.549917 (0.334759 with the exp(NLL) weights)
    assert stability(DENSE, PRUNED, norm=True) == pytest.approx(0.549917, abs=1e-6)
    assert stability(DENSE, PRUNED, norm=True, legacy=True) == pytest.approx(0.549917, abs=1e-6)
    assert stability(DENSE, PRUNED, norm=True, exp_ppl=True) == pytest.approx(W[0] + W[1])
    assert agreement(DENSE, PRUNED, norm=True) == pytest.approx(2 / 3)


def test_identical_runs_are_fully_stable() -> None:
    assert stability(DENSE, DENSE) == pytest.approx(1.0)
    assert agreement(DENSE, DENSE) == 1.0


def test_weights_come_from_the_dense_model_only() -> None:
    # the pruned loglikelihoods of doc 3 were changed above; swapping the roles changes w
    assert stability(PRUNED, DENSE) != pytest.approx(stability(DENSE, PRUNED))


def naive_stability(
    dense: list[Sample], pruned: list[Sample], norm: bool, legacy: bool, exp_ppl: bool = False
) -> float:
    """The definition written out with math, one doc at a time."""
    d = sorted(dense, key=lambda s: s.doc_id)
    p = {s.doc_id: s for s in pruned}
    spreads = []
    for s in d:
        nll = [-ll / t for ll, t in zip(s.loglikelihoods, s.tokens, strict=True)]
        ppl = [math.exp(x) for x in nll] if exp_ppl else nll
        mean = sum(ppl) / len(ppl)
        spreads.append(math.sqrt(sum((x - mean) ** 2 for x in ppl) / len(ppl)))
    top = max(spreads)
    exps = [math.exp(x - top) for x in spreads]
    weights = [x / sum(exps) for x in exps]
    matches = [(s.pred(norm) == s.gold) == (p[s.doc_id].pred(norm) == s.gold) for s in d]
    if legacy:
        return sum(weights[: sum(matches)])
    return sum(w for w, m in zip(weights, matches, strict=True) if m)


@pytest.mark.parametrize("seed", range(5))
def test_random_cases_match_the_naive_loop(seed: int) -> None:
    rng = random.Random(seed)
    dense, pruned = [], []
    for doc_id in rng.sample(range(1000), 40):
        k = rng.randint(2, 5)
        lls = [-rng.uniform(0.5, 12.0) for _ in range(k)]
        tokens = [rng.randint(1, 6) for _ in range(k)]
        gold = rng.randrange(k)
        picks = [rng.randrange(k) for _ in range(4)]
        d = Sample(doc_id, lls, tokens, [3 * t for t in tokens], gold, *picks[:2], "x")
        dense.append(d)
        pruned.append(dataclasses.replace(d, pred_acc=picks[2], pred_norm=picks[3]))
    for norm in (False, True):
        for legacy in (False, True):
            got = stability(dense, pruned, norm=norm, legacy=legacy)
            assert got == pytest.approx(naive_stability(dense, pruned, norm, legacy), abs=1e-12)
        got = stability(dense, pruned, norm=norm, exp_ppl=True)
        assert got == pytest.approx(naive_stability(dense, pruned, norm, False, True), abs=1e-12)


def test_task_summary_and_mean_over_tasks() -> None:
    one = task_stability(DENSE, PRUNED)
    ci = one.pop("stability_ci")
    assert one == pytest.approx(
        {
            "agreement": 0.0,
            "stability": WL[2],
            "stability_ess": 1 / sum(w * w for w in WL),
            "stability_legacy": WL[0],
            "stability_exp_ppl": W[2],
            # acc: docs 3 and 7 right -> wrong, doc 10 wrong both times
            "right_to_wrong": 2,
            "wrong_to_right": 0,
            "mcnemar_p": 0.5,  # 2 * P(Bin(2, 1/2) <= 0) = 2 / 4
            "n": 3,
        }
    )
    assert 0 <= ci["lo"] <= WL[2] <= ci["hi"] <= 1
    two = task_stability(DENSE, DENSE)
    # plain mean over tasks, not weighted by doc count; counts add up
    mean = average_over_tasks({"a": one, "b": two})
    assert mean == pytest.approx(
        {
            "agreement": 0.5,
            "stability": (WL[2] + 1) / 2,
            "stability_legacy": (WL[0] + 1) / 2,
            "stability_exp_ppl": (W[2] + 1) / 2,
            "right_to_wrong": 2,
            "wrong_to_right": 0,
            "mcnemar_p": 0.5,
            "n": 6,
        }
    )
    with pytest.raises(LayerpruneError, match="no tasks to average"):
        average_over_tasks({})


def test_lm_eval_predictions() -> None:
    # ll / chars = [-2, -0.6, -3]: acc picks option 2 (ll -3), acc_norm option 1
    s = Sample.from_scores(1, [-4.0, -6.0, -3.0], [1, 1, 1], [2, 10, 1], gold=1, prompt_hash="h")
    assert (s.pred_acc, s.pred_norm) == (2, 1)
    # ties go to the first option, as numpy's argmax does in lm-eval
    tie = Sample.from_scores(2, [-1.0, -1.0], [1, 1], [1, 1], gold=0, prompt_hash="h")
    assert (tie.pred_acc, tie.pred_norm) == (0, 0)


def test_mismatched_runs_are_clear_errors() -> None:
    other = [*PRUNED[:2], dataclasses.replace(PRUNED[2], doc_id=11)]
    with pytest.raises(LayerpruneError, match="doc 10 is missing from the pruned samples"):
        agreement(DENSE, other)
    with pytest.raises(LayerpruneError, match="doc 3 is missing from the dense samples"):
        stability(DENSE[:1] + DENSE[2:], PRUNED)
    three = sample(7, [2, 2, 2], [1, 1, 1], gold=1, acc=1, norm=1)
    with pytest.raises(LayerpruneError, match="doc 7 has 2 options in the dense samples but 3"):
        agreement(DENSE, [PRUNED[0], three, PRUNED[2]])
    rehashed = [PRUNED[0], PRUNED[1], dataclasses.replace(PRUNED[2], prompt_hash="other")]
    with pytest.raises(LayerpruneError, match="doc 10 differs between runs"):
        stability(DENSE, rehashed)
    with pytest.raises(LayerpruneError, match="pruned samples list doc 3 more than once"):
        agreement(DENSE, [*PRUNED, PRUNED[0]])
    with pytest.raises(LayerpruneError, match="no samples to compare"):
        agreement([], [])
    with pytest.raises(LayerpruneError, match=r"gold=2 is not an option index 0\.\.1"):
        sample(1, [1, 2], [1, 1], gold=2, acc=0, norm=0)


def test_gzip_round_trip(tmp_path: Path) -> None:
    path = write_samples(tmp_path / "runs" / "arc_easy.jsonl.gz", DENSE)
    assert read_samples(path) == DENSE
    with gzip.open(path, "rt") as f:
        rows = [json.loads(line) for line in f]
    assert rows[0] == dataclasses.asdict(DENSE[0]) and len(rows) == 3
    first = path.read_bytes()
    write_samples(path, DENSE)
    assert path.read_bytes() == first  # no timestamp: same samples, same bytes
    assert [p.name for p in path.parent.iterdir()] == ["arc_easy.jsonl.gz"]  # no temp left


def test_bad_sample_files(tmp_path: Path) -> None:
    with pytest.raises(LayerpruneError, match=r"samples file '.*nope\.jsonl\.gz' does not exist"):
        read_samples(tmp_path / "nope.jsonl.gz")
    path = tmp_path / "bad.jsonl.gz"
    row = json.dumps(DENSE[0].to_dict())
    path.write_bytes(gzip.compress(f'{row}\n{{"doc_id": 1}}\n'.encode()))
    with pytest.raises(LayerpruneError, match="line 2 is not a sample"):
        read_samples(path)
    path.write_bytes(b"plain text")
    with pytest.raises(LayerpruneError, match="is not complete gzip"):
        read_samples(path)
