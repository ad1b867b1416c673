"""lm-eval integration: offline mirror tasks, numbers equal to lm-eval run directly, stability."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lm_eval
import pytest
import yaml
from hydra.utils import instantiate
from lm_eval.tasks import TaskManager
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue

from layerprune.app import evaluator_for
from layerprune.errors import LayerpruneError
from layerprune.evaluation import (
    EvalSuite,
    Evaluator,
    PerplexitySpec,
    chosen_documents,
    evaluate,
    nested_sample,
    prepare,
)
from layerprune.lm_eval_compat import index_entry
from layerprune.mirror import prepare_tasks
from layerprune.pipeline import NoEvaluator
from layerprune.stability import read_samples
from layerprune.surgery import remove_layers

from .conftest import MIRROR, compose_config, load

QUESTIONS = [
    ("the cat sat on the", ["mat", "sky", "idea"], 0),
    ("one two three", ["four", "blue", "seven hundred"], 0),
    ("water is", ["wet", "a prime number", "dry"], 0),
    ("ab ab ab", ["ab", "zz", "q"], 0),
    ("north south east", ["west", "up", "cheese"], 0),
    ("red green", ["blue", "loud", "seventeen"], 0),
    ("monday tuesday", ["wednesday", "banana", "x"], 0),
    ("a b c d", ["e", "zebra", "moon"], 0),
]


def local_task(tmp_path: Path) -> Path:
    """A small multiple-choice task whose data is a local JSON Lines file."""
    data = tmp_path / "tiny_mc.jsonl"
    rows = [
        {"question": q, "choices": c, "label": (i % 3)} for i, (q, c, _) in enumerate(QUESTIONS)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    folder = tmp_path / "tasks"
    folder.mkdir()
    spec = {
        "task": "tiny_mc",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "output_type": "multiple_choice",
        "test_split": "test",
        "doc_to_text": "Q: {{question}}\nA:",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "label",
        "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
    }
    (folder / "tiny_mc.yaml").write_text(yaml.safe_dump(spec))
    return folder


def test_mirror_task_includes_the_builtin_yaml_and_swaps_only_the_data(tmp_path: Path) -> None:
    source = prepare_tasks(["arc_challenge"], MIRROR, 0, tmp_path)
    (generated,) = tmp_path.glob("mirror-tasks-*/arc_challenge.yaml")
    cfg = yaml.safe_load(generated.read_text())
    assert cfg["include"].endswith("lm_eval/tasks/arc/arc_challenge.yaml")
    test_file = MIRROR.resolve() / "hf/allenai/ai2_arc/ARC-Challenge/test.jsonl"
    assert cfg["dataset_kwargs"] == {"data_files": {"test": str(test_file)}}
    assert cfg["test_split"] == "test"
    assert cfg["training_split"] is None and cfg["validation_split"] is None  # not mirrored
    splits = {"training_split", "validation_split", "test_split", "fewshot_split"}
    assert (
        set(cfg) == {"include", "task", "dataset_path", "dataset_name", "dataset_kwargs"} | splits
    )
    # The generated YAML shadows the built-in task.
    assert index_entry(source.manager, "arc_challenge").yaml_path == generated


def test_a_group_runs_every_subtask_from_the_mirror(tmp_path: Path) -> None:
    source = prepare_tasks(["mmlu"], MIRROR, 0, tmp_path)
    assert len(source.members["mmlu"]) == 57
    assert len(list(tmp_path.glob("mirror-tasks-*/mmlu_*.yaml"))) == 57


def test_missing_data_is_listed_before_any_model_work(tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    (mirror / "hf/baber/piqa/default").mkdir(parents=True)
    (mirror / "hf/baber/piqa/default/validation.jsonl").write_text("{}\n")
    with pytest.raises(LayerpruneError) as err:
        prepare_tasks(["piqa", "arc_easy", "boolq"], mirror, 0, tmp_path)
    message = str(err.value)
    assert message.startswith("2 task split(s) missing from the data mirror")
    assert "arc_easy: " + str(mirror / "hf/allenai/ai2_arc/ARC-Easy/test.jsonl") in message
    assert "boolq: " + str(mirror / "hf/aps/super_glue/boolq/validation.jsonl") in message
    assert "piqa" not in message.split("):", 1)[1]


def test_few_shot_mmlu_needs_the_dev_split_the_mirror_lacks(tmp_path: Path) -> None:
    with pytest.raises(
        LayerpruneError, match=r"57 task split\(s\) missing .*num_fewshot=5.*dev\.jsonl"
    ):
        prepare_tasks(["mmlu"], MIRROR, 5, tmp_path)


def test_unknown_task_suggests_close_names(tmp_path: Path) -> None:
    with pytest.raises(LayerpruneError, match=r"unknown lm-eval task 'piqaa' \(did you mean piqa"):
        prepare_tasks(["piqaa"], MIRROR, 0, tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"limit": 0}, "eval.limit must be > 0 or null (all documents); got 0"),
        ({"tasks": []}, "eval.tasks is empty"),
        ({"limit": 3, "samples": {"piqa": [1]}}, "exclude each other"),
        ({"sampling": "last"}, "eval.sampling must be one of random, first; got 'last'"),
        ({"bootstrap_iters": 10}, "eval.bootstrap_iters must be >= 100; got 10"),
    ],
)
def test_bad_eval_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(LayerpruneError, match=message.replace("(", r"\(").replace(")", r"\)")):
        EvalSuite(**{"tasks": ["piqa"], **kwargs})


def test_dense_numbers_equal_lm_eval_run_directly(tmp_path: Path) -> None:
    """layerprune's in-memory evaluation against lm-eval's own CLI path on the saved model."""
    tasks = local_task(tmp_path)
    loaded = load("tiny_llama")
    suite = EvalSuite(tasks=["tiny_mc"], batch_size=4, include_path=str(tasks))
    ours = evaluate(loaded, suite, prepare(suite, MIRROR, tmp_path / "work"))

    loaded.model.save_pretrained(tmp_path / "model")
    loaded.tokenizer.save_pretrained(tmp_path / "model")
    direct = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(tmp_path / "model"), "dtype": "float32", "device": "cpu"},
        tasks=["tiny_mc"],
        task_manager=TaskManager(include_path=str(tasks)),
        batch_size=4,
        log_samples=True,
        bootstrap_iters=0,
    )
    assert direct is not None
    expected = direct["results"]["tiny_mc"]
    assert ours.metrics["tiny_mc"]["acc"] == expected["acc,none"]
    assert ours.metrics["tiny_mc"]["acc_norm"] == expected["acc_norm,none"]
    # Per-sample predictions reproduce lm-eval's own per-document scores.
    logged = {row["doc_id"]: row for row in direct["samples"]["tiny_mc"]}
    samples = ours.samples["tiny_mc"]
    assert len(samples) == len(QUESTIONS)
    for s in samples:
        row = logged[s.doc_id]
        assert s.gold == s.doc_id % 3
        assert float(s.pred_acc == s.gold) == row["acc"]
        assert float(s.pred_norm == s.gold) == row["acc_norm"]
        assert s.loglikelihoods == pytest.approx([r[0] for r in row["filtered_resps"]], abs=1e-5)
        assert s.chars == [len(c) for c in QUESTIONS[s.doc_id][1]]
        assert s.tokens == [len(" " + c) for c in QUESTIONS[s.doc_id][1]]  # byte tokenizer


def test_evaluator_runs_dense_through_the_cache_then_pruned_and_writes_samples(
    tmp_path: Path,
) -> None:
    tasks = local_task(tmp_path)
    suite = EvalSuite(tasks=["tiny_mc", "arc_easy"], limit=4, batch_size=4,
                      include_path=str(tasks))  # fmt: skip
    cache = tmp_path / "cache"
    evaluator = Evaluator(suite, MIRROR, cache)
    loaded = load("tiny_llama")
    with pytest.raises(RuntimeError, match=r"needs Evaluator\.dense"):
        evaluator.pruned(loaded, tmp_path / "early")
    stages: list[str] = []

    @contextmanager
    def stage(name: str) -> Iterator[None]:
        stages.append(name)
        yield

    assert evaluator.dense(loaded, stage) is False
    # The reference: the same model and suite evaluated directly, before any pruning.
    source = prepare(suite, MIRROR, tmp_path / "work")
    dense = evaluate(loaded, suite, source)
    remove_layers(loaded.model, [1, 2, 3])
    pruned = evaluate(loaded, suite, source)
    evaluated = evaluator.pruned(loaded, tmp_path / "run", stage)
    assert stages == ["eval_dense", "eval_pruned"]
    assert list(evaluated) == ["eval"]
    record = evaluated["eval"]
    assert list(record) == ["tasks", "average", "rp", "rp_ci", "stability", "perplexity",
                            "metrics", "n_samples", "unavailable", "uncertainty", "sampling",
                            "note", "dense_from_cache", "pruned_from_cache"]  # fmt: skip
    assert record["dense_from_cache"] is False and record["pruned_from_cache"] is False
    # 4 random documents of each task, recorded by id; both sides answered the same ones
    sampling = record["sampling"]
    assert (sampling["method"], sampling["limit"], sampling["seed"]) == ("random", 4, 0)
    assert sampling["doc_ids"] == {
        "tiny_mc": nested_sample("tiny_mc", len(QUESTIONS), 4, 0),
        "arc_easy": nested_sample("arc_easy", 2376, 4, 0),
    }
    for task, ids in sampling["doc_ids"].items():
        assert sorted(s.doc_id for s in dense.samples[task]) == ids
        assert sorted(s.doc_id for s in pruned.samples[task]) == ids
    for row in record["tasks"]:
        assert row["n"] == 4 and row["dense_ci"]["lo"] <= row["dense"] <= row["dense_ci"]["hi"]
        assert row["delta_ci"]["lo"] <= row["delta"] <= row["delta_ci"]["hi"]
        assert 0 < row["chance"] <= row["majority"] <= 1
        assert row["right_to_wrong"] + row["wrong_to_right"] <= 4
    assert set(record["average"]) >= {"dense_ci", "pruned_ci", "delta_ci"}
    assert record["metrics"] == {"dense": dense.metrics, "pruned": pruned.metrics}
    assert record["n_samples"] == {"tiny_mc": 4, "arc_easy": 4}
    for row in record["tasks"]:
        assert row["dense"] == dense.metrics[row["task"]]["acc"]
        assert row["pruned"] == pruned.metrics[row["task"]]["acc"]
    for label, reference in (("dense", dense), ("pruned", pruned)):
        for task in ("tiny_mc", "arc_easy"):
            path = tmp_path / "run" / "samples" / label / f"{task}.jsonl.gz"
            assert read_samples(path) == reference.samples[task]
    assert evaluator.lm_eval_results is not None
    assert (
        evaluator.lm_eval_results["results"]["arc_easy"]["acc,none"]
        == pruned.metrics["arc_easy"]["acc"]
    )
    text = evaluator.table(evaluated)
    assert text.startswith("dense eval computed\ntask")
    assert "arc_easy" in text and "retained performance RP" in text

    again = Evaluator(suite, MIRROR, cache)
    dense_model = load("tiny_llama")
    assert again.dense(dense_model) is True  # same model, suite, device and data
    assert again.cache_key(dense_model) == evaluator.cache_key(dense_model)
    assert again.pruned(loaded, tmp_path / "run2")["eval"]["metrics"]["dense"] == dense.metrics
    other = load("tiny_llama", seed="1")
    assert again.cache_key(other)["model"] != again.cache_key(dense_model)["model"]


def test_a_plain_removal_is_evaluated_once_per_cache_key_and_layers(tmp_path: Path) -> None:
    tasks = local_task(tmp_path)
    suite = EvalSuite(tasks=["tiny_mc"], limit=6, batch_size=4, include_path=str(tasks))
    cache = tmp_path / "cache"
    first = Evaluator(suite, MIRROR, cache)
    loaded = load("tiny_llama")
    first.dense(loaded)
    remove_layers(loaded.model, [1, 2])
    computed = first.pruned(loaded, tmp_path / "a", removed=[2, 1])["eval"]
    assert computed["pruned_from_cache"] is False
    assert first.lm_eval_results is not None  # lm-eval's own results when computed
    # Another evaluator on another copy of the same removal reads it back: the same record and
    # samples; the reference is the direct evaluation of that copy.
    again = Evaluator(suite, MIRROR, cache)
    copy = load("tiny_llama")
    again.dense(copy)
    remove_layers(copy.model, [1, 2])
    reused = again.pruned(copy, tmp_path / "b", removed=[1, 2])["eval"]
    assert reused["pruned_from_cache"] is True
    direct = evaluate(copy, suite, prepare(suite, MIRROR, tmp_path / "work"))
    assert reused["metrics"]["pruned"] == direct.metrics == computed["metrics"]["pruned"]
    assert read_samples(tmp_path / "b/samples/pruned/tiny_mc.jsonl.gz") == direct.samples["tiny_mc"]
    assert "the same removal's eval reused from the cache" in again.table({"eval": reused})
    # other layers, or no layers named (a recovered model), are evaluated afresh
    other = load("tiny_llama")
    again.dense(other)
    remove_layers(other.model, [1, 3])
    assert again.pruned(other, tmp_path / "c", removed=[1, 3])["eval"]["pruned_from_cache"] is False
    assert again.pruned(copy, tmp_path / "d")["eval"]["pruned_from_cache"] is False


def test_the_cache_key_holds_model_device_suite_and_data(tmp_path: Path) -> None:
    tasks = local_task(tmp_path)
    suite = EvalSuite(tasks=["tiny_mc"], include_path=str(tasks))
    evaluator = Evaluator(suite, MIRROR, tmp_path / "cache")
    loaded = load("tiny_llama")
    assert evaluator.cache_key(loaded) == {
        "version": 2,
        "model": loaded.fingerprint,
        "device": "cpu",
        "suite": {**dataclasses.asdict(suite), "lm_eval": lm_eval.__version__},
        "data": {"source": "mirror", "files": [(str(tasks / "tiny_mc.yaml"),
                                                 (tasks / "tiny_mc.yaml").stat().st_mtime_ns)]},
    }  # fmt: skip


def test_an_evaluator_checks_the_perplexity_text_before_any_model(tmp_path: Path) -> None:
    suite = EvalSuite(tasks=["piqa"], perplexity=PerplexitySpec(path=str(tmp_path / "no.txt")))
    with pytest.raises(LayerpruneError, match=r"perplexity text '.*no\.txt' does not exist"):
        Evaluator(suite, MIRROR, tmp_path)


def test_without_a_suite_the_evaluator_does_nothing(tmp_path: Path) -> None:
    evaluator = evaluator_for(compose_config(["eval=none", f"paths.cache={tmp_path / 'cache'}"]))
    assert isinstance(evaluator, NoEvaluator)
    loaded = load("tiny_llama")
    assert evaluator.dense(loaded) is False
    assert evaluator.pruned(loaded, tmp_path / "run") == {}
    assert evaluator.table({}) == ""
    assert evaluator.lm_eval_results is None
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    ("preset", "n_tasks", "limit", "headline", "texts"),
    [
        ("quick", 5, 50, {"hellaswag", "arc_challenge", "openbookqa"},
         {"wikitext2_tokenized_test": 512}),
        ("standard", 7, 500, {"hellaswag", "arc_challenge", "openbookqa"},
         {"wikitext2": 1024, "c4": 1024}),
        ("ablation", 5, 50, {"hellaswag"}, {"wikitext2": 1024, "c4": 1024}),
        ("lm_eval_paper", 10, None, {"hellaswag", "arc_challenge", "openbookqa"},
         {"wikitext2_tokenized_test": 2048}),
        ("shortgpt_paper", 6, None, {"hellaswag"}, {}),
        ("streamline_paper", 6, None, {"hellaswag"}, {}),
    ],
)  # fmt: skip
def test_presets_build_on_the_shared_base(
    preset: str, n_tasks: int, limit: int | None, headline: set[str], texts: dict[str, int]
) -> None:
    cfg = compose_config([f"eval={preset}", "seed=7"])
    suite = instantiate(cfg.eval, _convert_="all")
    assert isinstance(suite, EvalSuite)
    assert (len(suite.tasks), suite.limit, set(suite.headline)) == (n_tasks, limit, headline)
    assert (suite.num_fewshot, suite.batch_size, suite.seed, suite.include_path) == (0, 16, 7, None)
    assert (suite.sampling, suite.bootstrap_iters) == ("random", 2000)
    assert {spec.label: spec.seq_len for spec in suite.texts()} == texts
    for spec in suite.texts():
        assert Path(spec.path).is_file()
    assert (suite.note or "").startswith("smoke test: 50 documents per task") == (preset == "quick")
    if preset == "ablation":
        assert "is a smoke check" in (suite.note or "")
    assert ("CMNLI" in suite.unavailable) == (preset in ("shortgpt_paper", "streamline_paper"))


def test_the_base_is_not_a_suite() -> None:
    with pytest.raises(MissingMandatoryValue):
        OmegaConf.to_container(compose_config(["eval=_base"]).eval, throw_on_missing=True)


def test_document_samples_are_nested_and_seeded() -> None:
    small, large = nested_sample("boolq", 3270, 100, 0), nested_sample("boolq", 3270, 500, 0)
    assert len(small) == len(set(small)) == 100 and len(large) == 500
    assert set(small) <= set(large)  # the 100-document sample is inside the 500-document one
    assert small == sorted(small) and max(large) < 3270
    assert nested_sample("boolq", 3270, 100, 1) != small  # the seed changes the draw
    assert nested_sample("piqa", 3270, 100, 0) != small  # each task has its own draw
    assert nested_sample("boolq", 3270, 100, 0) == small  # and the same seed repeats it
    assert small[:5] != list(range(5))  # not the first documents


def test_chosen_documents_follow_the_limit_and_the_mirror(tmp_path: Path) -> None:
    source = prepare_tasks(["openbookqa", "boolq"], MIRROR, 0, tmp_path)
    suite = EvalSuite(tasks=["openbookqa", "boolq"], limit=500, seed=3)
    # openbookqa has 500 documents: it runs whole; boolq's 3270 rows are counted in the mirror
    assert chosen_documents(suite, source) == {"boolq": nested_sample("boolq", 3270, 500, 3)}
    first = EvalSuite(tasks=["boolq"], limit=50, sampling="first")
    assert chosen_documents(first, source) is None  # lm-eval's own limit: the first 50
    assert chosen_documents(EvalSuite(tasks=["boolq"]), source) is None  # all documents
    given = EvalSuite(tasks=["boolq"], samples={"boolq": [5, 1]})
    assert chosen_documents(given, source) == {"boolq": [5, 1]}


def test_the_table_shows_intervals_marks_and_the_note() -> None:
    row = {"task": "boolq", "metric": "acc", "dense": 0.62, "pruned": 0.55, "delta": -0.07,
           "dense_ci": {"lo": 0.5, "hi": 0.74}, "pruned_ci": {"lo": 0.41, "hi": 0.68},
           "delta_ci": {"lo": -0.15, "hi": 0.01}, "majority": 0.56, "chance": 0.5,
           "agreement": 0.8, "stability": 0.75, "right_to_wrong": 7, "wrong_to_right": 3,
           "mcnemar_p": 0.34375}  # fmt: skip
    record = {
        "tasks": [row],
        "average": {"dense": 0.62, "pruned": 0.55, "delta": -0.07},
        "rp": 0.55 / 0.62,
        "stability": None,
        "perplexity": {"wiki": {"dense": {"ppl": 20.0, "ci": {"lo": 19.0, "hi": 21.0}},
                                "pruned": {"ppl": 30.0, "n_tokens": 99}}},
        "note": "smoke test: 50 documents per task",
        "dense_from_cache": True,
    }  # fmt: skip
    text = Evaluator.table(object.__new__(Evaluator), {"eval": record})
    lines = text.splitlines()
    assert lines[:2] == ["smoke test: 50 documents per task", "dense eval reused from the cache"]
    assert "0.620±0.120" in lines[3] and "0.550±0.135†" in lines[3]  # 0.55 <= majority 0.56
    assert "-0.070±0.080" in lines[3] and "7/3" in lines[3] and "0.344" in lines[3]
    assert "perplexity wiki: 20.000±1.000 -> 30.000 (99 tokens)" in text
