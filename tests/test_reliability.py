"""What keeps runs trustworthy: verified model folders, strict JSON, caches that never stop a
run, logging before a run counts as finished, no litter from killed runs."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

import layerprune.cache
import layerprune.models
from layerprune.app import job_from_config
from layerprune.app import run as run_config
from layerprune.cache import JsonCache
from layerprune.files import clean_stale, locked_staging_dir, write_json
from layerprune.models import converted_folder, folder_problem
from layerprune.pipeline import run as run_job

from .conftest import compose_config
from .test_app import TINY


@pytest.fixture(autouse=True)
def _report_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(layerprune.cache, "_reported", set())


# -- converted model folders ------------------------------------------------------------------


def fake_convert(folder: Path, files: list[Path], name: str, pip: list[str], sha: Any) -> None:
    """Stands in for the GGUF conversion: two files, recorded as the real one records them."""
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    write_json(folder / "layerprune_source.json", {"files": layerprune.models.file_record(folder)})


def damage_truncate(entry: Path) -> None:
    with (entry / "model.safetensors").open("r+b") as f:
        f.truncate(100)


def damage_bytes(entry: Path) -> None:
    with (entry / "model.safetensors").open("r+b") as f:
        f.seek(5000)
        f.write(b"\xff\xfe\xfd")


DAMAGE = {
    "changed bytes": (damage_bytes, "model.safetensors has changed (its sha256 differs)"),
    "truncated": (damage_truncate, "model.safetensors has 100 bytes, 16384 expected"),
    "deleted file": (lambda e: (e / "config.json").unlink(), "config.json is missing"),
    "unfinished": (
        lambda e: (e / "layerprune_source.json").unlink(),
        "no layerprune_source.json: its conversion did not finish",
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_model_folder_is_reported_once_and_rebuilt(
    damage: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(layerprune.models, "_convert_into", fake_convert)
    entry = tmp_path / "models" / "m-0123"
    assert converted_folder("m", [], [], None, entry) == (entry, False)
    good = (entry / "model.safetensors").read_bytes()
    assert folder_problem(entry) is None
    act, problem = DAMAGE[damage]
    act(entry)
    assert folder_problem(entry) == problem
    caplog.clear()
    assert converted_folder("m", [], [], None, entry) == (entry, False)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and problem in warnings[0] and "rebuilding" in warnings[0]
    assert (entry / "model.safetensors").read_bytes() == good and folder_problem(entry) is None
    assert [p.name for p in entry.parent.iterdir()] == ["m-0123"]  # nothing left beside it


def test_an_unwritable_model_cache_converts_into_a_temporary_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(layerprune.models, "_convert_into", fake_convert)
    (tmp_path / "file").write_text("")
    folder, temporary = converted_folder("m", [], [], None, tmp_path / "file" / "models" / "m-1")
    assert temporary and folder_problem(folder) is None
    assert "cannot be written" in caplog.text


# -- strict JSON ------------------------------------------------------------------------------


def test_non_finite_numbers_become_null_and_are_named(tmp_path: Path) -> None:
    record = {"eval": {"perplexity": {"pruned": {"ppl": float("inf"), "nll": float("nan")}}}}
    write_json(tmp_path / "m.json", record)
    text = (tmp_path / "m.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    back = json.loads(text, parse_constant=lambda c: pytest.fail(f"literal {c}"))
    assert back["eval"]["perplexity"]["pruned"] == {"ppl": None, "nll": None}
    assert back["non_finite"] == ["eval/perplexity/pruned/ppl", "eval/perplexity/pruned/nll"]


# -- caches that cannot be written ------------------------------------------------------------


def test_a_cache_that_cannot_be_written_is_reported_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "file").write_text("")
    cache = JsonCache("scores", tmp_path / "file")
    for i in range(3):
        assert cache.get_or_compute({"k": i}, lambda: {"v": 1}) == ({"v": 1}, False)
    assert caplog.text.count("cannot be written") == 1


def results(folder: Path) -> tuple[Any, Any]:
    scores = json.loads((folder / "scores.json").read_text())
    plan = json.loads((folder / "plan.json").read_text())["plan"]
    return scores["layer_metrics"], plan


@pytest.mark.parametrize("how", ["cache under a file", "disk full"])
def test_a_run_with_an_unwritable_cache_finishes_with_the_same_results(
    how: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    args = [*TINY, "scorer=streamline"]
    run_config(compose_config([*args, f"paths.cache={tmp_path / 'ok'}"]), tmp_path / "normal")
    if how == "cache under a file":
        (tmp_path / "file").write_text("")
        cache = tmp_path / "file" / "cache"
    else:
        cache = tmp_path / "full"
        real_replace = os.replace

        def full(src: Any, dst: Any) -> None:
            if str(dst).startswith(str(cache)):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
            real_replace(src, dst)

        monkeypatch.setattr(os, "replace", full)
    caplog.clear()
    run_config(compose_config([*args, f"paths.cache={cache}"]), tmp_path / "unwritable")
    assert caplog.text.count("cannot be written") == 1
    assert results(tmp_path / "unwritable") == results(tmp_path / "normal")
    assert (tmp_path / "unwritable" / "metrics.json").is_file()


# -- logging before a run counts as finished --------------------------------------------------


class Tracker:
    def __init__(self, fail: type[BaseException] | None = None) -> None:
        self.fail, self.logged = fail, []

    def log_run(self, record: dict[str, Any], run_dir: Path, lm_eval_results: Any = None) -> None:
        if self.fail:
            raise self.fail("tracker down")
        self.logged.append(record)


@pytest.mark.parametrize("failure", [RuntimeError, KeyboardInterrupt])
def test_a_run_whose_logging_failed_is_logged_by_the_next_run(
    failure: type[BaseException], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = compose_config([*TINY[:-1], f"paths.runs={tmp_path}"])
    job = job_from_config(cfg)
    job.tracker = Tracker(fail=failure)
    if failure is KeyboardInterrupt:  # killed between metrics.json and the tracker
        with pytest.raises(KeyboardInterrupt):
            run_job(job, tmp_path / "a")
    else:
        assert run_job(job, tmp_path / "a")["logged"] is False
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["logged"] is False
    job = job_from_config(cfg)
    job.tracker = tracker = Tracker()
    job.load_model = lambda: pytest.fail("a finished run was computed again")
    record = run_job(job, tmp_path / "b")
    assert not (tmp_path / "b").exists() and record["logged"] is True
    assert len(tracker.logged) == 1 and tracker.logged[0]["scores"]["kind"] == "layerprune.scores"
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["logged"] is True
    assert run_job(job, tmp_path / "c") == record and len(tracker.logged) == 1  # once only


# -- litter -----------------------------------------------------------------------------------


def age(path: Path, seconds: float = 3600) -> Path:
    then = time.time() - seconds
    os.utime(path, (then, then))
    return path


def test_stale_temporary_files_and_folders_are_cleaned_safely(tmp_path: Path) -> None:
    old_file = tmp_path / ".metrics.json.abc123.tmp"
    old_file.write_text("half")
    age(old_file)
    young_file = tmp_path / ".scores.json.def456.tmp"
    young_file.write_text("being written")
    held_file = tmp_path / ".plan.json.ghi789.tmp"
    held_file.write_text("being written")
    age(held_file)
    not_ours = tmp_path / "notes.tmp"
    not_ours.write_text("user file")
    age(not_ours)
    with locked_staging_dir(tmp_path / "model-a") as writing:
        age(writing)
        abandoned = tmp_path / ".model-b.xyz.tmp"
        abandoned.mkdir()
        (abandoned / ".lock").write_text("")
        age(abandoned)
        foreign_dir = tmp_path / ".other.tmp"  # no .lock: not known to be layerprune's
        foreign_dir.mkdir()
        age(foreign_dir)
        with held_file.open("rb") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            assert clean_stale(tmp_path) == 2
        assert writing.is_dir()
    assert not old_file.exists() and not abandoned.exists()
    assert young_file.exists() and held_file.exists() and not_ours.exists()
    assert foreign_dir.exists() and not writing.exists()  # removed by its own writer


def test_run_folders_carry_the_pid() -> None:
    from omegaconf import OmegaConf

    from layerprune.app import CONF_DIR

    hydra = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "config.yaml"))["hydra"]
    assert hydra["run"]["dir"].endswith("${now:%H-%M-%S}-${lp_pid:}")
    assert hydra["sweep"]["dir"].endswith("${now:%H-%M-%S}-${lp_pid:}")


def test_an_evaluated_run_with_a_cache_under_a_file_finishes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "file").write_text("")
    args = [a for a in TINY if not a.startswith("eval=")]
    cfg = compose_config([
        *args, "eval=quick", "eval.tasks=[piqa]", "eval.limit=2", "eval.perplexity.max_tokens=64",
        "eval.perplexity.seq_len=32", f"paths.cache={tmp_path / 'file' / 'cache'}",
    ])  # fmt: skip
    record = run_config(cfg, tmp_path / "run")
    assert record["eval"]["tasks"][0]["task"] == "piqa"
    warned = [r.getMessage() for r in caplog.records if "cannot be written" in r.getMessage()]
    # the task files and the dense evaluation go to a private folder for this run
    assert sorted(w.split()[2] for w in warned) == [
        str(tmp_path / "file" / "cache" / k) for k in ("scores", "tasks")
    ]
