"""Recovered runs paired with plain removal of the same block, on hand-made run folders."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from layerprune.controls import control_overrides, missing_controls, pair, run_name, train_tokens
from layerprune.report import build_table, choose, load_runs, main, to_markdown

from .test_report import write_run

EVAL = {"tasks": ["piqa"], "perplexity": {"path": "/a/mirror/text/wikitext2.txt", "seq_len": 64}}


def recovered(
    root: Path, name: str, removed: list[int], ppl: float, report: dict[str, Any] | None = None
) -> Path:
    """A finished run whose block step replaced ``removed``, with an evaluation and overrides."""
    folder = write_run(root, name, name, 0.25, {"piqa": 0.6, "hellaswag": 0.4})
    record = json.loads((folder / "metrics.json").read_text())
    record["config"].update({"eval": EVAL, "recovery": {"train_data": {"seq_len": 32}}})
    record["plan"]["removed_layers"] = removed
    record["eval"]["perplexity"]["pruned"]["ppl"] = ppl
    record["recovery"] = [
        report
        or {
            "method": "replace_block", "block_start": removed[0], "block_size": len(removed),
            "train_tokens": 1_048_576, "heldout_mse_identity": 4.0, "heldout_mse_after": 3.0,
            "heldout_mse_identity_fitted": 2.0, "heldout_mse_after_fitted": 0.5,
            "heldout_cosine_identity": 0.9, "heldout_cosine_after": 0.95,
            "settings": {"loss": "mse", "exclude_positions": [0], "exclude_outliers": 10.0},
        }
    ]  # fmt: skip
    (folder / "metrics.json").write_text(json.dumps(record))
    (folder / ".hydra").mkdir()
    overrides = ["experiment=streamline_layer", "model=tiny", "recovery.budget.tokens=1048576",
                 "sparsity=0.25", "paths.runs=x", "eval=quick"]  # fmt: skip
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    return folder


def control(root: Path, name: str, removed: list[int], ppl: float, mirror: str = "/b") -> Path:
    folder = write_run(root, name, "removal", float(len(removed)), {"piqa": 0.5, "hellaswag": 0.3})
    record = json.loads((folder / "metrics.json").read_text())
    record["config"]["eval"] = {**EVAL, "perplexity": {**EVAL["perplexity"],
                                "path": f"{mirror}/text/wikitext2.txt"}}  # fmt: skip
    record["config"]["sparsity_unit"] = "layers"
    record["plan"]["removed_layers"] = removed
    record["eval"]["perplexity"]["pruned"]["ppl"] = ppl
    record["recovery"] = []
    (folder / "metrics.json").write_text(json.dumps(record))
    return folder


def test_each_recovered_run_pairs_with_plain_removal_of_its_block(tmp_path: Path) -> None:
    recovered(tmp_path, "layer", [2, 3, 4], ppl=30.0)
    recovered(tmp_path, "linear", [3, 4], ppl=80.0)
    control(tmp_path, "plain_3", [2, 3, 4], ppl=60.0)  # another mirror folder: the same text
    control(tmp_path, "plain_other", [1, 2, 3], ppl=99.0)  # other layers: not a control
    pairs = {run["config"]["method"]: c for run, c in pair(load_runs([tmp_path]))}
    assert pairs["layer"] is not None and Path(pairs["layer"]["run_dir"]).name == "plain_3"
    assert pairs["linear"] is None
    (missing,) = missing_controls(load_runs([tmp_path]))
    assert missing == ["experiment=streamline_layer", "model=tiny", "eval=quick", "recovery=none",
                       "sparsity=2", "sparsity_unit=layers", "++method=removal"]  # fmt: skip


def test_the_report_writes_the_paired_recovery_table(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    recovered(runs, "layer", [2, 3, 4], ppl=30.0)
    control(runs, "plain_3", [2, 3, 4], ppl=60.0)
    main([str(runs), "--out", str(tmp_path / "out")])
    with (tmp_path / "out" / "recovery.csv").open() as f:
        (row,) = list(csv.DictReader(f))
    assert (row["Method"], row["Block"], row["Train tokens"]) == ("layer", "[2, 5)", "1048576")
    assert (row["Loss"], row["Left out"]) == ("mse", "pos 0; > 10x median")
    assert (row["MSE plain"], row["MSE"], row["MSE fitted plain"], row["MSE fitted"]) == (
        "4.0",
        "3.0",
        "2.0",
        "0.5",
    )
    assert (row["PPL"], row["PPL plain"], row["Control"]) == ("30.0", "60.0", "plain_3")
    assert (row["Avg"], row["Avg plain"]) == ("0.5", "0.4")
    markdown = (tmp_path / "out" / "recovery.md").read_text()
    assert (
        "| tiny | layer | [2, 5) | mse | pos 0; > 10x median | 1,048,576 | 4 | 3 | 2 | 0.5 |"
        in markdown
    )
    main_table = to_markdown(build_table(choose(load_runs([runs])))).splitlines()
    assert "Train tokens" in main_table[0]
    assert any("| layer | 2 | 30.0 | 1,048,576 |" in line for line in main_table)


def test_the_lm_loss_columns_appear_where_a_run_measured_it(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    recovered(runs, "layer", [2, 3, 4], ppl=30.0)
    control(runs, "plain_3", [2, 3, 4], ppl=60.0)
    main([str(runs), "--out", str(tmp_path / "old")])
    header = (tmp_path / "old" / "recovery.csv").read_text().splitlines()[0]
    assert "LM loss" not in header  # no run measured it
    lm = {"method": "replace_block", "block_start": 1, "block_size": 2,
          "heldout_lm_loss_identity": 5.25, "heldout_lm_loss_after": 3.5}  # fmt: skip
    recovered(runs, "layer_lm", [1, 2], ppl=20.0, report=lm)
    main([str(runs), "--out", str(tmp_path / "new")])
    with (tmp_path / "new" / "recovery.csv").open() as f:
        rows = {row["Method"]: row for row in csv.DictReader(f)}
    assert (rows["layer_lm"]["LM loss plain"], rows["layer_lm"]["LM loss"]) == ("5.25", "3.5")
    assert rows["layer"]["LM loss"] == "NaN"


def test_train_tokens_of_runs_recorded_before_the_count(tmp_path: Path) -> None:
    old = {"method": "replace_block", "block_start": 2, "block_size": 2, "steps": 23,
           "settings": {"batch_size": 8}}  # fmt: skip
    folder = recovered(tmp_path, "old", [2, 3], ppl=1.0, report=old)
    (run,) = load_runs([tmp_path])
    assert train_tokens(run) == 23 * 8 * 32  # steps x batch x window length
    linear = {"method": "replace_linear", "block_start": 2, "block_size": 2,
              "settings": {"tokens": 4096}}  # fmt: skip
    record = json.loads((folder / "metrics.json").read_text())
    record["recovery"] = [linear]
    assert train_tokens(record) == 4096
    assert control_overrides(run)[-1] == "++method=removal"


def test_the_control_of_the_linear_fold_keeps_the_block_off_layer_0(tmp_path: Path) -> None:
    folder = recovered(tmp_path, "linear", [1, 2], ppl=1.0)
    record = json.loads((folder / "metrics.json").read_text())
    record["plan"]["first_start"] = 1  # the fold needs the layer before its block
    (folder / "metrics.json").write_text(json.dumps(record))
    overrides = folder / ".hydra" / "overrides.yaml"
    overrides.write_text(overrides.read_text() + "- ++first_start=1\n")
    (run,) = load_runs([tmp_path])
    assert control_overrides(run)[-3:] == ["sparsity_unit=layers", "++first_start=1",
                                           "++method=removal"]  # fmt: skip
    assert control_overrides(run).count("++first_start=1") == 1


def test_a_multirun_job_is_named_by_its_sweep_and_number() -> None:
    assert run_name("/r/sweep/3_recovery=layer,seed=1") == "sweep/3"
    assert run_name("/r/2026-11-24/10-03-24-21741") == "10-03-24-21741"
