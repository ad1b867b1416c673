"""Method presets, launchers, and sweeps that survive being killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from layerprune.app import CONF_DIR, build, limit_threads
from layerprune.errors import LayerpruneError
from layerprune.report import finished, load_runs

from .conftest import compose_config

# preset: scorer, selection, recovery steps as (target, kind, loss)
STREAMLINE = "streamline", "contiguous"
PRESETS = {
    "shortgpt": ("block_influence", "independent", []),
    "streamline_layer": (*STREAMLINE, [("LayerReplacement", "layer", "mse")]),
    "streamline_layer_lm": (*STREAMLINE, [("LayerReplacement", "layer", "lm")]),
    "streamline_ffn": (*STREAMLINE, [("LayerReplacement", "ffn", "mse")]),
    "streamline_ffn_residual": (*STREAMLINE, [("LayerReplacement", "ffn_residual", "mse")]),
    "streamline_swiglu": (*STREAMLINE, [("LayerReplacement", "swiglu", "mse")]),
    "gromov": ("angular", "contiguous", [("LoraHealing", None, None)]),
    # ReplaceMe picks its block by last-token angular distance, as their code does
    "replaceme": ("angular", "contiguous", [("LinearReplacement", None, "mse")]),
    "replaceme_cosine": ("angular", "contiguous", [("LinearReplacement", None, "cosine")]),
    "random": ("random", "independent", []),
    "last": ("last", "contiguous", []),
    "sleb": ("sleb", "independent", []),
    "ppl": ("ppl", "independent", [("LoraHealing", None, None)]),
    "taylor": ("taylor", "independent", [("LoraHealing", None, None)]),
}


@pytest.mark.parametrize("name", PRESETS)
def test_preset_sets_its_papers_method(name: str) -> None:
    cfg = compose_config([f"experiment={name}", "recovery.train_data.n=8"])  # as the sweeps allow
    scorer = build(cfg.scorer)
    steps = [
        (s._target_.rsplit(".", 1)[-1], s.get("kind"), s.get("loss"))
        for s in cfg.recovery.steps.values()
    ]
    assert (scorer.name, scorer.selection, steps) == PRESETS[name]
    assert (cfg.method, cfg.recovery.train_data.n) == (name, 8)
    if name.startswith(
        "streamline_"
    ):  # the paper's budget: 30,000 x 2048 tokens, 128 x 2048 a step
        (step,) = cfg.recovery.steps.values()
        assert (step.tokens, step.batch_tokens) == (30_000 * 2048, 128 * 2048)
        assert (cfg.sparsity, cfg.sparsity_unit) == (0.25, "param_ratio")


def test_presets_data_and_sparsity() -> None:
    shortgpt = compose_config(["experiment=shortgpt"])
    assert shortgpt.calibration.seq_len == 256
    assert shortgpt.calibration.path.endswith("text/wiki.txt")  # PG19 is not in the mirror
    gromov = compose_config(["experiment=gromov"])
    assert gromov.calibration.path.endswith("text/c4.txt")
    assert gromov.recovery.train_data.path.endswith("text/c4.txt")
    # a preset overrides config.yaml's own values, the command line overrides the preset
    streamline = compose_config(["experiment=streamline_layer"])
    assert (streamline.sparsity, streamline.sparsity_unit) == (0.25, "param_ratio")
    cli = compose_config(["experiment=streamline_layer", "sparsity=3", "sparsity_unit=layers"])
    assert (cli.sparsity, cli.sparsity_unit) == (3, "layers")


def test_loss_criteria_presets_follow_the_official_codes() -> None:
    sleb = compose_config(["experiment=sleb"])
    assert sleb.calibration.path.endswith("text/wikitext2_tokenized_valid.txt")
    assert (sleb.calibration.n, sleb.calibration.seq_len) == (4, 2048)
    assert (sleb.scorer.early_barrier, sleb.scorer.latter_barrier) == (1, 1)
    for name in ("ppl", "taylor"):
        cfg = compose_config([f"experiment={name}"])
        assert (cfg.calibration.n, cfg.calibration.seq_len) == (10, 128)
        assert (cfg.scorer.keep_first, cfg.scorer.keep_last) == (4, 2)
        lora = cfg.recovery.steps.lora
        assert (lora.rank, lora.alpha, lora.dropout, lora.lr) == (8, 16, 0.05, 1e-4)
        assert cfg.recovery.train_data.seq_len == 256
        # recovery=none on the command line drops the healing cleanly
        assert not compose_config([f"experiment={name}", "recovery=none"]).recovery.steps
    assert compose_config(["experiment=taylor"]).scorer.batch_size == 10


@pytest.mark.parametrize(
    ("name", "target"), [("slurm", "SlurmLauncher"), ("local", "LocalLauncher")]
)
def test_launchers_compose(name: str, target: str) -> None:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", [f"hydra/launcher={name}"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith(target)
    if name == "slurm":
        assert (launcher.partition, launcher.gpus_per_node, launcher.array_parallelism) == (
            None,
            1,
            8,
        )
    # the local launcher starts every job at once: one thread each, not every core each
    assert launcher.cpus_per_task == (8 if name == "slurm" else 1)


def test_a_launcher_job_runs_on_its_cpus_per_task_threads() -> None:
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            basic = compose("config", return_hydra_config=True).hydra.launcher
        limit_threads(basic)  # Hydra's basic launcher: one job at a time, torch's default
        assert torch.get_num_threads() == 2
        limit_threads(OmegaConf.create({"cpus_per_task": None}))
        assert torch.get_num_threads() == 2
        limit_threads(OmegaConf.create({"cpus_per_task": 1}))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("cpus", "said"), [(0, "0"), (-2, "-2"), (1.5, "1.5"), ("two", "two"), (True, "true")]
)
def test_a_launcher_without_a_whole_positive_cpus_per_task_is_refused(
    cpus: object, said: str
) -> None:
    before = torch.get_num_threads()
    with pytest.raises(LayerpruneError) as e:
        limit_threads(OmegaConf.create({"cpus_per_task": cpus}))
    assert str(e.value) == (
        f"hydra.launcher.cpus_per_task: {said}; allowed: a whole number of threads, >= 1"
    )
    assert torch.get_num_threads() == before  # refused before any change


def sweep(root: Path, *overrides: str) -> list[str]:
    """Six tiny jobs (3 sparsities x 2 scorers), results and caches all under ``root``."""
    return [
        sys.executable, "-m", "layerprune", "-m", "model=tiny_llama", "eval=none", "logger=none",
        "calibration.n=4", "calibration.seq_len=32", "sparsity_unit=layers",
        f"paths.runs={root}", f"hydra.sweep.dir={root}/sweep", f"paths.cache={root}/cache",
        *overrides,
    ]  # fmt: skip


def metrics_files(root: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in (root / "sweep").glob("**/metrics.json")}


def test_killed_sweep_resumes_and_skips_finished_jobs(tmp_path: Path) -> None:
    command = sweep(tmp_path, "sparsity=1,2,3", "scorer=block_influence,random")
    proc = subprocess.Popen(
        command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not metrics_files(tmp_path) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = metrics_files(tmp_path)
    assert 1 <= len(before) < 6
    mtimes = {path: path.stat().st_mtime_ns for path in before}
    for name in ("metrics.json", "plan.json", "scores.json"):  # all complete, or absent
        for path in (tmp_path / "sweep").glob(f"**/{name}"):
            json.loads(path.read_text())
    assert sum(map(finished, load_runs([tmp_path]))) == len(before)

    rerun = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, check=True)
    assert rerun.stdout.count("skipped: a finished run") == len(before)
    after = metrics_files(tmp_path)
    assert len(after) == 6
    assert {path: after[path] for path in before} == before
    assert {path: path.stat().st_mtime_ns for path in before} == mtimes
    runs = load_runs([tmp_path])
    assert len(runs) == 6 and all(map(finished, runs))
    assert len({run["config_hash"] for run in runs}) == 6


@pytest.mark.slow
def test_sweep_through_the_local_submitit_launcher(tmp_path: Path) -> None:
    command = sweep(tmp_path, "sparsity=1,2", "hydra/launcher=local")
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    runs = load_runs([tmp_path])
    assert sorted(run["plan"]["sparsity"]["amount"] for run in runs) == [1, 2]
    assert [run["threads"] for run in runs] == [1, 1]  # the launcher's cpus_per_task
