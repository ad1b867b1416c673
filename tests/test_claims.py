"""Claims marked from paired intervals, on hand-made run folders with known answers."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from layerprune.claims import (
    CLAIMS,
    Claim,
    claims_table,
    decide,
    paired_perplexity,
    paired_stability,
)
from layerprune.report import load_runs, load_side, main
from layerprune.stability import read_samples, stability, write_samples

from .test_report import write_run, write_samples_run

ACC = Claim("a beats b", "a", "b", "accuracy")
PPL = Claim("a beats b", "a", "b", "perplexity")
CLOSE = Claim("a comes close to b", "a", "b", "accuracy", margin=0.02)


def test_verdicts_read_only_the_interval() -> None:
    assert decide(ACC, 0.05, (0.01, 0.09)) == "supported"
    assert decide(ACC, -0.05, (-0.09, -0.01)) == "contradicted"
    assert decide(ACC, 0.05, (-0.01, 0.09)) == "undecided"  # holds 0
    assert decide(ACC, 0.0, (math.nan, math.nan)) == "undecided"
    assert decide(PPL, 0.8, (0.7, 0.9)) == "supported"  # a's perplexity below b's
    assert decide(PPL, 1.2, (1.1, 1.3)) == "contradicted"
    assert decide(PPL, 1.0, (0.9, 1.1)) == "undecided"
    assert decide(CLOSE, -0.01, (-0.015, 0.0)) == "supported"  # trails by less than 2 points
    assert decide(CLOSE, -0.05, (-0.07, -0.03)) == "contradicted"
    assert decide(CLOSE, -0.02, (-0.03, -0.01)) == "undecided"


def with_windows(folder: Path, nll: list[float], tokens: list[int]) -> None:
    record = json.loads((folder / "metrics.json").read_text())
    record["eval"]["perplexity"] = {
        "wikitext2": {
            "dense": {"ppl": 10.0},
            "pruned": {"ppl": math.exp(sum(nll) / sum(tokens)), "window_nll": nll,
                       "window_tokens": tokens, "seq_len": 8},
        }
    }  # fmt: skip
    (folder / "metrics.json").write_text(json.dumps(record))


def test_perplexity_ratio_is_paired_over_windows(tmp_path: Path) -> None:
    tokens = [8, 8, 8, 4]
    b_nll = [20.0, 12.0, 30.0, 9.0]
    a = write_run(tmp_path, "a", "a", 0.25, {"piqa": 0.5})
    b = write_run(tmp_path, "b", "b", 0.25, {"piqa": 0.5})
    # a is better by exactly 0.25 nats on every token: the ratio is exp(-0.25) on any resample
    with_windows(a, [x - 0.25 * t for x, t in zip(b_nll, tokens, strict=True)], tokens)
    with_windows(b, b_nll, tokens)
    runs = {r["config"]["method"]: r for r in load_runs([tmp_path])}
    ((value, (lo, hi)),) = paired_perplexity(runs["a"], runs["b"]).values()
    assert value == pytest.approx(math.exp(-0.25)) and lo == pytest.approx(hi)
    assert lo == pytest.approx(math.exp(-0.25))
    # the same windows' perplexities unpaired: a's 3.0 nats/token over b's, by hand
    b_ppl = math.exp(sum(b_nll) / sum(tokens))
    assert value == pytest.approx(math.exp(sum(b_nll) / sum(tokens) - 0.25) / b_ppl)
    with_windows(b, b_nll[:3], tokens[:3])  # other windows: not comparable
    runs = {r["config"]["method"]: r for r in load_runs([tmp_path])}
    assert paired_perplexity(runs["a"], runs["b"]) == {}


def test_a_perplexity_on_the_text_a_side_trained_on_draws_no_verdict(tmp_path: Path) -> None:
    tokens, b_nll = [8, 8, 8], [20.0, 12.0, 30.0]
    a = write_run(tmp_path, "a", "a", 0.25, {"piqa": 0.5})
    b = write_run(tmp_path, "b", "b", 0.25, {"piqa": 0.5})
    with_windows(a, [x - 0.25 * t for x, t in zip(b_nll, tokens, strict=True)], tokens)
    with_windows(b, b_nll, tokens)

    def verdict() -> str:
        (row,) = claims_table(load_runs([tmp_path]), [PPL]).rows
        return str(row["Verdict"])

    assert verdict() == "supported"  # a is better on every window
    record = json.loads((a / "metrics.json").read_text())
    record["eval"]["perplexity"]["wikitext2"]["pruned"]["path"] = "/m/wiki.txt"

    def trained_on(path: str) -> None:
        record["config"]["recovery"] = {"train_data": {"path": path}}
        (a / "metrics.json").write_text(json.dumps(record))

    trained_on("/m/other.txt")
    assert verdict() == "supported"  # trained on another text: held out
    trained_on("/m/wiki.txt")
    assert verdict() == "in-sample"
    # an older record: one text's sides directly, named by its file's stem
    text = record["eval"]["perplexity"].pop("wikitext2")
    text["pruned"]["path"] = "/m/wikitext2.txt"
    record["eval"]["perplexity"] = text
    trained_on("/m/wikitext2.txt")
    assert verdict() == "in-sample"


def test_the_table_marks_each_claim_from_the_samples(tmp_path: Path) -> None:
    # 40 piqa documents, the dense model right on 28: Streamline right on 30, ShortGPT on 10
    write_samples_run(tmp_path, "s", "streamline_layer", 30, samples=True)
    write_samples_run(tmp_path, "g", "shortgpt", 10, samples=True)
    write_samples_run(tmp_path, "l", "sleb", 10, samples=True)
    runs = load_runs([tmp_path])
    rows = claims_table(runs).rows
    by = {(r["A"], r["Measure"]): r for r in rows}
    accuracy = by["streamline_layer", "accuracy"]
    assert (accuracy["A − B"], accuracy["Verdict"]) == ("+50.0", "supported")
    # stability, by the independent function: equal weights, so the share of docs where both
    # models are right or both wrong: 38/40 for Streamline, 22/40 for ShortGPT
    named = {r["config"]["method"]: r for r in runs}
    dense = load_side(named["shortgpt"], "dense", "piqa")
    assert dense is not None
    expected = [stability(dense, load_side(named[m], "pruned", "piqa") or []) for m in
                ("streamline_layer", "shortgpt")]  # fmt: skip
    assert expected == pytest.approx([38 / 40, 22 / 40])
    stab = by["streamline_layer", "stability"]
    assert stab["A − B"] == f"{100 * (expected[0] - expected[1]):+.1f}" == "+40.0"
    assert stab["Verdict"] == "supported"
    # SLEB has no perplexity windows in these records and replaceme was not run: gaps; a claim
    # neither of whose sides was run is a gap row too, one per side pair and measure
    assert by["sleb", "perplexity"]["Verdict"] == "gap"
    assert by["replaceme (not run)", "accuracy"]["Verdict"] == "gap"
    assert by["gromov (not run)", "perplexity"]["B"] == "gromov_removal (not run)"
    assert by["trained replacement (not run)", "accuracy"]["Verdict"] == "gap"
    assert {r["Claim"] for r in rows} == {c.text for c in CLAIMS}
    assert len(rows) == len(CLAIMS) == 14
    main([str(tmp_path), "--out", str(tmp_path / "out")])
    text = (tmp_path / "out" / "claims.md").read_text()
    assert "- tiny: 2 supported, 0 contradicted, 0 undecided, 12 gap." in text


def test_runs_on_other_documents_are_not_compared(tmp_path: Path) -> None:
    write_samples_run(tmp_path, "s", "streamline_layer", 30, samples=True)
    write_samples_run(tmp_path, "g", "shortgpt", 10, samples=True)
    path = tmp_path / "g" / "samples" / "pruned" / "piqa.jsonl.gz"
    moved = [dataclasses.replace(s, doc_id=s.doc_id + 100) for s in read_samples(path)]
    write_samples(path, moved)
    named = {r["config"]["method"]: r for r in load_runs([tmp_path])}
    assert paired_stability(named["streamline_layer"], named["shortgpt"]) is None
    rows = claims_table(list(named.values())).rows
    assert {r["Verdict"] for r in rows if r["A"] == "streamline_layer"} == {"gap"}
