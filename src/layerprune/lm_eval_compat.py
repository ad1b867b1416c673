"""The one place that reads lm-eval's private names and internal structures.

lm-eval is pinned, but its private API (underscore names, the task index of
``lm_eval.tasks._index``, the rows that ``simple_evaluate(log_samples=True)`` logs) changes
between releases without notice. Every such use goes through a small function here, and
``tests/test_lm_eval_compat.py`` checks each one on real tasks, so an lm-eval upgrade that
renames or reshapes one of them fails there, by name, instead of deep inside an evaluation.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lm_eval.api.model import TemplateLM
from lm_eval.tasks import TaskManager

EntryKind = Literal["task", "py_task", "group", "tag", "unknown"]


@dataclass(frozen=True)
class IndexEntry:
    """What lm-eval's task index knows of a name, before any task is built.

    ``cfg`` is the task's or group's YAML with includes resolved (functions not), ``tags`` the
    names a tag stands for.
    """

    name: str
    kind: EntryKind
    yaml_path: Path | None
    cfg: dict[str, Any] = field(default_factory=dict)
    tags: tuple[str, ...] = ()


def index_names(manager: TaskManager) -> list[str]:
    """Every task, group and tag name the manager knows, in its index order."""
    return list(manager.task_index)


def index_entry(manager: TaskManager, name: str) -> IndexEntry:
    """The index entry of ``name`` (a ``KeyError`` if unknown), as a plain value.

    lm-eval's ``Entry`` (``kind`` an enum member, ``tags`` a set, ``cfg`` possibly None) is
    converted here so that the rest of layerprune never sees its types.
    """
    entry = manager.task_index[name]
    return IndexEntry(
        name=str(entry.name),
        kind=entry.kind.name.lower(),
        yaml_path=Path(entry.yaml_path) if entry.yaml_path is not None else None,
        cfg=dict(entry.cfg or {}),
        tags=tuple(sorted(entry.tags)),
    )


def continuation_tokens(lm: TemplateLM, context: str, continuation: str) -> list[int]:
    """The token ids lm-eval scores for ``continuation`` after ``context``.

    This is what ``TemplateLM.loglikelihood`` does before scoring: an empty context makes the
    prefix token the context (or the continuation's own first token, when they are equal);
    otherwise the private ``_encode_pair`` splits the encoding of the whole text.
    """
    if context == "":
        tokens = list(lm.tok_encode(continuation, add_special_tokens=False))
        return tokens if lm.prefix_token_id != tokens[0] else tokens[1:]
    return list(lm._encode_pair(context, continuation)[1])


@dataclass(frozen=True)
class LoggedDoc:
    """One document of a loglikelihood task as ``simple_evaluate(log_samples=True)`` logs it."""

    doc_id: int
    doc: dict[str, Any]
    loglikelihoods: list[float]  # one per request (option), after the task's filters
    requests: list[tuple[str, str]]  # (context, continuation) per request
    prompt_hash: str


def logged_doc(row: dict[str, Any]) -> LoggedDoc:
    """A logged sample row, read field by field (their names are lm-eval's, not documented)."""
    return LoggedDoc(
        doc_id=int(row["doc_id"]),
        doc=row["doc"],
        loglikelihoods=[float(resp[0]) for resp in row["filtered_resps"]],
        requests=[(str(ctx), str(cont)) for ctx, cont in row["arguments"]],
        prompt_hash=str(row["prompt_hash"]),
    )


def effective_sample_counts(results: dict[str, Any]) -> dict[str, int]:
    """Documents each task was evaluated on (after ``limit``), from lm-eval's results."""
    return {task: int(v["effective"]) for task, v in results.get("n-samples", {}).items()}


def _git_describe_quietly() -> str | None:
    try:
        out = subprocess.check_output(["git", "describe", "--always"], stderr=subprocess.DEVNULL)
    except (subprocess.CalledProcessError, FileNotFoundError):
        return None
    return out.decode().strip()


@contextmanager
def quiet_git_hash() -> Iterator[None]:
    """``simple_evaluate`` records the working folder's git commit by running ``git
    describe``, which, outside a checkout, prints "fatal: not a git repository" straight to
    the console; inside this context the same query runs with its stderr discarded."""
    import lm_eval.evaluator

    original = lm_eval.evaluator.get_git_commit_hash
    lm_eval.evaluator.get_git_commit_hash = _git_describe_quietly
    try:
        yield
    finally:
        lm_eval.evaluator.get_git_commit_hash = original
