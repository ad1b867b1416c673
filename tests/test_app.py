from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from layerprune.app import job_dirname, run
from layerprune.errors import LayerpruneError
from layerprune.models import from_packaged_gguf
from layerprune.pipeline import Evaluator
from layerprune.resources import peak_memory, reset_peak_memory

from .conftest import MIRROR, compose_config

TINY = [
    "model=tiny_llama", "calibration.n=4", "calibration.seq_len=32", "scoring.batch_size=2",
    "eval=none", "logger=none", "force=true",
]  # fmt: skip
OUTPUTS = {"scores.json", "plan.json", "importance.png", "metrics.json"}


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LAYERPRUNE_DATA_MIRROR": str(MIRROR.resolve())}
    return subprocess.run(
        [sys.executable, "-m", "layerprune", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_run_writes_scores_plan_and_plot(tmp_path: Path) -> None:
    cfg = compose_config(
        [*TINY, "scorer=streamline", "sparsity=2", "sparsity_unit=layers", "save_model=true"]
    )
    record = run(cfg, tmp_path)
    assert OUTPUTS | {"model"} <= {p.name for p in tmp_path.iterdir()}
    scores = json.loads((tmp_path / "scores.json").read_text())
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert scores["kind"] == "layerprune.scores" and scores["num_layers"] == 6
    assert (
        len(scores["cosine_matrix"]) == 7
        and len(scores["block_metrics"]["streamline_similarity"]) == 5
    )
    sims = scores["block_metrics"]["streamline_similarity"]
    start = max(range(5), key=lambda j: sims[j])
    assert saved["plan"]["removed_layers"] == [start, start + 1] == record["plan"]["removed_layers"]
    assert saved["config"]["scorer"]["_target_"] == "layerprune.scoring.Streamline"
    assert "torch" in saved["versions"]
    model_cfg = json.loads((tmp_path / "model" / "config.json").read_text())
    assert model_cfg["num_hidden_layers"] == 4


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sparsity=0", "sparsity: 0; allowed: a number in (0, 1)"),
        ("sparsity=6", "sparsity: 6; allowed: a number in (0, 1)"),
        ("sparsity_unit=layers sparsity=6", "removes 6 of 6 layers; keep at least one"),
        ("calibration.path=/no/such.txt", "calibration.path: /no/such.txt (no such file)"),
        ("calibration.path={tmp}/short.txt", "gives 11 tokens = 0 windows of 32; need n=4"),
        ("scorer.selection=blocks", "scorer.selection: blocks; allowed: independent, contiguous"),
    ],
)
def test_bad_input_is_one_clear_error(override: str, message: str, tmp_path: Path) -> None:
    (tmp_path / "short.txt").write_text("short text")
    cfg = compose_config([*TINY, *override.format(tmp=tmp_path).split()])
    with pytest.raises(LayerpruneError) as err:
        run(cfg, tmp_path)
    assert message in str(err.value)
    assert not OUTPUTS & {p.name for p in tmp_path.iterdir()}


def test_missing_offline_package_names_the_pip_command() -> None:
    with pytest.raises(LayerpruneError, match=r"pip install --no-deps no-such-model-pkg==1\.0"):
        from_packaged_gguf("x", parts=["no_such_model_pkg/m.gguf"], pip=["no-such-model-pkg==1.0"])


def test_cli_error_exits_non_zero_with_one_line(tmp_path: Path) -> None:
    result = cli(*TINY, "sparsity=-1", "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode == 2
    assert (
        result.stderr.strip().splitlines()[-1]
        == "layerprune: error: sparsity: -1; allowed: a number in (0, 1) as a layer_ratio (or "
        "sparsity_unit=layers for a count)"
    )
    assert not OUTPUTS & {p.name for p in (tmp_path / "run").iterdir()}


def test_cli_unknown_scorer_lists_the_choices(tmp_path: Path) -> None:
    result = cli("scorer=shortgpt", cwd=tmp_path)
    assert result.returncode != 0
    assert "Could not find 'scorer/shortgpt'" in result.stderr
    assert "block_influence" in result.stderr and "streamline" in result.stderr


def test_multirun_scores_each_model_once(tmp_path: Path) -> None:
    result = cli(
        "-m", *TINY, "scorer=block_influence,streamline,angular,random", "sparsity=0.25,0.5",
        "paths.cache=cache", "hydra.sweep.dir=sweep", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("scores computed") == 1
    assert result.stdout.count("scores from cache") == 7
    jobs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert len(jobs) == 8 and all({f.name for f in job.iterdir()} >= OUTPUTS for job in jobs)


def test_a_failed_job_does_not_stop_the_sweep(tmp_path: Path) -> None:
    result = cli(
        "-m", *TINY, "sparsity=-1,0.25", "hydra.sweep.dir=sweep", cwd=tmp_path
    )  # fmt: skip
    assert result.returncode != 0
    assert "layerprune: error: sparsity: -1; allowed: a number in (0, 1)" in result.stderr
    failed, finished = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert failed.name.startswith("0_") and not (failed / "metrics.json").exists()
    assert json.loads((finished / "metrics.json").read_text())["plan"]["sparsity"]["amount"] == 0.25


def test_too_little_training_text_fails_before_the_evaluation(tmp_path: Path) -> None:
    args = [a for a in TINY if not a.startswith("eval=")]
    result = cli(
        *args, "experiment=streamline_layer", "recovery.train_data.n=100000",
        "eval=quick", "eval.limit=2", "paths.cache=cache", "hydra.run.dir=run", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2
    assert "need n=100000" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "cache" / "dense_eval").exists()


def test_a_finished_config_is_skipped_unless_forced(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="layerprune")
    overrides = [*TINY[:-1], f"paths.runs={tmp_path}"]
    first = run(compose_config(overrides), tmp_path / "a")
    before = (tmp_path / "a" / "metrics.json").read_bytes()
    again = run(compose_config(overrides), tmp_path / "b")
    assert again == first and not (tmp_path / "b").exists()
    assert f"skipped: a finished run of this config (hash {first['config_hash']})" in caplog.text
    assert (tmp_path / "a" / "metrics.json").read_bytes() == before
    run(compose_config([*overrides, "sparsity=0.5"]), tmp_path / "c")  # another config runs
    run(compose_config([*overrides, "force=true"]), tmp_path / "d")  # and so does force
    assert (tmp_path / "c" / "metrics.json").is_file() and (
        tmp_path / "d" / "metrics.json"
    ).is_file()


def test_a_skipped_job_does_not_prepare_its_evaluation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Preparing lm-eval's tasks takes ~20 s: a resumed sweep must not pay it per finished job."""
    import layerprune.app

    built: list[str] = []
    real = layerprune.app.evaluator_for

    def counting(cfg: DictConfig) -> Evaluator:
        built.append(str(cfg.model.name))
        return real(cfg)

    monkeypatch.setattr(layerprune.app, "evaluator_for", counting)
    overrides = [*TINY[:-1], f"paths.runs={tmp_path}"]
    run(compose_config(overrides), tmp_path / "a")
    assert len(built) == 1
    run(compose_config(overrides), tmp_path / "b")  # skipped
    assert len(built) == 1 and not (tmp_path / "b").exists()
    run(compose_config([*overrides, "force=true"]), tmp_path / "c")
    assert len(built) == 2


def test_a_skipped_job_leaves_no_folder_behind(tmp_path: Path) -> None:
    args = [*TINY[:-1], "paths.runs=runs", "paths.cache=cache"]
    first = cli(*args, "hydra.run.dir=runs/a", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    again = cli(*args, "hydra.run.dir=runs/b", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "skipped: a finished run" in again.stdout + again.stderr
    assert (tmp_path / "runs" / "a" / "metrics.json").is_file()
    assert not (tmp_path / "runs" / "b").exists()


def test_layer_replacement_removes_one_more_layer_and_puts_one_back(tmp_path: Path) -> None:
    cfg = compose_config([
        *TINY, "scorer=streamline", "sparsity=2", "sparsity_unit=layers", "recovery=layer",
        "recovery.train_data.n=12", "recovery.train_data.seq_len=32", "save_model=true",
    ])  # fmt: skip
    record = run(cfg, tmp_path)
    plan, (report,) = record["plan"], record["recovery"]
    assert len(plan["removed_layers"]) == 3 and plan["layers_added"] == 1
    assert plan["num_layers_after"] == 4 and plan["removed_layer_ratio"] == pytest.approx(2 / 6)
    assert report["block_start"] == plan["removed_layers"][0] and report["block_size"] == 3
    assert plan["params_before"] - plan["params_after"] == report["params_net"]
    assert report["heldout_mse_after"] < report["heldout_mse_before"]
    model_cfg = json.loads((tmp_path / "model" / "config.json").read_text())
    assert model_cfg["num_hidden_layers"] == 4


def test_block_recovery_needs_a_contiguous_scorer() -> None:
    cfg = compose_config([*TINY, "scorer=block_influence", "recovery=layer"])
    with pytest.raises(
        LayerpruneError, match=r"needs a contiguous block.*scorer\.selection=contiguous"
    ):
        run(cfg, Path("/nonexistent"))


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux only")
def test_peak_memory_counts_from_the_reset() -> None:
    # The jobs of a multirun share one process; each records its own peak.
    buffer = torch.ones(2**27)  # 512 MiB, touched
    del buffer
    with_buffer = peak_memory()["cpu_rss"]
    reset_peak_memory()
    assert with_buffer - peak_memory()["cpu_rss"] > 0.4


def test_long_overrides_make_a_job_folder_name_that_fits() -> None:
    short = "recovery=layer,seed=1"
    assert job_dirname(short) == short
    long = ",".join(f"recovery.steps.replace.setting{i}=[{i}]" for i in range(12))
    name = job_dirname(long)
    assert len(name.encode()) == 240 and long.startswith(name[:-9]) and name[-9] == "-"
    assert job_dirname(long + "x") != name  # the digest tells apart what the cut would merge
