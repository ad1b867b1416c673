"""The app with evaluation: metrics.json, the dense cache, early errors, W&B offline logs."""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

import pytest
import torch
from wandb.proto import wandb_internal_pb2

from layerprune.app import run
from layerprune.errors import LayerpruneError

from .conftest import compose_config
from .test_evaluation import local_task


def eval_overrides(tmp_path: Path) -> list[str]:
    text = tmp_path / "ppl.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    return [
        "model=tiny_llama", "calibration.n=4", "calibration.seq_len=32", "logger=none",
        "sparsity=2", "sparsity_unit=layers", f"paths.cache={tmp_path / 'cache'}",
        f"paths.runs={tmp_path}", "force=true",
        "eval=quick", "eval.tasks=[tiny_mc]", f"eval.include_path={local_task(tmp_path)}",
        "eval.limit=null", "eval.batch_size=4", f"eval.perplexity.path={text}",
        "eval.perplexity.seq_len=64", "eval.perplexity.max_tokens=null",
    ]  # fmt: skip


def test_run_records_dense_and_pruned_metrics_and_reuses_the_dense_cache(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    overrides = eval_overrides(tmp_path)
    first = run(compose_config(overrides), tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(first))
    assert saved["schema_version"] == 1 and saved["kind"] == "layerprune.run"
    ev = saved["eval"]
    assert ev["dense_from_cache"] is False
    (row,) = ev["tasks"]
    assert row["task"] == "tiny_mc" and row["metric"] == "acc" and row["n"] == 8
    assert row["dense"] == ev["metrics"]["dense"]["tiny_mc"]["acc"]
    assert row["delta"] == pytest.approx(row["pruned"] - row["dense"])
    assert ev["rp"] == pytest.approx(row["pruned"] / row["dense"])
    assert 0 <= row["stability"] <= 1 and 0 <= row["agreement"] <= 1
    ppl = ev["perplexity"]["ppl"]  # the text is named by its file's stem
    assert ppl["dense"]["n_tokens"] == ppl["pruned"]["n_tokens"] > 0
    assert ppl["pruned"]["ci"]["lo"] <= ppl["pruned"]["ppl"] <= ppl["pruned"]["ci"]["hi"]
    assert {"load", "score", "eval_dense", "prune_recover", "eval_pruned", "total"} <= set(
        saved["timings"]
    )
    assert saved["threads"] == torch.get_num_threads()  # the timings' context
    assert (tmp_path / "a" / "samples" / "pruned" / "tiny_mc.jsonl.gz").is_file()

    second = run(compose_config(overrides), tmp_path / "b")
    assert second["eval"]["dense_from_cache"] is True
    assert second["eval"]["metrics"]["dense"] == ev["metrics"]["dense"]

    (entry,) = (tmp_path / "cache" / "dense_eval").glob("*.json")
    entry.write_text(entry.read_text()[:-200])  # a torn write
    with caplog.at_level(logging.WARNING):
        third = run(compose_config(overrides), tmp_path / "c")
    assert "is corrupted" in caplog.text
    assert third["eval"]["dense_from_cache"] is False
    assert third["eval"]["metrics"]["dense"] == ev["metrics"]["dense"]


def test_a_bad_task_fails_before_the_model_is_loaded(tmp_path: Path) -> None:
    cfg = compose_config(
        [
            *eval_overrides(tmp_path),
            "model=local",
            "model.path=/no/model",
            "eval.tasks=[piqa,nosuch]",
        ]
    )
    with pytest.raises(LayerpruneError, match="unknown lm-eval task 'nosuch'"):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def wandb_records(path: Path) -> list[wandb_internal_pb2.Record]:
    """Read a .wandb file: a 7-byte header, then LevelDB-log records in 32 KiB blocks."""
    data, pos, buf, records = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        if (left := 32768 - pos % 32768) < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        buf, pos = buf + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            records.append(record)
            buf = b""
    return records


def test_wandb_offline_run_holds_the_logged_keys(tmp_path: Path) -> None:
    overrides = [*eval_overrides(tmp_path), "logger=wandb", "logger.group=g1"]
    run(compose_config(overrides), tmp_path / "run")
    (log,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    keys, config = set(), {}
    for record in wandb_records(log):
        if record.HasField("history"):
            keys |= {"/".join(item.nested_key) or item.key for item in record.history.item}
        if record.HasField("run"):
            config = {item.key: item.value_json for item in record.run.config.update}
            assert record.run.run_group == "g1"
    assert {"eval/rp", "eval/average/pruned", "eval/tasks/tiny_mc/stability", "plan/params_after",
            "timings/total", "scores/layers/_type", "scores/importance/_type"} <= keys  # fmt: skip
    assert "tiny_mc/acc" in keys  # lm-eval's own WandbLogger, same run
    assert json.loads(config["scorer"])["_target_"] == "layerprune.scoring.BlockInfluence"
