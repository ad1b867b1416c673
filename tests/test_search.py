"""The budgeted search: its candidates are the scorers' own plans, its choice is the plan of
least held-out KL recomputed by hand on pruned copies, and its statistics are right."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

import layerprune as lp
import layerprune.models
from layerprune import report
from layerprune.app import run
from layerprune.calibration import TextFile
from layerprune.errors import LayerpruneError
from layerprune.models import LoadedModel
from layerprune.pipeline import NoEvaluator
from layerprune.search import (
    BudgetResult,
    Candidate,
    SearchSettings,
    evaluated_ranks,
    front,
    heldout_windows,
    search,
    search_record,
    spearman,
)
from layerprune.search_report import search_table
from layerprune.surgery import remove_layers

from .conftest import MIRROR, compose_config, load
from .test_app import TINY

SEARCH = [
    *TINY, "experiment=search", "sparsity_unit=layers", "search.budgets=[1,2]",
    "search.scorers=[block_influence,streamline,random,sleb,ppl]", "search.random_seeds=[0,1]",
    "search.heldout=3", "search.top_k=2", "search.prefill_repeats=1",
    "+search.settings.ppl.keep_first=1", "+search.settings.ppl.keep_last=1",
]  # fmt: skip


@torch.no_grad()
def kl_and_ppl_by_hand(model: torch.nn.Module, removed: list[int], ids: torch.Tensor) -> tuple:
    """Mean KL(dense || pruned) per predicted token and the pruned perplexity, from the two
    models' own logits."""
    pruned = copy.deepcopy(model)
    remove_layers(pruned, removed)
    p = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1)
    q = torch.log_softmax(pruned(input_ids=ids).logits[:, :-1].float(), -1)
    n = ids.numel() - ids.shape[0]
    kl = float((p.exp() * (p - q)).sum()) / n
    nll = -float(q.gather(-1, ids[:, 1:].unsqueeze(-1)).sum()) / n
    return kl, math.exp(nll)


def test_the_search_picks_the_plan_of_least_heldout_kl(tmp_path: Path) -> None:
    cfg = compose_config([*SEARCH, f"paths.cache={tmp_path / 'cache'}"])
    record = run(cfg, tmp_path)
    assert record == json.loads((tmp_path / "search.json").read_text())
    assert (tmp_path / "search.md").is_file() and (tmp_path / "search.png").is_file()
    # its cost is recorded and stated (eval=none: no dense evaluation)
    assert record["timings"]["total"] >= record["timings"]["search"] > 0
    assert record["threads"] == torch.get_num_threads()
    peak = record["peak_memory_gib"]["cpu_rss"]
    assert 0.1 < peak < 24 and f"; peak resident memory {peak:.1f} GiB" in search_table(record)
    # layerprune-report writes the same table and figure from search.json alone, and does not
    # take the search's folder for an unfinished run
    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(cfg, tmp_path / ".hydra" / "config.yaml")
    assert report.load_runs([tmp_path]) == []
    report.main([str(tmp_path), "--out", str(tmp_path / "report")])
    for name in ("search.md", "search.png"):
        assert (tmp_path / "report" / name).read_bytes() == (tmp_path / name).read_bytes()
    loaded = load("tiny_llama")
    calibration = TextFile(n=4, seq_len=32, path=str(MIRROR / "text" / "wiki.txt"))
    scored = calibration.windows(loaded.tokenizer)
    heldout = heldout_windows(calibration, loaded.tokenizer, 3)
    assert not {tuple(r.tolist()) for r in heldout} & {tuple(r.tolist()) for r in scored}
    stats = lp.score(loaded, scored, batch_size=2)
    for budget, k in zip(record["budgets"], (1, 2), strict=True):
        # the candidates are exactly the proposers' own plans
        want = {tuple(lp.plan(loaded, stats, s, k, "layers").removed_layers)
                for s in (lp.BlockInfluence("independent"), lp.BlockInfluence("contiguous"),
                          lp.Streamline("independent"), lp.Streamline("contiguous"),
                          lp.Random(0), lp.Random(1), lp.Random(0, "contiguous"),
                          lp.Random(1, "contiguous"))}  # fmt: skip
        for scorer in (lp.SLEB(), lp.PPLCriterion(1, 1)):
            measured = lp.measure(loaded, scored, scorer, k, "layers")
            want.add(tuple(lp.plan(loaded, measured, scorer, k, "layers").removed_layers))
        got = {tuple(c["removed"]) for c in budget["candidates"]}
        assert got == want
        # every candidate's proxy equals a pruned copy's, and the chosen one is the least KL
        by_hand = {tuple(c["removed"]): kl_and_ppl_by_hand(loaded.model, c["removed"], heldout)
                   for c in budget["candidates"]}  # fmt: skip
        for c in budget["candidates"]:
            assert (c["kl"], c["ppl"]) == pytest.approx(by_hand[tuple(c["removed"])], rel=1e-4)
        best = min(by_hand, key=lambda r: by_hand[r][0])
        assert tuple(budget["chosen"]["removed"]) == best
        timed = [c for c in budget["candidates"] if c["prefill_s"] is not None]
        assert len(timed) == 2 and timed == budget["candidates"][:2]
        assert all(c["accuracy"] is None for c in budget["candidates"])  # eval=none
    assert record["quality"] == "minus held-out perplexity"


class StubEvaluator:
    """Accuracy = 1 - KL by hand, so that the proxy ranks the evaluated plans perfectly."""

    def __init__(self, heldout: torch.Tensor, dense: torch.nn.Module) -> None:
        self.heldout, self.dense_model, self.seen = heldout, dense, 0

    def dense(self, loaded: LoadedModel, stage: Any = None) -> bool:
        return False

    def pruned(
        self, loaded: LoadedModel, out: Path, stage: Any = None, removed: Any = None
    ) -> dict[str, Any]:
        self.seen += 1
        kept = loaded.model.config.layerprune["kept_layers"]
        assert removed == [i for i in range(6) if i not in kept]  # a plain removal, named
        kl, _ = kl_and_ppl_by_hand(self.dense_model, removed, self.heldout)
        return {"eval": {"average": {"pruned": 1 - kl}}}

    def table(self, evaluated: dict[str, Any]) -> str:
        return ""

    @property
    def lm_eval_results(self) -> Any:
        return None


def test_the_top_plans_are_evaluated_and_the_proxy_correlates(tmp_path: Path) -> None:
    loaded = load("tiny_llama")
    calibration = TextFile(n=4, seq_len=32, path=str(MIRROR / "text" / "wiki.txt"))
    heldout = heldout_windows(calibration, loaded.tokenizer, 3)
    evaluator = StubEvaluator(heldout, loaded.model)
    proposers = [(f"random/{s}", lp.Random(s)) for s in range(6)]
    settings = SearchSettings(budgets=(2,), unit="layers", heldout=3, top_k=4, prefill_repeats=1)
    results = search(loaded, calibration, proposers, settings, evaluator, tmp_path,
                     cache_dir=str(tmp_path / "cache"))  # fmt: skip
    evaluated = [c for c in results[0].candidates if c.accuracy is not None]
    assert evaluator.seen == len(evaluated) == min(4, len(results[0].candidates)) >= 3
    assert results[0].to_dict()["spearman_proxy_accuracy"] == pytest.approx(1.0)
    record = search_record(loaded, results, {})
    assert record["quality"] == "evaluation average"
    # the parameter front of plans removing the same number of layers: the most accurate
    assert [c["removed"] for c in record["front_params"]] == [evaluated[0].removed]


def test_a_spread_of_ranks_is_evaluated_and_the_headline_is_the_mean_per_budget(
    tmp_path: Path,
) -> None:
    loaded = load("tiny_llama")
    calibration = TextFile(n=4, seq_len=32, path=str(MIRROR / "text" / "wiki.txt"))
    heldout = heldout_windows(calibration, loaded.tokenizer, 3)
    evaluator = StubEvaluator(heldout, loaded.model)
    proposers = [(f"random/{s}", lp.Random(s)) for s in range(8)]
    settings = SearchSettings(budgets=(1, 2), unit="layers", heldout=3, top_k=3,
                              prefill_repeats=1, evaluate="spread")  # fmt: skip
    results = search(loaded, calibration, proposers, settings, evaluator, tmp_path,
                     cache_dir=str(tmp_path / "cache"))  # fmt: skip
    for result in results:
        n = len(result.candidates)
        assert n > 3 and result.evaluated == evaluated_ranks(n, 3, "spread")
        assert result.evaluated[0] == 0 and result.evaluated[-1] == n - 1
        got = [i for i, c in enumerate(result.candidates) if c.accuracy is not None]
        assert got == result.evaluated
    record = search_record(loaded, results, {})
    rhos = [b["spearman_proxy_accuracy"] for b in record["budgets"]]
    assert rhos == pytest.approx([1.0, 1.0])
    assert record["spearman_proxy_accuracy"] == pytest.approx(1.0)
    table = search_table(record)
    assert f"Timed and evaluated: ranks 1, {results[0].evaluated[1] + 1}, " in table
    assert "(spread over the ranks)" in table and "mean over budgets: 1.000" in table


def test_the_presets_plans_are_evaluated_too_and_compared_with_the_chosen_one(
    tmp_path: Path,
) -> None:
    from layerprune.evaluation import EvalSuite, Evaluator
    from layerprune.stability import read_samples

    from .test_evaluation import local_task

    loaded = load("tiny_llama")
    calibration = TextFile(n=4, seq_len=32, path=str(MIRROR / "text" / "wiki.txt"))
    suite = EvalSuite(tasks=["tiny_mc"], batch_size=4, include_path=str(local_task(tmp_path)))
    proposers = [(f"random/{s}", lp.Random(s)) for s in range(6)]
    settings = SearchSettings(budgets=(2,), unit="layers", heldout=3, top_k=1,
                              prefill_repeats=1, also_evaluate=("random/5",))  # fmt: skip

    def searched(out: Path) -> list[Candidate]:
        evaluator = Evaluator(suite, MIRROR, tmp_path / "cache")
        evaluator.dense(loaded)
        (result,) = search(loaded, calibration, proposers, settings, evaluator, out,
                           cache_dir=str(tmp_path / "cache"))  # fmt: skip
        return result.candidates

    order = searched(tmp_path / "first")
    other = next(i for i, c in enumerate(order) if "random/5" in c.proposers)
    assert other > 0, "pick a proposer whose plan is not the chosen one"
    evaluated = [i for i, c in enumerate(order) if c.evaluation is not None]
    assert evaluated == [0, other] and order[0].vs_chosen is None

    # the paired difference by hand: per document, correct minus the chosen plan's correct
    def correct(rank: int) -> dict[int, float]:
        path = tmp_path / "first" / f"budget-2/rank{rank + 1}/samples/pruned/tiny_mc.jsonl.gz"
        return {s.doc_id: float(s.pred_acc == s.gold) for s in read_samples(path)}

    mine, chosen = correct(other), correct(0)
    by_hand = sum(mine[d] - chosen[d] for d in chosen) / len(chosen)
    paired = order[other].vs_chosen
    assert paired is not None and paired["delta"] == pytest.approx(by_hand)
    assert paired["delta"] == pytest.approx(order[other].accuracy - order[0].accuracy)
    assert paired["lo"] <= paired["delta"] <= paired["hi"]
    row = next(line for line in search_table(search_record(loaded, [BudgetResult(
        2, 2, order, {}, [0, other], "top", ("random/5",))], {})).splitlines()
        if line.startswith(f"| {other + 1} |"))  # fmt: skip
    assert f"{100 * paired['delta']:+.1f} [{100 * paired['lo']:+.1f}, " in row
    # started again (another folder), the search reads both evaluations back from the cache
    again = searched(tmp_path / "again")
    assert [c.evaluation["pruned_from_cache"] for c in again if c.evaluation] == [True, True]
    assert again[other].vs_chosen == paired


def test_evaluated_ranks() -> None:
    assert evaluated_ranks(10, 3, "top") == [0, 1, 2]
    assert evaluated_ranks(10, 3, "spread") == [0, 4, 9]
    assert evaluated_ranks(2, 3, "spread") == [0, 1]
    assert evaluated_ranks(5, 1, "spread") == [0]
    assert evaluated_ranks(0, 3, "top") == []


def test_a_budget_no_proposer_reaches_is_recorded_without_candidates(tmp_path: Path) -> None:
    loaded = load("tiny_llama")
    calibration = TextFile(n=4, seq_len=32, path=str(MIRROR / "text" / "wiki.txt"))
    settings = SearchSettings(budgets=(1, 5), unit="layers", heldout=3, top_k=2,
                              prefill_repeats=1)  # fmt: skip
    results = search(loaded, calibration, [("ppl", lp.PPLCriterion(1, 1))], settings,
                     NoEvaluator(), tmp_path, cache_dir=str(tmp_path / "cache"))  # fmt: skip
    assert [len(r.candidates) for r in results] == [1, 0]
    assert results[1].chosen is None and results[1].evaluated == []
    assert results[1].skipped == {"ppl": "removes at most 4 of 6 layers"}
    record = search_record(loaded, results, {})
    assert record["budgets"][1]["chosen"] is None
    assert "Not proposed: {'ppl': 'removes at most 4 of 6 layers'}" in search_table(record)


def test_spearman_and_front_on_hand_examples() -> None:
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties share their mid-rank: ranks x = 1.5, 1.5, 3, 4 against y = 1, 2, 3, 4
    assert spearman([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)
    assert spearman([1, 2], [1, 2]) is None and spearman([1, 1, 1], [1, 2, 3]) is None
    points = [(1.0, 0.5), (2.0, 0.7), (2.0, 0.6), (3.0, 0.7), (0.5, 0.1)]
    assert front(points) == [4, 0, 1]
    assert Candidate([1], ["x"], 10).to_dict()["removed"] == [1]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("search.budgets=[]", "search.budgets: []; allowed: a non-empty list of sparsities"),
        ("search.budgets=[1.5]", "search.budgets: [1.5]; allowed: whole numbers of layers >= 1"),
        ("search.scorers=[bogus]", "search.scorers: ['bogus']; allowed: a non-empty list of"),
        ("search.top_k=0", "search.top_k: 0; allowed: an integer >= 1"),
        ("search.evaluate=all", "search.evaluate: all; allowed: top, spread"),
        ("+search.settings.angular.x=1", "search.settings: {'ppl': {'keep_first': 1, "),
        ("search.also_evaluate=3", "search.also_evaluate: 3; allowed: a list of proposer labels"),
        (
            "search.also_evaluate=[ppl/contiguous]",
            "search.also_evaluate: ['ppl/contiguous']; "
            "allowed: labels of this search's proposers: block_influence/independent, ",
        ),
    ],
)
def test_bad_search_settings_fail_before_any_model(
    override: str, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a model was loaded before the search settings were checked")

    monkeypatch.setattr(layerprune.models, "random_init", fail)
    with pytest.raises(LayerpruneError) as err:
        run(compose_config([*SEARCH, override]), tmp_path)
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value)


def test_the_table_gives_each_evaluated_plans_perplexities_and_the_dense_model() -> None:
    def ppl(value: float, lo: float, hi: float) -> dict[str, Any]:
        return {"ppl": value, "ci": {"lo": lo, "hi": hi}}

    evaluation = {
        "average": {"dense": 0.5, "pruned": 0.4, "dense_ci": {"lo": 0.48, "hi": 0.52},
                    "pruned_ci": {"lo": 0.37, "hi": 0.43}},
        "perplexity": {
            "wikitext2": {"dense": ppl(20.0, 19.0, 21.0), "pruned": ppl(40.0, 37.0, 45.0)},
            "c4": {"dense": ppl(30.0, 28.0, 32.0), "pruned": ppl(60.0, 50.0, 70.0)}},
    }  # fmt: skip
    chosen = {"removed": [1], "proposers": ["a"], "params_after": 80, "kl": 0.5, "ppl": 9.0,
              "prefill_s": 1.0, "accuracy": 0.4, "evaluation": evaluation}  # fmt: skip
    other = {**chosen, "removed": [2], "proposers": ["b"], "prefill_s": None, "accuracy": None,
             "evaluation": None, "kl": 0.7}  # fmt: skip
    budget = {"budget": 1, "k": 1, "candidates": [chosen, other], "evaluated_ranks": [1],
              "evaluate": "top", "skipped": {}, "spearman_proxy_accuracy": None}  # fmt: skip
    record = {"model": {"name": "m"}, "params_before": 100, "budgets": [budget],
              "spearman_proxy_accuracy": None, "quality": "evaluation average",
              "front_params": [chosen], "front_prefill": [chosen]}  # fmt: skip
    table = search_table(record)
    assert "Dense model: accuracy 50.0 ± 2.0; wikitext2 20.0 ± 1.0; c4 30.0 ± 2.0." in table
    assert "| Δ vs rank 1 | wikitext2 PPL | c4 PPL |" in table
    assert "| 40.0 ± 3.0 | – | 40.0 ± 4.0 | 60.0 ± 10.0 |" in table  # half-widths of the CIs
    assert "| – | – | – | – |" in table  # the plan that was not evaluated
