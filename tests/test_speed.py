"""Prefill and decode timing of a pruned model against the dense one, on a tiny model."""

from __future__ import annotations

import copy
import json
import statistics
from pathlib import Path

import pytest
import torch

from layerprune.app import run
from layerprune.errors import LayerpruneError
from layerprune.layers import decoder_stack
from layerprune.records import config_hash
from layerprune.report import build_table, choose, load_runs, to_markdown
from layerprune.speed import SpeedSettings, alternate, compare_speed, decode
from layerprune.surgery import remove_layers

from .conftest import compose_config, load
from .test_report import write_run


def test_timings_alternate_after_one_warm_up_each() -> None:
    calls: list[str] = []

    def timer(name: str) -> float:
        calls.append(name)
        return float(len(calls))

    seconds = alternate({"a": lambda: timer("a"), "b": lambda: timer("b")}, repeats=2)
    assert calls == ["a", "b", "a", "b", "a", "b"]
    assert seconds == {"a": [3.0, 5.0], "b": [4.0, 6.0]}  # the warm-ups are not kept


def test_decode_runs_one_forward_per_new_token_after_the_prompt() -> None:
    model = load("tiny_llama").model
    calls = []
    decoder_stack(model).layers[0].register_forward_hook(lambda m, a, o: calls.append(a[0].shape))
    decode(model, torch.randint(0, 100, (2, 7)), new_tokens=3)
    assert [tuple(shape[:2]) for shape in calls] == [(2, 7), (2, 1), (2, 1), (2, 1)]


def test_decode_hands_the_cache_on_under_the_models_own_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """transformers 5 renamed the KV cache to ``cache``, in the forward's arguments and in its
    output, and logs a deprecation wherever the old name is used."""
    from transformers.utils import generic

    said: list[str] = []
    monkeypatch.setattr(generic.logger, "warning_once", lambda msg, *a, **k: said.append(msg))
    decode(load("tiny_llama").model, torch.randint(0, 100, (1, 5)), new_tokens=2)
    assert not [msg for msg in said if "deprecated" in msg]


def test_speed_record_is_the_medians_of_the_timings() -> None:
    dense = load("tiny_llama").model
    pruned = copy.deepcopy(dense)
    remove_layers(pruned, [1, 2, 3])
    settings = SpeedSettings(enabled=True, batch_size=2, prompt_tokens=16, new_tokens=4, repeats=3)
    record = compare_speed(dense, pruned, settings)
    for phase, tokens in (("prefill", 2 * 16), ("decode", 2 * 4)):
        entry = record[phase]
        assert [len(entry["seconds"][side]) for side in ("dense", "pruned")] == [3, 3]
        rate = {
            side: tokens / statistics.median(entry["seconds"][side]) for side in entry["seconds"]
        }
        assert entry["dense_tokens_per_s"] == pytest.approx(rate["dense"])
        assert entry["pruned_tokens_per_s"] == pytest.approx(rate["pruned"])
        assert entry["speedup"] == pytest.approx(rate["pruned"] / rate["dense"])
    assert record["settings"]["new_tokens"] == 4


def test_settings_are_checked() -> None:
    with pytest.raises(LayerpruneError, match=r"speed.repeats: 0; allowed: an integer >= 1"):
        SpeedSettings(repeats=0)


def test_speed_off_leaves_the_config_hash_of_earlier_runs() -> None:
    earlier = {"model": {"name": "tiny"}, "sparsity": 0.25}
    off = {**earlier, "speed": {"enabled": False, "repeats": 5}}
    on = {**earlier, "speed": {"enabled": True, "repeats": 5}}
    assert config_hash(off) == config_hash(earlier) != config_hash(on)


TINY = ["model=tiny_llama", "calibration.n=4", "calibration.seq_len=32", "eval=none",
        "logger=none", "force=true", "sparsity=2", "sparsity_unit=layers"]  # fmt: skip


def test_a_run_with_speed_on_records_it_and_one_with_it_off_does_not(tmp_path: Path) -> None:
    fast = ["speed.enabled=true", "speed.prompt_tokens=8", "speed.new_tokens=2", "speed.repeats=1"]
    on = run(compose_config([*TINY, *fast]), tmp_path / "on")
    assert on["speed"]["settings"]["prompt_tokens"] == 8
    assert on["speed"]["decode"]["speedup"] > 0 and "speed" in on["timings"]
    assert "speed" not in run(compose_config(TINY), tmp_path / "off")


def test_bad_speed_settings_fail_before_any_output(tmp_path: Path) -> None:
    with pytest.raises(LayerpruneError, match=r"speed.new_tokens: 0; allowed: an integer >= 1"):
        run(compose_config([*TINY, "speed.new_tokens=0"]), tmp_path)
    assert not list(tmp_path.iterdir())


def test_the_table_shows_the_speedups_where_a_run_measured_them(tmp_path: Path) -> None:
    timed = write_run(tmp_path, "a", "shortgpt", 0.25, {"piqa": 0.6})
    write_run(tmp_path, "b", "random", 0.25, {"piqa": 0.5})
    record = json.loads((timed / "metrics.json").read_text())
    record["speed"] = {"prefill": {"speedup": 1.3125}, "decode": {"speedup": 1.25}}
    (timed / "metrics.json").write_text(json.dumps(record))
    lines = to_markdown(build_table(choose(load_runs([tmp_path])))).splitlines()
    assert lines[0].startswith("| Model | Sparsity | Method | Removed layers | Removed params | "
                               "Prefill × | Decode × | piqa |")  # fmt: skip
    assert "| shortgpt | 2 | 30.0 | 1.31 | 1.25 | 60.0 |" in lines[4]
    assert "| random | 2 | 30.0 | – | – | 50.0 |" in lines[3]
