"""Experiment trackers: Weights & Biases (offline by default) or none.

A tracker receives the finished run record (the content of ``metrics.json``) and the run
folder's figures; it never decides what is computed. Each job finishes its own W&B run, since
Hydra's basic launcher runs every job of a multirun in one process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from layerprune.errors import LayerpruneError


class NoTracker:
    """Logs nothing (``logger=none``)."""

    def log_run(self, record: dict[str, Any], run_dir: Path, lm_eval_results: Any = None) -> None:
        return None


def flatten(prefix: str, obj: Any, out: dict[str, Any]) -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a/b": 1}`` for the numbers in a nested record."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            flatten(f"{prefix}/{key}" if prefix else str(key), value, out)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        out[prefix] = obj
    return out


class WandbTracker:
    """One W&B run per job; a multirun's jobs share ``group`` (the sweep folder by default)."""

    def __init__(
        self,
        project: str = "layerprune",
        entity: str | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
        name: str | None = None,
        mode: str = "offline",
        log_lm_eval: bool = True,
    ) -> None:
        allowed = ("offline", "online", "disabled")
        if mode not in allowed:
            raise LayerpruneError(f"unknown logger.mode '{mode}'; allowed: {', '.join(allowed)}")
        self.project, self.entity, self.group = project, entity, group
        self.tags, self.name, self.mode = tags, name, mode
        self.log_lm_eval = log_lm_eval

    def log_run(self, record: dict[str, Any], run_dir: Path, lm_eval_results: Any = None) -> None:
        import wandb

        run = wandb.init(
            dir=str(run_dir),
            config=record["config"],
            project=self.project,
            entity=self.entity,
            group=self.group,
            tags=self.tags,
            name=self.name,
            mode=self.mode,  # type: ignore[arg-type]  # checked in __init__
            reinit="finish_previous",
        )
        try:
            run.log(scores_table(record, wandb))
            plot = run_dir / "importance.png"
            if plot.is_file():
                run.log({"scores/importance": wandb.Image(str(plot))})
            logged = {k: record[k] for k in ("plan", "eval", "timings") if k in record}
            if "eval" in logged:  # per-task rows keyed by task name: eval/tasks/piqa/stability
                rows = {r["task"]: r for r in logged["eval"]["tasks"]}
                logged["eval"] = {**logged["eval"], "tasks": rows}
            summary = flatten("", logged, {})
            run.summary.update(summary)
            run.log(summary)
            if self.log_lm_eval and lm_eval_results is not None:
                from lm_eval.loggers import WandbLogger

                logger = WandbLogger()  # attaches to the run opened above
                logger.post_init(lm_eval_results)
                logger.log_eval_result()
        finally:
            run.finish()


def scores_table(record: dict[str, Any], wandb: Any) -> dict[str, Any]:
    """Per-layer scores as a W&B table (one row per layer)."""
    metrics = record.get("scores", {}).get("layer_metrics", {})
    if not metrics:
        return {}
    names = list(metrics)
    rows = [[i, *(metrics[n][i] for n in names)] for i in range(len(metrics[names[0]]))]
    return {"scores/layers": wandb.Table(columns=["layer", *names], data=rows)}
