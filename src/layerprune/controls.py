"""Recovered runs beside plain removal of the same block: the controls a recovery table needs.

A recovery is only worth its training if the model beats removing the same layers without it.
``python -m layerprune.controls RUNS...`` prints, one line of Hydra overrides (shell-quoted) per
block, the plain removal of every block a finished recovered run removed and no finished
run removed plainly yet (the sweep scripts run them); ``layerprune-report`` pairs every
recovered run with the newest plain removal of the same model, the same layers and the same
evaluation (:func:`pair`) in ``recovery.md`` and ``recovery.csv``: training tokens, held-out
MSE and cosine (all tokens and fitted ones) against plain removal, and every perplexity and
the average accuracy of both, with the paired bootstrap interval of the difference where both
runs kept their per-document samples.
"""

from __future__ import annotations

import argparse
import re
import shlex
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

Run = dict[str, Any]
# overrides a control drops from its recovered run: the recovery, the amount, what is written
DROPPED = ("recovery", "sparsity", "method", "first_start", "save_model", "force", "paths.",
           "hydra.")  # fmt: skip
CONTROL = "removal"  # the controls' method label


def _get(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def train_tokens(run: Run) -> int | None:
    """Tokens the run's recovery trained or fitted on, repeats counted; 0 without recovery.

    Runs recorded before the count: optimiser steps x batch x window length (the fold: the
    tokens it was fitted on)."""
    if "created" not in run:
        return None
    total = 0
    seq_len = _get(run, "config.recovery.train_data.seq_len") or 0
    for report in run.get("recovery") or []:
        settings = report.get("settings") or {}
        if "train_tokens" in report:
            total += int(report["train_tokens"])
        elif report.get("steps"):
            total += int(report["steps"]) * int(settings.get("batch_size", 0)) * int(seq_len)
        else:
            total += int(settings.get("tokens", 0))
    return total


def block_report(run: Run) -> dict[str, Any] | None:
    """The report of the step that pruned the block itself (a replacement or the fold)."""
    return next((r for r in run.get("recovery") or [] if r.get("block_start") is not None), None)


def _stems(obj: Any) -> Any:
    """A config with paths reduced to their file names: the same text anywhere compares equal."""
    if isinstance(obj, dict):
        return {k: _stems(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_stems(v) for v in obj]
    return Path(obj).name if isinstance(obj, str) and "/" in obj else obj


def _same_setting(a: Run, b: Run) -> bool:
    return (
        _get(a, "config.model.name") == _get(b, "config.model.name")
        and _get(a, "plan.removed_layers") == _get(b, "plan.removed_layers")
        and _stems(_get(a, "config.eval")) == _stems(_get(b, "config.eval"))
    )


def pair(runs: Iterable[Run]) -> list[tuple[Run, Run | None]]:
    """Every finished recovered run with its control: the newest finished run without
    recovery that removed the same layers of the same model and was evaluated the same way."""
    done = [r for r in runs if "created" in r]
    controls = sorted((r for r in done if not r.get("recovery")), key=lambda r: r["created"])
    pairs = []
    for run in sorted(filter(block_report, done), key=lambda r: str(r["run_dir"])):
        matching = [c for c in controls if _same_setting(run, c)]
        pairs.append((run, matching[-1] if matching else None))
    return pairs


def control_overrides(run: Run) -> list[str]:
    """The Hydra overrides of the plain removal of ``run``'s block: its own overrides (model,
    scorer, calibration, evaluation, preset) less the recovery and the amount, plus
    ``recovery=none``, the block's size in layers and ``++method=removal``, and, where the
    recovery kept the block off the first layers (the linear fold starts at layer 1 or later),
    ``++first_start``. The contiguous scorer picks the block of a size from the same
    statistics and starts, so it is the same block; :func:`pair` checks that it is."""
    path = Path(run["run_dir"]) / ".hydra" / "overrides.yaml"
    given = OmegaConf.to_container(OmegaConf.load(path)) if path.is_file() else []
    assert isinstance(given, list)
    kept = [o for o in map(str, given) if not o.lstrip("+~").startswith(DROPPED)]
    size = len(_get(run, "plan.removed_layers"))
    first_start = _get(run, "plan.first_start") or 0
    pinned = [f"++first_start={first_start}"] if first_start else []
    return [*kept, "recovery=none", f"sparsity={size}", "sparsity_unit=layers", *pinned,
            f"++method={CONTROL}"]  # fmt: skip


def missing_controls(runs: Iterable[Run]) -> list[list[str]]:
    """Overrides of every control no finished run provides yet, each block once."""
    seen: set[str] = set()
    out = []
    for run, control in pair(runs):
        overrides = control_overrides(run)
        key = " ".join(sorted(overrides))
        if control is None and key not in seen:
            seen.add(key)
            out.append(overrides)
    return out


def _fit(report: dict[str, Any], side: str, metric: str, fitted: bool) -> Any:
    return report.get(f"heldout_{metric}_{side}" + ("_fitted" if fitted else ""))


def run_name(run_dir: str) -> str:
    """A run folder's name; a multirun job's (``N_key=value,...``) as ``sweep/N``."""
    path = Path(run_dir)
    number = re.match(r"(\d+)_", path.name)
    return f"{path.parent.name}/{number[1]}" if number else path.name


def objective(report: dict[str, Any]) -> dict[str, Any]:
    """What a block step fitted: its loss and the tokens it left out ("pos 0", "> 10x median"),
    which tell apart rows of the same method (older runs recorded neither: None)."""
    settings = report.get("settings") or {}
    positions, outliers = settings.get("exclude_positions"), settings.get("exclude_outliers")
    left = [f"pos {', '.join(map(str, positions))}"] if positions else []
    left += [f"> {outliers:g}x median"] if outliers is not None else []
    known = "exclude_positions" in settings
    return {"Loss": settings.get("loss"), "Left out": "; ".join(left) or "none" if known else None}


def recovery_rows(
    pairs: Sequence[tuple[Run, Run | None]],
    label: Any,
    results: Any,
    compare: Any,
) -> tuple[list[str], list[dict[str, Any]]]:
    """Columns and rows of the recovery table. ``label(config)`` names a row's method,
    ``results(run, side)`` reads a run's evaluation by table column and ``compare(a, b)`` is the
    paired difference of the average accuracy and its interval's half-width, or None (all from
    :mod:`layerprune.report`)."""
    rows, ppl = [], []
    for run, control in pairs:
        report = block_report(run) or {}
        start, size = int(report["block_start"]), int(report["block_size"])
        mine = results(run, "pruned")
        theirs = results(control, "pruned") if control else {}
        row: dict[str, Any] = {
            "Model": _get(run, "config.model.name"),
            "Method": label(run["config"]),
            "Block": f"[{start}, {start + size})",
            **objective(report),
            "Train tokens": train_tokens(run),
            "Control": run_name(control["run_dir"]) if control else None,
        }
        for metric, name in (("mse", "MSE"), ("cosine", "cos")):
            for fitted, where in ((False, ""), (True, " fitted")):
                row[f"{name}{where} plain"] = _fit(report, "identity", metric, fitted)
                row[f"{name}{where}"] = _fit(report, "after", metric, fitted)
        row["LM loss plain"], row["LM loss"] = (
            report.get("heldout_lm_loss_identity"), report.get("heldout_lm_loss_after")
        )  # fmt: skip
        for column in [c for c in mine if c.startswith("PPL") and not c.endswith((" ±", " †"))]:
            ppl += [column] if column not in ppl else []
            row[column] = mine.get(column)
            row[f"{column} plain"] = theirs.get(column)
        row["Avg"], row["Avg plain"] = mine.get("Avg"), theirs.get("Avg")
        paired = compare(run, control) if control else None
        row["ΔAvg vs plain"], row["ΔAvg vs plain ±"] = paired or (None, None)
        rows.append(row)
    fits = [f"{n}{w}{s}" for n in ("MSE", "cos") for w in ("", " fitted") for s in (" plain", "")]
    if any(row["LM loss"] is not None for row in rows):  # runs that measured it
        fits += ["LM loss plain", "LM loss"]
    columns = ["Model", "Method", "Block", "Loss", "Left out", "Train tokens", *fits]
    columns += [c for p in ppl for c in (p, f"{p} plain")]
    columns += ["Avg", "Avg plain", "ΔAvg vs plain", "Control"]
    return columns, rows


def main(argv: Sequence[str] | None = None) -> None:
    from layerprune.report import load_runs

    parser = argparse.ArgumentParser(prog="python -m layerprune.controls", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("paths", nargs="+", type=Path, help="run folders or results roots")
    args = parser.parse_args(argv)
    for overrides in missing_controls(load_runs(args.paths)):
        print(shlex.join(overrides))


if __name__ == "__main__":
    main()
