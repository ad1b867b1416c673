"""The report's tables, on hand-made run folders whose every number is known."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from layerprune.report import (
    build_table,
    choose,
    load_runs,
    main,
    method_label,
    seed_groups,
    seeds_point,
    to_markdown,
)
from layerprune.stability import Sample, write_samples

DENSE = {"piqa": ("acc", 0.70), "hellaswag": ("acc_norm", 0.50)}


def write_run(
    root: Path,
    name: str,
    method: str,
    amount: float,
    pruned: dict[str, float] | None = None,
    created: str = "2026-01-01T00:00:00+00:00",
    key: str | None = None,
) -> Path:
    """A finished run: 6 layers, 2 removed (30% of the parameters); with ``pruned`` accuracies,
    an evaluation whose dense side is ``DENSE`` (average 0.60, perplexity 10 -> 20)."""
    record: dict[str, Any] = {
        "kind": "layerprune.run",
        "config_hash": key or name,
        "created": created,
        "model": {"name": "tiny"},
        "config": {"model": {"name": "tiny"}, "method": method, "sparsity": amount,
                   "sparsity_unit": "layer_ratio"},
        "plan": {"num_layers": 6, "num_layers_after": 4, "removed_layers": [3, 4],
                 "removed_param_ratio": 0.3},
    }  # fmt: skip
    if pruned is not None:
        average = sum(pruned.values()) / len(pruned)
        rows = [{"task": t, "metric": DENSE[t][0], "dense": DENSE[t][1], "pruned": p}
                for t, p in pruned.items()]  # fmt: skip
        record["eval"] = {
            "tasks": rows,
            "average": {"dense": 0.60, "pruned": average, "delta": average - 0.60},
            "rp": average / 0.60,
            "stability": {
                "agreement": 0.8,
                "stability": 0.9,
                "stability_legacy": 0.7,
                "stability_exp_ppl": 1.0,
                "n": 100,
            },
            "perplexity": {"dense": {"ppl": 10.0}, "pruned": {"ppl": 20.0}},
        }
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(record))
    return folder


TAIL = "| 0.800 | 0.900 | 0.700 | 20.00 |"  # agreement, stability, legacy, perplexity


def table_lines(root: Path) -> list[str]:
    return to_markdown(build_table(choose(load_runs([root])))).splitlines()


def test_table_is_the_hand_computed_one(tmp_path: Path) -> None:
    write_run(tmp_path, "a", "shortgpt", 0.25, {"piqa": 0.60, "hellaswag": 0.40})
    write_run(tmp_path, "b", "random", 0.25, {"piqa": 0.55, "hellaswag": 0.25})
    assert table_lines(tmp_path)[:5] == [
        "| Model | Sparsity | Method | Removed layers | Removed params | piqa "
        "| hellaswag (acc_norm) | Avg | ΔAvg | RP | Agreement | Stability | Stability (legacy) "
        "| PPL |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        "| tiny | 0 | dense | 0 | 0.0 | 70.0 | 50.0 | 60.0 | – | 100.0 | – | – | – | 10.00 |",
        # avg (0.55 + 0.25) / 2 = 0.40, ΔAvg 0.40 - 0.60, RP 0.40 / 0.60
        "| tiny | 25% layers | random | 2 | 30.0 | 55.0 | 25.0 | 40.0 | -20.0 | 66.7 " + TAIL,
        "| tiny | 25% layers | shortgpt | 2 | 30.0 | 60.0 | 40.0 | 50.0 | -10.0 | 83.3 " + TAIL,
    ]


def test_missing_failed_and_unevaluated_runs_are_gaps(tmp_path: Path) -> None:
    write_run(tmp_path, "a", "shortgpt", 0.25, {"piqa": 0.60, "hellaswag": 0.40})
    write_run(tmp_path, "b", "shortgpt", 0.5, {"piqa": 0.50})  # hellaswag not evaluated
    write_run(tmp_path, "c", "random", 0.25)  # eval=none
    failed = tmp_path / "d" / ".hydra"  # a job that started but never wrote metrics.json
    failed.mkdir(parents=True)
    (failed / "config.yaml").write_text(
        "model: {name: tiny}\nmethod: last\nsparsity: 0.25\nsparsity_unit: layer_ratio\n"
    )
    lines = table_lines(tmp_path)
    gaps = "| – " * 11 + "|"
    assert lines[3:8] == [
        "| tiny | 25% layers | last " + gaps,
        "| tiny | 25% layers | random | 2 | 30.0 | – | – | – | – | – | – | – | – | – |",
        "| tiny | 25% layers | shortgpt | 2 | 30.0 | 60.0 | 40.0 | 50.0 | -10.0 | 83.3 " + TAIL,
        "| tiny | 50% layers | last " + gaps,
        "| tiny | 50% layers | random " + gaps,  # never run
    ]
    assert lines[8] == (
        "| tiny | 50% layers | shortgpt | 2 | 30.0 | 50.0 | – | 50.0 | -10.0 | 83.3 " + TAIL
    )
    main([str(tmp_path), "--out", str(tmp_path / "out")])
    with (tmp_path / "out" / "table.csv").open() as f:
        never_run = [row for row in csv.DictReader(f) if row["Method"] == "random"][1]
    assert never_run["piqa"] == never_run["Avg"] == never_run["Removed layers"] == "NaN"


@pytest.mark.parametrize("seed_key", ["seed", "scorer.seed", "calibration.seed"])
def test_several_seeds_are_one_row_of_their_mean_and_spread(tmp_path: Path, seed_key: str) -> None:
    """The run's seed, or only its scorer's or its calibration windows' (the documents stay)."""
    for seed, piqa in enumerate((0.40, 0.50, 0.75)):
        folder = write_run(tmp_path, f"r{seed}", "random", 0.25, {"piqa": piqa},
                           created=f"2026-01-0{seed + 1}T00:00:00+00:00")  # fmt: skip
        record = json.loads((folder / "metrics.json").read_text())
        *parents, leaf = seed_key.split(".")
        node = record["config"]
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = seed
        (folder / "metrics.json").write_text(json.dumps(record))
    write_run(tmp_path, "s", "shortgpt", 0.25, {"piqa": 0.60})
    runs = load_runs([tmp_path])
    table = build_table(choose(runs), (), seed_groups(runs))
    (row,) = [r for r in table.rows if r["Method"].startswith("random")]
    assert row["Method"] == "random (3 seeds)"
    assert row["piqa"] == pytest.approx(0.55)
    # sample standard deviation by hand: deviations -0.15, -0.05, +0.20
    assert row["piqa ±"] == pytest.approx(((0.15**2 + 0.05**2 + 0.20**2) / 2) ** 0.5)
    assert row["Removed layers"] == 2 and "piqa †" not in row
    point = seeds_point(seed_groups(runs)[("tiny", "layer_ratio", 0.25, "random")], "Avg")
    assert point == pytest.approx((0.55, row["piqa ±"], row["piqa ±"]))  # the curve's point
    line = next(x for x in to_markdown(table).splitlines() if "random" in x)
    assert line.startswith(
        "| tiny | 25% layers | random (3 seeds) | 2.0 | 30.0 ± 0.0 | 55.0 ± 18.0 |"
    )


def test_a_method_seen_in_another_sparsity_unit_is_no_gap(tmp_path: Path) -> None:
    write_run(tmp_path, "a", "streamline", 0.25, {"piqa": 0.60})
    removal = write_run(tmp_path, "b", "removal", 2, {"piqa": 0.50})
    record = json.loads((removal / "metrics.json").read_text())
    record["config"]["sparsity_unit"] = "layers"
    (removal / "metrics.json").write_text(json.dumps(record))
    rows = [line.split(" | ")[1:3] for line in table_lines(tmp_path) if line.startswith("| tiny")]
    assert rows == [["0", "dense"], ["25% layers", "streamline"], ["2 layers", "removal"]]


def test_an_older_records_exp_weighted_stability_is_left_out(tmp_path: Path) -> None:
    folder = write_run(tmp_path, "a", "shortgpt", 0.25, {"piqa": 0.60, "hellaswag": 0.40})
    record = json.loads((folder / "metrics.json").read_text())
    del record["eval"]["stability"]["stability_exp_ppl"]  # written before the NLL weights
    (folder / "metrics.json").write_text(json.dumps(record))
    assert table_lines(tmp_path)[3].endswith("| 0.800 | – | 0.700 | 20.00 |")


def test_newest_run_of_a_config_hash_wins(tmp_path: Path) -> None:
    write_run(tmp_path, "old", "shortgpt", 0.25, {"piqa": 0.10}, "2026-01-01T00:00:00+00:00", "h")
    write_run(tmp_path, "new", "shortgpt", 0.25, {"piqa": 0.65}, "2026-02-01T00:00:00+00:00", "h")
    runs = load_runs([tmp_path])
    assert [Path(r["run_dir"]).name for r in runs] == ["new"]
    assert table_lines(tmp_path)[3].startswith("| tiny | 25% layers | shortgpt | 2 | 30.0 | 65.0 |")


def test_label_without_a_method_names_scorer_and_recovery() -> None:
    config = {
        "scorer": {"_target_": "layerprune.scoring.BlockInfluence"},
        "recovery": {"steps": [{"_target_": "layerprune.recovery.LayerReplacement", "kind": "ffn"},
                               {"_target_": "layerprune.recovery.LoraHealing"}]},
    }  # fmt: skip
    assert method_label(config) == "block_influence+ffn+lora"
    assert method_label({"scorer": {"_target_": "layerprune.scoring.Streamline"}}) == "streamline"
    layer = {"_target_": "layerprune.recovery.LayerReplacement", "kind": "layer", "loss": "mse"}
    labels = [
        method_label({**config, "recovery": {"steps": {"replace": {**layer, **settings}}}})
        for settings in ({}, {"loss": "lm"}, {"exclude_positions": []},
                         {"loss": "cosine", "exclude_positions": [0]})
    ]  # fmt: skip
    assert labels == ["block_influence+layer", "block_influence+layer(lm)",
                      "block_influence+layer(every token)",
                      "block_influence+layer(cosine, no pos 0)"]  # fmt: skip


def test_group_by_splits_rows_by_config_values(tmp_path: Path) -> None:
    for name, text, n in [("a", "wiki", 16), ("b", "c4", 16), ("c", "c4", 64)]:
        folder = write_run(tmp_path, name, "shortgpt", 0.25, {"piqa": 0.5})
        record = json.loads((folder / "metrics.json").read_text())
        record["config"]["calibration"] = {"path": f"/mirror/text/{text}.txt", "n": n}
        (folder / "metrics.json").write_text(json.dumps(record))
    table = build_table(choose(load_runs([tmp_path]), ["calibration.path"]), ["calibration.path"])
    assert [(r["Method"], r.get("calibration.path")) for r in table.rows] == [
        ("dense", None),
        ("shortgpt", "c4"),
        ("shortgpt", "wiki"),
    ]  # c4 at n=16 and at n=64 share a row, as calibration.n is not a grouping key


def test_report_writes_tables_and_figures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for i, amount in enumerate((0.25, 0.5)):
        folder = write_run(tmp_path / "runs", f"r{i}", "shortgpt", amount, {"piqa": 0.6 - i / 10})
    scores = {
        "n_windows": 4,
        "layer_metrics": {k: [0.1 * i for i in range(6)] for k in
                          ("block_influence", "streamline_similarity", "angular_distance")},
        "cosine_matrix": [[1.0 - abs(i - j) / 7 for j in range(7)] for i in range(7)],
    }  # fmt: skip
    (folder / "scores.json").write_text(json.dumps(scores))
    out = tmp_path / "out"
    main([str(tmp_path / "runs"), "--out", str(out), "--model", "tiny"])
    assert sorted(p.name for p in out.iterdir()) == [
        "comparisons.md", "curve_tiny_layer_ratio.png", "importance_tiny.png",
        "similarity_tiny.png", "table.csv", "table.md", "table.tex",
    ]  # fmt: skip
    assert "| tiny | 50% layers | shortgpt | 2 | 30.0 | 50.0 |" in (out / "table.md").read_text()
    tex = (out / "table.tex").read_text()
    assert r"\toprule" in tex and r"25\% layers & shortgpt & 2 & 30.0 & 60.0" in tex
    assert "2 finished and 0 unfinished runs" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([str(tmp_path / "runs"), "--out", str(out), "--model", "other"])


def write_samples_run(
    root: Path, name: str, method: str, right: int, samples: bool, created: str = "2026-01-02"
) -> None:
    """A run on 40 piqa documents (gold alternating 0/1): dense right on 28, pruned on
    ``right``, with its per-document samples when ``samples``."""
    n = 40

    def side(correct: int) -> list[Sample]:
        out = []
        for i in range(n):
            gold = i % 2
            pick = gold if i < correct else 1 - gold
            lls = [-1.0, -2.0] if pick == 0 else [-2.0, -1.0]
            out.append(Sample.from_scores(i, lls, [1, 1], [1, 1], gold, f"h{i}"))
        return out

    folder = write_run(root, name, method, 0.25, {"piqa": right / n})
    record = json.loads((folder / "metrics.json").read_text())
    record["eval"]["tasks"][0]["dense"] = 28 / n
    record["eval"]["average"] = {"dense": 28 / n, "pruned": right / n, "delta": (right - 28) / n}
    record["created"] = created
    (folder / "metrics.json").write_text(json.dumps(record))
    if samples:
        write_samples(folder / "samples" / "dense" / "piqa.jsonl.gz", side(28))
        write_samples(folder / "samples" / "pruned" / "piqa.jsonl.gz", side(right))


def test_intervals_and_comparisons_come_from_the_samples(tmp_path: Path) -> None:
    write_samples_run(tmp_path, "a", "shortgpt", 30, samples=True)
    write_samples_run(tmp_path, "b", "random", 10, samples=True)
    write_samples_run(tmp_path, "c", "last", 20, samples=False, created="2026-01-01")
    out = tmp_path / "out"
    main([str(tmp_path), "--out", str(out)])
    lines = (out / "table.md").read_text().splitlines()
    # Wilson half-widths: 28/40 -> 13.7, 30/40 -> 13.0 (hand-computed in test_stats), 10/40
    # -> 13.0; 10/40 is below the majority class (1/2) and chance (1/2) of these documents: †
    assert lines[2].startswith("| tiny | 0 | dense | 0 | 0.0 | 70.0 ± 13.7 | 70.0 ± ")
    assert lines[4].startswith("| tiny | 25% layers | random | 2 | 30.0 | 25.0 ± 13.0† |")
    assert lines[5].startswith("| tiny | 25% layers | shortgpt | 2 | 30.0 | 75.0 ± 13.0 |")
    assert lines[3].startswith("| tiny | 25% layers | last | 2 | 30.0 | 50.0 | 50.0 |")  # no ±
    with (out / "table.csv").open() as f:
        rows = {row["Method"]: row for row in csv.DictReader(f)}
    assert float(rows["shortgpt"]["piqa ±"]) == pytest.approx(0.130036, abs=1e-5)
    assert rows["random"]["piqa †"] == "1" and rows["shortgpt"]["piqa †"] == "0"
    assert rows["last"]["piqa ±"] == "NaN"
    comparisons = (out / "comparisons.md").read_text()
    assert "not compared (no interval can be computed): last." in comparisons
    assert "| random | shortgpt | average | -50.0 |" in comparisons
    assert "Best on the average: **shortgpt**, significantly above every other method." in (
        comparisons
    )


def test_a_method_with_seeds_is_compared_as_all_of_them(tmp_path: Path) -> None:
    # random right on the first 10 and the first 30 of 40 documents (seeds 0, 1), ShortGPT on
    # the first 25: per document random is right 1, 1/2 or 0 times in 1, so its accuracy is
    # (10 + 20 / 2) / 40 = 50.0 and the paired difference 50.0 - 62.5 = -12.5 (not seed 1's
    # +12.5, nor seed 0's -37.5)
    for seed, right in enumerate((10, 30)):
        write_samples_run(tmp_path, f"r{seed}", "random", right, samples=True,
                          created=f"2026-01-0{seed + 1}")  # fmt: skip
        path = tmp_path / f"r{seed}" / "metrics.json"
        record = json.loads(path.read_text())
        record["config"]["scorer"] = {"seed": seed}
        path.write_text(json.dumps(record))
    write_samples_run(tmp_path, "s", "shortgpt", 25, samples=True)
    main([str(tmp_path), "--out", str(tmp_path / "out")])
    comparisons = (tmp_path / "out" / "comparisons.md").read_text()
    assert "| random (2 seeds) | shortgpt | average | -12.5 | [" in comparisons
