"""Each private lm-eval name layerprune relies on, checked on real tasks from the mirror.

When one of these fails after an lm-eval upgrade, fix the matching function in
``layerprune.lm_eval_compat``; nothing else in layerprune touches lm-eval's private API.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import lm_eval
import pytest
import torch
import yaml
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from layerprune.lm_eval_compat import (
    continuation_tokens,
    effective_sample_counts,
    index_entry,
    index_names,
    logged_doc,
    quiet_git_hash,
)
from layerprune.mirror import prepare_tasks
from layerprune.models import LoadedModel

from .conftest import MIRROR, load

TASKS_DIR = Path(lm_eval.__file__).parent / "tasks"


@pytest.fixture(scope="module")
def manager() -> TaskManager:
    return TaskManager()


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return load("tiny_llama")


@pytest.fixture(scope="module")
def hflm(tiny: LoadedModel) -> HFLM:
    return HFLM(pretrained=tiny.model, tokenizer=tiny.tokenizer, batch_size=2, device="cpu")


@pytest.fixture(scope="module")
def piqa_results(
    tiny: LoadedModel, hflm: HFLM, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """lm-eval on the mirror's first three piqa documents, samples logged."""
    source = prepare_tasks(["piqa"], MIRROR, 0, tmp_path_factory.mktemp("tasks"))
    results = lm_eval.simple_evaluate(model=hflm, tasks=["piqa"], limit=3,
                                      task_manager=source.manager, log_samples=True,
                                      bootstrap_iters=0)  # fmt: skip
    assert results is not None
    return results


def test_index_lists_tasks_groups_and_tags(manager: TaskManager) -> None:
    names = index_names(manager)
    assert {"piqa", "arc_easy", "mmlu", "ai2_arc"} <= set(names)
    assert len(names) == len(set(names)) > 1000


def test_a_task_entry_is_its_yaml(manager: TaskManager) -> None:
    entry = index_entry(manager, "arc_easy")
    path = TASKS_DIR / "arc" / "arc_easy.yaml"
    assert entry.name == "arc_easy" and entry.kind == "task"
    assert entry.yaml_path == path
    on_disk = yaml.safe_load(path.read_text())
    for key in ("dataset_path", "dataset_name", "output_type", "test_split", "training_split"):
        assert entry.cfg[key] == on_disk[key]
    assert (entry.cfg["dataset_path"], entry.cfg["dataset_name"]) == ("allenai/ai2_arc", "ARC-Easy")


def test_a_tag_entry_lists_its_tasks(manager: TaskManager) -> None:
    entry = index_entry(manager, "ai2_arc")
    assert entry.kind == "tag"
    assert entry.tags == ("arc_challenge", "arc_easy")  # the tasks whose YAML says tag: ai2_arc


def test_a_group_entry_lists_its_subgroups(manager: TaskManager) -> None:
    entry = index_entry(manager, "mmlu")
    assert entry.kind == "group"
    subgroups = [it if isinstance(it, str) else it["task"] for it in entry.cfg["task"]]
    assert subgroups == ["mmlu_stem", "mmlu_other", "mmlu_social_sciences", "mmlu_humanities"]


def test_an_unknown_name_is_a_key_error(manager: TaskManager) -> None:
    with pytest.raises(KeyError):
        index_entry(manager, "no_such_task")


def test_continuation_tokens_are_the_continuations_bytes(tiny: LoadedModel, hflm: HFLM) -> None:
    """With the byte tokenizer every byte is one token, so the counts are known exactly."""
    ids = tiny.tokenizer("Question: why?\nAnswer: because", add_special_tokens=False).input_ids
    assert continuation_tokens(hflm, "Question: why?\nAnswer:", " because") == ids[-8:]
    # A trailing space of the context moves to the continuation, as lm-eval scores it.
    moved = continuation_tokens(hflm, "Answer: ", "yes")
    assert moved == tiny.tokenizer(" yes", add_special_tokens=False).input_ids
    assert len(moved) == 4
    # An empty context: the prefix token (BOS) is the context; the continuation keeps its bytes.
    assert hflm.prefix_token_id == tiny.tokenizer.bos_token_id
    assert continuation_tokens(hflm, "", "yes") == tiny.tokenizer("yes").input_ids
    assert len(continuation_tokens(hflm, "", "yes")) == 3


def test_logged_rows_hold_requests_loglikelihoods_and_prompt_hash(
    tiny: LoadedModel, piqa_results: dict[str, Any]
) -> None:
    rows = [logged_doc(row) for row in piqa_results["samples"]["piqa"]]
    assert [row.doc_id for row in rows] == [0, 1, 2]
    for row in rows:
        context = f"Question: {row.doc['goal']}\nAnswer:"
        assert row.requests == [(context, f" {row.doc['sol1']}"), (context, f" {row.doc['sol2']}")]
        assert row.prompt_hash == hashlib.sha256(context.encode()).hexdigest()
        expected = [loglikelihood(tiny, ctx, cont) for ctx, cont in row.requests]
        assert row.loglikelihoods == pytest.approx(expected, abs=1e-4)


def test_effective_sample_counts(piqa_results: dict[str, Any]) -> None:
    assert effective_sample_counts(piqa_results) == {"piqa": 3}
    assert effective_sample_counts({"results": {}}) == {}


@torch.no_grad()
def loglikelihood(loaded: LoadedModel, context: str, continuation: str) -> float:
    """log p(continuation | context) by hand: one forward pass over the bytes."""
    tok = loaded.tokenizer
    ctx = tok(context, add_special_tokens=False).input_ids
    cont = tok(continuation, add_special_tokens=False).input_ids
    ids = torch.tensor([ctx + cont])
    logprobs = torch.log_softmax(loaded.model(input_ids=ids).logits[0, :-1].double(), dim=-1)
    targets = ids[0, len(ctx) :]
    return float(logprobs[len(ctx) - 1 :].gather(1, targets[:, None]).sum())


def test_the_git_hash_query_is_quiet_outside_a_checkout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    import lm_eval.evaluator

    monkeypatch.chdir(tmp_path)  # not a git checkout
    original = lm_eval.evaluator.get_git_commit_hash
    with quiet_git_hash():
        assert lm_eval.evaluator.get_git_commit_hash is not original
        assert lm_eval.evaluator.get_git_commit_hash() is None
    assert lm_eval.evaluator.get_git_commit_hash is original
    assert capfd.readouterr().err == ""
    original()  # lm-eval's own prints git's complaint: the reason for the wrapper
    assert "not a git repository" in capfd.readouterr().err
