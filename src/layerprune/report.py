"""``layerprune-report``: the papers' tables and figures, regenerated from run folders alone.

Every number comes from the runs' ``metrics.json`` and ``scores.json``, so a table can be rebuilt
(and audited) anywhere the results tree is. A run that is missing, failed or still running is a
gap, never a zero: a zero would read as a measured collapse.

    layerprune-report results/runs/method_table/smollm2_135m --out results/smollm2_135m
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from omegaconf import OmegaConf

from layerprune.files import atomic_write, read_json, write_text
from layerprune.plots import draw_metrics
from layerprune.records import run_records

Run = dict[str, Any]
Key = tuple[Any, ...]  # (model, sparsity unit, sparsity amount, method, *group-by values)
GAP = "–"
TEXT = ("Model", "Sparsity", "Method")
SUMMARY = ("Avg", "RP", "Agreement", "Stability", "Stability (legacy)", "PPL")
NOTE = (
    "Accuracies, Avg, RP and removed params in %; – : no result (missing, failed or not evaluated)."
)


@dataclass
class Table:
    columns: list[str]
    rows: list[dict[str, Any]]


def get(tree: Any, dotted: str) -> Any:
    """``get(run, "config.model.name")``; None where any part is missing."""
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def finished(run: Run) -> bool:
    return "created" in run


def find_runs(roots: Iterable[Path]) -> list[Run]:
    """Finished runs (``metrics.json``) and unfinished Hydra jobs (``.hydra/config.yaml`` only),
    each with its ``run_dir``. metrics.json is written last and atomically, so it is complete."""
    runs = []
    for root in roots:
        runs += [{**record, "run_dir": str(folder)} for folder, record in run_records(root)]
        for path in sorted(root.glob("**/.hydra/config.yaml")):
            job = path.parent.parent
            if not (job / "metrics.json").exists():
                config = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
                runs.append({"config": config, "run_dir": str(job)})
    return runs


def newest_per_hash(runs: Iterable[Run]) -> list[Run]:
    """One run per config hash, the newest: a rerun with ``force=true`` supersedes the old one."""
    best: dict[str, Run] = {}
    for run in runs:
        key = run.get("config_hash") or run["run_dir"]
        if key not in best or run.get("created", "") > best[key].get("created", ""):
            best[key] = run
    return list(best.values())


def load_runs(roots: Iterable[Path], models: Sequence[str] = ()) -> list[Run]:
    runs = newest_per_hash(find_runs(roots))
    return [r for r in runs if not models or get(r, "config.model.name") in models]


def snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def method_label(config: dict[str, Any]) -> str:
    """The experiment's ``method``; else scorer+recovery, as their config options are named."""
    if config.get("method"):
        return str(config["method"])
    scorer = snake(str(get(config, "scorer._target_")).rsplit(".", 1)[-1])
    steps = get(config, "recovery.steps") or []
    steps = steps.values() if isinstance(steps, dict) else steps  # a list in older runs
    names = [s.get("kind") or snake(s["_target_"].rsplit(".", 1)[-1]).split("_")[0] for s in steps]
    return "+".join([scorer, *names])


def short(value: Any) -> str:
    """A path by its file stem (``calibration.path=.../c4.txt`` reads ``c4``)."""
    text = str(value)
    return Path(text).stem if "/" in text else text


def row_key(run: Run, group_by: Sequence[str]) -> Key:
    config = run["config"]
    groups = (short(get(config, key)) for key in group_by)
    return (get(config, "model.name"), config.get("sparsity_unit"), config.get("sparsity"),
            method_label(config), *groups)  # fmt: skip


def sparsity_label(unit: str, amount: float) -> str:
    if unit == "layers":
        return f"{amount:g} layer{'' if amount == 1 else 's'}"
    return f"{100 * amount:g}% {'params' if unit == 'param_ratio' else 'layers'}"


def choose(runs: Iterable[Run], group_by: Sequence[str] = ()) -> dict[Key, Run]:
    """The run shown in each cell: finished over unfinished, then the newest; a superseded
    finished run is reported, since ``--group-by`` may be what tells the two apart."""
    chosen: dict[Key, Run] = {}
    for run in sorted(runs, key=lambda r: (finished(r), r.get("created", ""))):
        key = row_key(run, group_by)
        if key in chosen and finished(chosen[key]):
            print(f"note: {run['run_dir']} supersedes {chosen[key]['run_dir']} in the table")
        chosen[key] = run
    return chosen


def task_column(row: dict[str, Any]) -> str:
    return row["task"] if row["metric"] == "acc" else f"{row['task']} ({row['metric']})"


def results(run: Run, side: str) -> dict[str, Any]:
    """The evaluation of one side (``dense`` or ``pruned``) of a run, by table column."""
    ev = run.get("eval") or {}
    values = {task_column(r): r[side] for r in ev.get("tasks", [])}
    values.update(Avg=get(ev, f"average.{side}"), PPL=get(ev, f"perplexity.{side}.ppl"))
    return values


def pruned_row(run: Run) -> dict[str, Any]:
    """Removed layers are net of the layers a recovery puts back."""
    plan = run.get("plan") or {}
    return {
        "Removed layers": plan["num_layers"] - plan["num_layers_after"] if plan else None,
        "Removed params": plan.get("removed_param_ratio"),
        **results(run, "pruned"),
        "RP": get(run, "eval.rp"),
        "Agreement": get(run, "eval.stability.agreement"),
        "Stability": get(run, "eval.stability.stability"),
        "Stability (legacy)": get(run, "eval.stability.stability_legacy"),
    }


def dense_row(runs: Iterable[Run]) -> dict[str, Any]:
    """The original model, from the newest run that evaluated each task."""
    row: dict[str, Any] = {"Removed layers": 0, "Removed params": 0.0}
    for run in sorted(filter(finished, runs), key=lambda r: r["created"]):
        row.update({k: v for k, v in results(run, "dense").items() if v is not None})
    return {**row, "RP": 1.0} if row.get("Avg") is not None else row


def build_table(chosen: dict[Key, Run], group_by: Sequence[str] = ()) -> Table:
    """Per model a dense row, then every (sparsity, method) pair seen for that model; a pair
    without a finished run is a row of gaps."""
    names = dict.fromkeys(col for run in chosen.values() for col in results(run, "dense"))
    tasks = [name for name in names if name not in SUMMARY]
    columns = [*TEXT, *group_by, "Removed layers", "Removed params", *tasks, *SUMMARY]
    rows = []
    for model in sorted({key[0] for key in chosen}):
        keys = [key for key in chosen if key[0] == model]
        of_model = [run for key, run in chosen.items() if key[0] == model]
        rows.append({"Model": model, "Sparsity": "0", "Method": "dense", **dense_row(of_model)})
        for unit, amount in sorted({key[1:3] for key in keys}):
            for method, *groups in sorted({key[3:] for key in keys}):
                run = chosen.get((model, unit, amount, method, *groups))
                rows.append({"Model": model, "Sparsity": sparsity_label(unit, amount),
                             "Method": method, **dict(zip(group_by, groups, strict=True)),
                             **(pruned_row(run) if run else {})})  # fmt: skip
    return Table(columns, rows)


def is_gap(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def fmt(column: str, value: Any) -> str:
    if is_gap(value):
        return GAP
    if isinstance(value, str):
        return value
    if column == "Removed layers":
        return str(value)
    if column in ("Agreement", "Stability", "Stability (legacy)"):
        return f"{value:.3f}"
    if column == "PPL":
        return f"{value:.2f}"
    return f"{100 * value:.1f}"


def to_markdown(table: Table) -> str:
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    for row in table.rows:
        lines.append("| " + " | ".join(fmt(c, row.get(c)) for c in table.columns) + " |")
    return "\n".join([*lines, "", NOTE, ""])


def latex_escape(text: str) -> str:
    return re.sub(r"([_%&#$])", r"\\\1", text).replace(GAP, "--")


def to_latex(table: Table) -> str:
    """A booktabs tabular, a rule between models."""
    cols = table.columns
    first_number = cols.index("Removed layers")
    align = "l" * first_number + "r" * (len(cols) - first_number)
    lines = [f"% {NOTE}", rf"\begin{{tabular}}{{{align}}}", r"\toprule"]
    lines.append(" & ".join(latex_escape(c) for c in cols) + r" \\")
    model = None
    for row in table.rows:
        if row["Model"] != model:
            lines.append(r"\midrule")
            model = row["Model"]
        lines.append(" & ".join(latex_escape(fmt(c, row.get(c))) for c in cols) + r" \\")
    return "\n".join([*lines, r"\bottomrule", r"\end{tabular}", ""])


def to_csv(table: Table) -> str:
    """Raw values (fractions, not %) for further analysis; gaps are NaN."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(table.columns)
    for row in table.rows:
        writer.writerow(["NaN" if is_gap(row.get(c)) else row[c] for c in table.columns])
    return buf.getvalue()


def save(fig: Any, path: Path) -> Path:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return path


def filename(*parts: Any) -> str:
    return re.sub(r"[^\w.-]+", "_", "_".join(map(str, parts))) + ".png"


CURVES = {  # run field: (axis label, scale, dense-row column)
    "eval.average.pruned": ("average accuracy (%)", 100.0, "Avg"),
    "eval.perplexity.pruned.ppl": ("perplexity", 1.0, "PPL"),
}


def plot_curves(chosen: dict[Key, Run], out: Path) -> list[Path]:
    """Average accuracy and perplexity against sparsity, per model and sparsity unit; a missing
    run breaks its line instead of drawing a zero."""
    paths = []
    for model, unit in sorted({key[:2] for key in chosen}):
        keys = [key for key in chosen if key[:2] == (model, unit)]
        xs = sorted({key[2] for key in keys})
        if len(xs) < 2 or not any(get(chosen[key], "eval") for key in keys):
            continue
        dense = dense_row(run for key, run in chosen.items() if key[0] == model)
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
        for ax, (field, (ylabel, scale, column)) in zip(axes, CURVES.items(), strict=True):
            for name in sorted({key[3:] for key in keys}):
                ys = [get(chosen.get((model, unit, x, *name)), field) for x in xs]
                ys = [math.nan if is_gap(y) else scale * y for y in ys]
                ax.plot(xs, ys, marker="o", label=" ".join(map(str, name)))
            if not is_gap(dense.get(column)):
                ax.axhline(scale * dense[column], color="black", ls="--", lw=1, label="dense")
            ax.set(xlabel=f"sparsity ({unit})", ylabel=ylabel)
        axes[1].set_yscale("log")
        axes[0].legend(fontsize=8)
        fig.suptitle(model)
        paths.append(save(fig, out / filename("curve", model, unit)))
    return paths


def plot_layers(chosen: dict[Key, Run], out: Path) -> list[Path]:
    """Per model, from its newest scores.json: every scorer's per-layer importance, and the
    cosine similarity of all pairs of residual states, where blocks of alike layers show."""
    newest: dict[str, Path] = {}
    for run in sorted(filter(finished, chosen.values()), key=lambda r: r["created"]):
        if (path := Path(run["run_dir"]) / "scores.json").is_file():
            newest[run["model"]["name"]] = path
    paths = []
    for model, path in sorted(newest.items()):
        scores = read_json(path)
        layer = scores["layer_metrics"]
        title = f"{model}: {scores['n_windows']} calibration windows"
        fig, ax = plt.subplots(figsize=(7, 4), constrained_layout=True)
        draw_metrics(ax, layer)
        ax.set(xlabel="layer", ylabel="importance (low = prune)", title=title)
        paths.append(save(fig, out / filename("importance", model)))
        fig, ax = plt.subplots(figsize=(5.5, 4.5), constrained_layout=True)
        image = ax.imshow(scores["cosine_matrix"], cmap="viridis")
        fig.colorbar(image, ax=ax, label="mean cosine similarity")
        ax.set(xlabel="residual state j (input of layer j)", ylabel="residual state i", title=title)
        paths.append(save(fig, out / filename("similarity", model)))
    return paths


def log_wandb(
    table: Table, figures: list[Path], out: Path, mode: Literal["offline", "online"], project: str
) -> None:
    """The table and figures as one W&B run, offline unless asked (``wandb sync`` uploads it)."""
    import wandb

    run = wandb.init(project=project, job_type="report", dir=str(out), mode=mode)
    columns: list[str | int] = [*table.columns]
    data = [[None if is_gap(row.get(c)) else row[c] for c in table.columns] for row in table.rows]
    images = {f"figures/{path.stem}": wandb.Image(str(path)) for path in figures}
    run.log({"table": wandb.Table(columns=columns, data=data), **images})
    run.finish()


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="layerprune-report", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("paths", nargs="+", type=Path, help="run folders or results roots")
    parser.add_argument("--out", type=Path, default=Path("results/report"), help="output folder")
    parser.add_argument("--model", action="append", default=[], help="only this model (repeatable)")
    parser.add_argument(
        "--group-by", type=lambda s: s.split(","), default=[], metavar="KEY[,KEY]",
        help="config keys that split rows and become columns, e.g. calibration.path,calibration.n",
    )  # fmt: skip
    parser.add_argument("--wandb", action="store_true", help="also log it all as a W&B run")
    parser.add_argument("--wandb-mode", choices=("offline", "online"), default="offline")
    parser.add_argument("--wandb-project", default="layerprune")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(argv)
    runs = load_runs(args.paths, args.model)
    if not runs:
        raise SystemExit(f"layerprune-report: no runs under {' '.join(map(str, args.paths))}")
    chosen = choose(runs, args.group_by)
    table = build_table(chosen, args.group_by)
    markdown = to_markdown(table)
    write_text(args.out / "table.md", markdown)
    write_text(args.out / "table.tex", to_latex(table))
    write_text(args.out / "table.csv", to_csv(table))
    figures = [*plot_curves(chosen, args.out), *plot_layers(chosen, args.out)]
    done = sum(map(finished, runs))
    print(markdown)
    print(f"{done} finished and {len(runs) - done} unfinished runs -> {args.out}")
    if args.wandb:
        log_wandb(table, figures, args.out, args.wandb_mode, args.wandb_project)


if __name__ == "__main__":
    main()
