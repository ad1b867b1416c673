"""What a user sees: a quiet console (plan, table, run folder), everything else in app.log,
no Python warnings, and an installed wheel that finds its own configs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from .conftest import MIRROR

ROOT = Path(__file__).parents[1]
TINY_JOB = [
    "model=tiny_llama", "calibration.n=4", "calibration.seq_len=32", "scoring.batch_size=2",
    "eval.limit=2", "eval.perplexity.seq_len=32", "eval.perplexity.max_tokens=256",
    "paths.cache=cache", "hydra.run.dir=run",
]  # fmt: skip


def layerprune(*args: str, cwd: Path, exe: str | None = None) -> subprocess.CompletedProcess[str]:
    """The command line as a user runs it, every Python warning shown."""
    env = {
        **os.environ,
        "LAYERPRUNE_DATA_MIRROR": str(MIRROR.resolve()),
        "PYTHONWARNINGS": "always",
    }
    env.pop("WANDB_SILENT", None)
    command = [exe] if exe else [sys.executable, "-m", "layerprune"]
    return subprocess.run(
        [*command, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def test_help_prints_no_warning(tmp_path: Path) -> None:
    result = layerprune("--help", cwd=tmp_path)
    assert result.returncode == 0
    assert "Warning" not in result.stdout + result.stderr


def test_a_job_shows_plan_table_and_folder_and_logs_the_rest(tmp_path: Path) -> None:
    result = layerprune(*TINY_JOB, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) <= 40, result.stdout
    assert any(line.startswith("removed ") for line in lines)
    assert any(line.startswith("average ") for line in lines)
    assert lines[-1] == f"results    {tmp_path / 'run'}"
    assert "Warning" not in result.stdout + result.stderr
    assert "fatal" not in result.stderr  # lm-eval asks git for the commit of a non-checkout
    assert "lm_eval" not in result.stdout + result.stderr  # third-party logs: the file only
    log = (tmp_path / "run" / "app.log").read_text()
    assert "[lm_eval." in log and "removed " in log  # both the library's and our lines
    ours = [line for line in log.splitlines() if "py.warnings" in line and "layerprune" in line]
    assert not ours


def test_verbose_shows_third_party_logs(tmp_path: Path) -> None:
    job = [arg for arg in TINY_JOB if not arg.startswith("eval.")]
    result = layerprune(*job, "eval=none", "logger=none", "verbose=true", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "scoring 4 windows of 32 tokens" in result.stdout
    quiet = layerprune(*job, "eval=none", "logger=none", "hydra.run.dir=quiet", cwd=tmp_path)
    assert "scoring 4 windows" not in quiet.stdout + quiet.stderr


@pytest.mark.slow
def test_a_wheel_install_finds_its_configs(tmp_path: Path) -> None:
    source = tmp_path / "source"  # a copy: building writes build/ beside the sources
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(dist), str(source)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = dist.glob("layerprune-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=True, with_pip=True)  # dependencies from here
    python = str(env_dir / "bin" / "python")
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    where = subprocess.run(
        [python, "-c", "import layerprune.app as a; print(a.CONF_DIR)"],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    ).stdout.strip()
    assert where.startswith(str(env_dir)) and (Path(where) / "config.yaml").is_file()
    job = [arg for arg in TINY_JOB if not arg.startswith("eval.")]
    exe = str(env_dir / "bin" / "layerprune")
    result = layerprune(*job, "eval=none", "logger=none", cwd=tmp_path, exe=exe)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "run" / "metrics.json").is_file()
