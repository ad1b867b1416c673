"""Run lm-eval tasks from an offline mirror with their built-in prompts unchanged.

A mirror is a folder laid out as ``hf/<dataset_path>/<dataset_name or default>/<split>.jsonl``
with the hub's field names. For every leaf task of the requested tasks and groups we write a
YAML that ``include:``s the task's built-in YAML and overrides only the dataset fields (the data
files and the splits the mirror has). Loaded through a ``TaskManager`` include path, these
shadow the built-in tasks of the same name, so groups such as ``mmlu`` resolve to them too.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from lm_eval.tasks import TaskManager

from layerprune.cache import digest
from layerprune.errors import LayerpruneError
from layerprune.files import write_text
from layerprune.lm_eval_compat import index_entry, index_names

SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")
LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow")  # data files already on disk


@dataclass(frozen=True)
class LeafTask:
    name: str
    yaml_path: Path
    dataset_path: str
    dataset_name: str | None
    splits: dict[str, str | None]  # SPLIT_KEYS -> split name
    output_type: str = "multiple_choice"
    fields: frozenset[str] | None = None  # the document fields its prompts read (None: unknown)

    @property
    def local(self) -> bool:
        return self.dataset_path in LOCAL_BUILDERS

    @property
    def eval_split(self) -> str | None:
        return self.splits["test_split"] or self.splits["validation_split"]

    @property
    def fewshot_split(self) -> str | None:
        s = self.splits
        return s["fewshot_split"] or s["training_split"] or s["validation_split"]

    def mirror_dir(self, mirror: Path) -> Path:
        return mirror / "hf" / self.dataset_path / (self.dataset_name or "default")


PROMPT_KEYS = ("doc_to_text", "doc_to_target", "doc_to_choice")
JINJA_NAMES = frozenset({"range", "loop", "dict", "namespace", "lipsum", "cycler", "joiner"})


def prompt_fields(cfg: dict[str, Any]) -> frozenset[str] | None:
    """The fields of a raw document that a task's prompt templates read, so that a mirror file
    lacking one fails before any model work: a Jinja template renders a missing field as an
    empty string and would score garbage silently. None where a Python function preprocesses
    the documents or builds a prompt, since its needs cannot be read from the config."""
    from jinja2 import Environment, meta

    if cfg.get("process_docs"):
        return None
    fields: set[str] = set()
    for key in PROMPT_KEYS:
        value = cfg.get(key)
        if not isinstance(value, str):
            continue  # a constant list of choices, or absent
        if "{{" in value or "{%" in value:
            fields |= meta.find_undeclared_variables(Environment().parse(value)) - JINJA_NAMES
        elif value.isidentifier():
            fields.add(value)  # lm-eval reads a bare name as that field of the document
        else:
            return None  # a function
    return frozenset(fields)


def check_task_names(manager: TaskManager, names: list[str]) -> None:
    known = index_names(manager)
    unknown = [n for n in names if n not in known]
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, known, n=3)
            hints.append(f"'{name}'" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise LayerpruneError(
            f"unknown lm-eval task {', '.join(hints)}; see `lm-eval ls tasks` for the allowed names"
        )


def leaf_tasks(manager: TaskManager, names: list[str]) -> dict[str, list[LeafTask]]:
    """The leaf tasks behind each task, group or tag name, in lm-eval's order."""
    check_task_names(manager, names)
    seen: dict[str, LeafTask] = {}

    def visit(name: str) -> list[LeafTask]:
        entry = index_entry(manager, name)
        if entry.kind == "tag":
            return [leaf for sub in entry.tags for leaf in visit(sub)]
        if entry.kind == "group":
            items = entry.cfg.get("task", [])
            return [
                leaf for it in items for leaf in visit(it if isinstance(it, str) else it["task"])
            ]
        if name not in seen:
            cfg = entry.cfg
            if entry.yaml_path is None or "dataset_path" not in cfg:
                raise LayerpruneError(f"lm-eval task '{name}' has no YAML dataset to mirror")
            seen[name] = LeafTask(
                name=name,
                yaml_path=entry.yaml_path,
                dataset_path=str(cfg["dataset_path"]),
                dataset_name=cfg.get("dataset_name"),
                splits={k: cfg.get(k) for k in SPLIT_KEYS},
                output_type=str(cfg.get("output_type", "multiple_choice")),
                fields=prompt_fields(cfg),
            )
        return [seen[name]]

    return {name: visit(name) for name in names}


def missing_from_mirror(leaves: list[LeafTask], mirror: Path, num_fewshot: int) -> list[str]:
    missing = []
    for leaf in leaves:
        folder = leaf.mirror_dir(mirror)
        needed = [leaf.eval_split] + ([leaf.fewshot_split] if num_fewshot > 0 else [])
        for split in needed:
            if split is None:
                missing.append(f"{leaf.name}: the task defines no split for this use")
            elif not (folder / f"{split}.jsonl").is_file():
                missing.append(f"{leaf.name}: {folder / f'{split}.jsonl'}")
    return missing


def check_hub(leaves: list[LeafTask]) -> None:
    """Without a mirror the data comes from the hub: fail now, not after loading a model."""
    from huggingface_hub import HfApi

    api, missing = HfApi(), []
    for path in sorted({leaf.dataset_path for leaf in leaves}):
        try:
            api.dataset_info(path, timeout=10)
        except Exception as e:  # offline, unknown, gated: all mean the task cannot run
            users = [leaf.name for leaf in leaves if leaf.dataset_path == path]
            missing.append(f"{path} for {', '.join(users[:3])} ({type(e).__name__})")
    if missing:
        raise LayerpruneError(
            f"no data mirror is set and the hub does not serve {'; '.join(missing)}; set "
            "data.mirror (or LAYERPRUNE_DATA_MIRROR) to an offline mirror folder"
        )


def override(leaf: LeafTask, mirror: Path) -> dict[str, Any]:
    """The task YAML that swaps only the data source for the mirror's files."""
    folder = leaf.mirror_dir(mirror)
    present = {s for s in leaf.splits.values() if s and (folder / f"{s}.jsonl").is_file()}
    return {
        "include": str(leaf.yaml_path),
        "task": leaf.name,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {s: str(folder / f"{s}.jsonl") for s in sorted(present)}},
        **{k: (v if v in present else None) for k, v in leaf.splits.items()},
    }


@dataclass
class TaskSource:
    """Where lm-eval reads each task from: the hub (mirror None) or a mirror folder."""

    manager: TaskManager
    members: dict[str, list[LeafTask]]  # requested name -> its leaf tasks
    mirror: Path | None

    @property
    def leaves(self) -> list[LeafTask]:
        unique = {leaf.name: leaf for group in self.members.values() for leaf in group}
        return list(unique.values())

    def document_count(self, leaf: LeafTask) -> int | None:
        """Rows of the leaf's evaluation split in the mirror (one document each); None where
        the data is not the mirror's (local or hub tasks: ask lm-eval's task object)."""
        if self.mirror is None or leaf.local or leaf.eval_split is None:
            return None
        path = leaf.mirror_dir(self.mirror) / f"{leaf.eval_split}.jsonl"
        with path.open("rb") as f:
            return sum(1 for line in f if line.strip())

    def identity(self) -> dict[str, Any]:
        """What identifies the data, for cache keys: the mirror files' names and sizes."""
        if self.mirror is None:
            return {"source": "hub", "tasks": [leaf.name for leaf in self.leaves]}
        files = []
        for leaf in self.leaves:
            if leaf.local:
                files.append((str(leaf.yaml_path), leaf.yaml_path.stat().st_mtime_ns))
                continue
            for path in sorted(leaf.mirror_dir(self.mirror).glob("*.jsonl")):
                files.append((str(path.relative_to(self.mirror)), path.stat().st_size))
        return {"source": "mirror", "files": files}


def prepare_tasks(
    names: list[str],
    mirror: str | Path | None,
    num_fewshot: int,
    work_dir: Path,
    include_path: str | None = None,
) -> TaskSource:
    """Check every task before any model work; point lm-eval at the mirror when one is set.

    Tasks whose data are local files (``dataset_path: json`` and the like, e.g. the user's own
    tasks under ``include_path``) run as they are.
    """
    if include_path and not Path(include_path).is_dir():
        raise LayerpruneError(f"eval.include_path '{include_path}' is not a folder")
    user_paths = [include_path] if include_path else []
    builtin = TaskManager(include_path=user_paths or None)
    members = leaf_tasks(builtin, names)
    remote = [leaf for group in members.values() for leaf in group if not leaf.local]
    if mirror is None:
        check_hub(remote)
        return TaskSource(builtin, members, None)
    root = Path(mirror).expanduser().resolve()
    if not (root / "hf").is_dir():
        raise LayerpruneError(
            f"data mirror '{mirror}' has no hf/ folder; set data.mirror (or "
            "LAYERPRUNE_DATA_MIRROR) to a folder laid out as hf/<dataset_path>/<name>/<split>.jsonl"
        )
    leaves = list({leaf.name: leaf for leaf in remote}.values())
    missing = missing_from_mirror(leaves, root, num_fewshot)
    if missing:
        shown = "; ".join(missing[:10]) + (
            f"; and {len(missing) - 10} more" if len(missing) > 10 else ""
        )
        raise LayerpruneError(
            f"{len(missing)} task split(s) missing from the data mirror '{root}' "
            f"(num_fewshot={num_fewshot}): {shown}"
        )
    configs = [override(leaf, root) for leaf in leaves]
    folder = work_dir / f"mirror-tasks-{digest(configs)[:16]}"
    for cfg in configs:
        text = yaml.safe_dump(cfg, sort_keys=False)
        path = folder / f"{cfg['task']}.yaml"
        if not path.is_file() or path.read_text() != text:
            write_text(path, text)
    return TaskSource(TaskManager(include_path=[*user_paths, str(folder)]), members, root)
