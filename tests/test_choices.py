"""How much a criterion's choice depends on its calibration, against hand-counted examples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from layerprune.choices import choices_markdown, jaccard, spans
from layerprune.report import load_runs, main

from .test_report import write_samples_run


def test_spans_and_jaccard_by_hand() -> None:
    assert spans([26, 3, 12, 13, 14, 15, 16, 17, 25]) == "3,12-17,25,26"
    assert spans([1, 2]) == "1,2" and spans([]) == ""
    assert jaccard({1, 2, 3}, {2, 3, 4}) == 0.5 and jaccard([], []) == 1.0


def calibration_run(
    root: Path, name: str, text: str, seed: int, layers: list[int], right: int
) -> None:
    """A criterion's run on calibration ``text`` drawn with ``seed``: it removed ``layers`` and
    was right on ``right`` of 40 documents."""
    write_samples_run(root, name, "shortgpt", right, samples=True, created=f"2026-01-0{seed + 1}")
    path = root / name / "metrics.json"
    record = json.loads(path.read_text())
    record["config"]["calibration"] = {"path": f"/mirror/text/{text}.txt", "n": 16, "seed": seed}
    record["plan"]["removed_layers"] = layers
    path.write_text(json.dumps(record))


def five_runs(root: Path) -> None:
    """[3, 4] from wiki (seeds 0 and 1) and code, [3, 5] from c4 (seeds 0 and 1)."""
    for name, text, seed, layers, right in [
        ("a", "wiki", 0, [3, 4], 30), ("b", "wiki", 1, [3, 4], 30), ("c", "c4", 0, [3, 5], 20),
        ("d", "c4", 1, [3, 5], 20), ("e", "code", 0, [3, 4], 30),
    ]:  # fmt: skip
        calibration_run(root, name, text, seed, layers, right)


def test_agreement_plans_and_cost_by_hand(tmp_path: Path) -> None:
    five_runs(tmp_path)
    text = choices_markdown(load_runs([tmp_path]), ["calibration.path", "calibration.n"])
    # 10 pairs: 4 of equal plans (1 each), 6 of [3,4] vs [3,5] (1/3 each): 6/10 = 0.60; the
    # pairs that differ only in the seed (wiki, c4) are equal plans: 1.00. [3,4] is picked by
    # 3 of 5 runs (75.0% right); [3,5] is right on 20 of 40: 25 points below, paired.
    summary = next(line for line in text.splitlines() if line.startswith("| tiny |"))
    assert summary.startswith("| tiny | 25% layers | shortgpt | 5 | 2 | 0.60 | 1.00 | 3,4 (3/5) |")
    assert "| 75.0 | -25.0 [" in summary
    rows = [line for line in text.splitlines() if line.startswith("| 3,")]
    assert rows[0].startswith(
        "| 3,4 | code 16 calibration.seed 0; wiki 16 calibration.seed 0; wiki 16 calibration.seed 1"
        " | 75.0 ± "
    )
    assert rows[0].endswith(" | – |")
    assert rows[1].startswith(
        "| 3,5 | c4 16 calibration.seed 0; c4 16 calibration.seed 1 | 50.0 ± "
    )
    # the bootstrap half-widths, near the normal approximation 1.96 sqrt(p (1 - p) / 40)
    halves = [float(row.split(" ± ")[1].split(" |")[0]) for row in rows]
    assert halves == pytest.approx([13.4, 15.5], abs=1.0)
    lo, hi = (float(x) for x in rows[1].split("[")[1].rstrip(" |]").split(","))
    assert -50 < lo < -25 < hi < 0  # 10 of 40 documents flip: decided


def test_a_tie_is_named_and_broken_by_the_lower_layers(tmp_path: Path) -> None:
    calibration_run(tmp_path, "a", "wiki", 0, [3, 5], 20)
    calibration_run(tmp_path, "b", "wiki", 1, [3, 4], 30)
    text = choices_markdown(load_runs([tmp_path]), ["calibration.path"])
    assert "| 2 | 2 | 0.33 | 0.33 | 3,4 (1/2, tie) | 75.0 | -25.0 [" in text


def test_the_report_writes_choices_and_curves_over_a_setting(tmp_path: Path) -> None:
    five_runs(tmp_path / "runs")
    out = tmp_path / "out"
    group = ["--group-by", "calibration.path,calibration.n"]
    main([str(tmp_path / "runs"), "--out", str(out), *group, "--choices"])
    assert (out / "choices.md").read_text().startswith("# How much each criterion's choice")
    for name, tokens in [("f", 50_000), ("g", 1_000_000)]:
        write_samples_run(tmp_path / "budget", name, "streamline_layer", 25, samples=True)
        path = tmp_path / "budget" / name / "metrics.json"
        record = json.loads(path.read_text())
        record["config"]["recovery"] = {"budget": {"tokens": tokens}}
        path.write_text(json.dumps(record))
    write_samples_run(tmp_path / "budget", "control", "streamline_removal", 20, samples=True)
    over = ["--group-by", "recovery.budget.tokens", "--curve-over", "recovery.budget.tokens"]
    main([str(tmp_path / "budget"), "--out", str(out), *over])
    assert (out / "curve_tiny_layer_ratio_0.25_recovery.budget.tokens.png").stat().st_size > 0
    assert not (out / "curve_tiny_layer_ratio.png").exists()
    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path / "budget"), "--out", str(out), "--curve-over", "seed"])
    assert stop.value.code == 2
