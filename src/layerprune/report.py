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
import numpy as np
from omegaconf import OmegaConf

from layerprune.controls import pair, recovery_rows, train_tokens
from layerprune.errors import LayerpruneError
from layerprune.files import atomic_write, read_json, write_text
from layerprune.plots import draw_metrics
from layerprune.records import run_records
from layerprune.search_report import SEARCH, render
from layerprune.stability import (
    Sample,
    accuracy_stats,
    average_intervals,
    interval,
    paired_correct,
    read_samples,
    stability,
    stability_draws,
)
from layerprune.stats import ITERS, bootstrap_p, holm, percentile_ci, resample_means

Run = dict[str, Any]
Key = tuple[Any, ...]  # (model, sparsity unit, sparsity amount, method, *group-by values)
GAP = "–"
TEXT = ("Model", "Sparsity", "Method")
SUMMARY = ("Avg", "ΔAvg", "RP", "Agreement", "Stability", "Stability (legacy)")
NOTE = (
    "Accuracies, Avg, ΔAvg (pruned − dense), RP and removed params in %; – : no result "
    "(missing, failed or not evaluated). ± : half-width of the 95% interval (accuracies: Wilson; "
    "ΔAvg, RP, stability: paired bootstrap over documents; PPL: bootstrap over windows), "
    "recomputed from the run's per-document samples where it kept them; no ± : no per-document "
    "samples. † : at or below the task's majority-class or chance accuracy on its documents. "
    "Stability: NLL-weighted (README); older runs recorded an exp(NLL)-weighted one, which is "
    "recomputed from their samples where they kept them, else left out. A method run with "
    'several seeds ("random (5 seeds)"): the mean over its seeds, ± their standard '
    "deviation (the spread between seeds, not an interval)."
)
SPEED_NOTE = (
    " Prefill ×, Decode ×: the pruned model's tokens/s over the dense model's, timed "
    "alternately in one process (median of repeats; where a run measured it, "
    "`speed.enabled=true`)."
)
SPEED = {"Prefill ×": "prefill", "Decode ×": "decode"}  # speed-up over the dense model
PM = " ±"  # a column's half-width column
MARK = " †"  # a column's at-chance mark


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
    each with its ``run_dir``. metrics.json is written last and atomically, so it is complete.
    A search's folder is neither: its record is ``search.json`` (:func:`find_searches`)."""
    runs = []
    for root in roots:
        runs += [{**record, "run_dir": str(folder)} for folder, record in run_records(root)]
        for path in sorted(root.glob("**/.hydra/config.yaml")):
            job = path.parent.parent
            if not (job / "metrics.json").exists():
                config = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
                if isinstance(config, dict) and config.get("method") != "search":
                    runs.append({"config": config, "run_dir": str(job)})
    return runs


def find_searches(roots: Iterable[Path], models: Sequence[str] = ()) -> list[tuple[Path, Run]]:
    """Every budgeted search's record (``search.json``) under ``roots``, with its folder
    relative to its root: the search's table and figure go to the same place under ``--out``."""
    found = []
    for root in roots:
        for path in sorted(root.glob("**/search.json")):
            record = read_json(path)
            if record.get("kind") == SEARCH and (
                not models or get(record, "config.model.name") in models
            ):
                found.append((path.parent.relative_to(root), record))
    return found


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
    return "+".join([scorer, *map(step_label, steps)])


def step_label(step: dict[str, Any]) -> str:
    """A recovery step's name, with its objective where that is not the default: a loss other
    than mse, and the positions left out where they are set (``[]``: every token)."""
    name = step.get("kind") or snake(step["_target_"].rsplit(".", 1)[-1]).split("_")[0]
    extras = [step["loss"]] if step.get("loss") not in (None, "mse") else []
    positions = step.get("exclude_positions")
    if positions is not None:
        extras.append(f"no pos {','.join(map(str, positions))}" if positions else "every token")
    return f"{name}({', '.join(extras)})" if extras else name


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


DRAW = ("seed", "scorer.seed", "calibration.seed")  # the config keys whose seeds :func:`draw` reads


def draw(run: Run) -> tuple[Any, ...]:
    """What the seeds drew in a run: the run's seed, its scorer's (a random plan) and its
    calibration windows'. Sweeping ``scorer.seed`` or ``calibration.seed`` rather than
    ``seed`` varies the draw and keeps the evaluated documents (``eval.seed``) the same."""
    return tuple(get(run, f"config.{k}") for k in DRAW)


def choose(runs: Iterable[Run], group_by: Sequence[str] = ()) -> dict[Key, Run]:
    """The run shown in each cell: finished over unfinished, then the newest; a superseded
    finished run is reported, since ``--group-by`` may be what tells the two apart."""
    chosen: dict[Key, Run] = {}
    for run in sorted(runs, key=lambda r: (finished(r), r.get("created", ""))):
        key = row_key(run, group_by)
        seeds = {draw(r) for r in (run, chosen.get(key)) if r}
        if key in chosen and finished(chosen[key]) and len(seeds) == 1:  # (else: seed_groups)
            print(f"note: {run['run_dir']} supersedes {chosen[key]['run_dir']} in the table")
        chosen[key] = run
    return chosen


def seed_groups(runs: Iterable[Run], group_by: Sequence[str] = ()) -> dict[Key, list[Run]]:
    """The cells run with more than one :func:`draw` (the random baseline's seeds, the
    calibration windows' draws): their finished runs, the newest of each draw."""
    groups: dict[Key, dict[Any, Run]] = {}
    for run in sorted(filter(finished, runs), key=lambda r: r["created"]):
        groups.setdefault(row_key(run, group_by), {})[draw(run)] = run
    return {key: list(by_seed.values()) for key, by_seed in groups.items() if len(by_seed) > 1}


def seeds_label(method: str, seeds: int) -> str:
    """A row's method name; a method run with several seeds says how many ("random (5 seeds)")."""
    return f"{method} ({seeds} seeds)" if seeds > 1 else method


def seed_row(runs: Sequence[Run]) -> dict[str, Any]:
    """Several seeds' rows as one: each number's mean, and the standard deviation of its values
    (ddof=1) as its ``±``; the at-chance marks are left out."""
    rows = [pruned_row(run) for run in runs]
    out: dict[str, Any] = {}
    for column in dict.fromkeys(c for row in rows for c in row):
        if column.endswith((PM, MARK)):
            continue
        values = [row[column] for row in rows if not is_gap(row.get(column))]
        if values and all(isinstance(v, int | float) for v in values):
            out[column] = float(np.mean(values))
            out[column + PM] = float(np.std(values, ddof=1)) if len(values) > 1 else None
    return out


def task_column(row: dict[str, Any]) -> str:
    return row["task"] if row["metric"] == "acc" else f"{row['task']} ({row['metric']})"


def half(ci: Any) -> float | None:
    return (ci["hi"] - ci["lo"]) / 2 if isinstance(ci, dict) else None


def perplexities(ev: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{text: {"dense": .., "pruned": ..}}``; older records held one text's ``dense`` and
    ``pruned`` directly (named here by their file's stem, as newer runs name a single text)."""
    ppl = ev.get("perplexity") or {}
    if isinstance(ppl.get("dense"), dict) or isinstance(ppl.get("pruned"), dict):
        path = get(ppl, "dense.path") or get(ppl, "pruned.path")
        return {Path(path).stem if path else "": ppl}
    return {name: entry for name, entry in ppl.items() if isinstance(entry, dict)}


def ppl_column(name: str) -> str:
    return f"PPL {name}" if name else "PPL"


def uncertainty(run: Run) -> tuple[int, int]:
    """The bootstrap seed and resamples the run used (older runs: 0 and the default)."""
    u = get(run, "eval.uncertainty") or {}
    return int(u.get("seed", 0)), int(u.get("bootstrap_iters", ITERS))


def load_side(run: Run, side: str, task: str) -> list[Sample] | None:
    path = Path(run["run_dir"]) / "samples" / side / f"{task}.jsonl.gz"
    return read_samples(path) if path.is_file() else None


_recomputed: dict[tuple[str, str], dict[str, Any]] = {}


def recompute(run: Run) -> dict[str, Any]:
    """:func:`recompute_run`, once per run folder and record."""
    key = (run["run_dir"], str(run.get("created")))
    if key not in _recomputed:
        _recomputed[key] = recompute_run(run)
    return _recomputed[key]


def recompute_run(run: Run) -> dict[str, Any]:
    """Every interval of a run's evaluation, recomputed from its per-document samples where it
    kept them (``samples/{dense,pruned}/<task>.jsonl.gz``), with the run's seed and resamples;
    tasks without samples keep the record's intervals (groups such as mmlu among them: their
    samples are per subtask). Returns the task rows and the average, as the record has them,
    plus ``recomputed`` (tasks) and ``draws`` (task -> bootstrap means, for the average)."""
    ev = run.get("eval") or {}
    seed, iters = uncertainty(run)
    rows, draws, stab, done = [], {}, {}, []
    for row in ev.get("tasks", []):
        row = dict(row)
        dense, pruned = load_side(run, "dense", row["task"]), load_side(run, "pruned", row["task"])
        if dense and pruned and row["metric"] in ("acc", "acc_norm"):
            norm = row["metric"] == "acc_norm"
            try:
                cols = paired_correct(dense, pruned, norm)
            except LayerpruneError as e:
                print(f"note: {run['run_dir']}: {row['task']}: {e}")
            else:
                stats, draws[row["task"]] = accuracy_stats(cols, dense, seed, iters, row["task"])
                row.update(stats)
                s = stability_draws(dense, pruned, norm, seed, iters, row["task"])
                row["stability"] = stability(dense, pruned, norm)
                row["stability_ci"] = interval(*percentile_ci(s))
                stab[row["task"]] = s
                done.append(row["task"])
        rows.append(row)
    average = dict(ev.get("average") or {})
    rp_ci = ev.get("rp_ci")
    if rows and len(draws) == len(rows):
        average.update(average_intervals([draws[r["task"]] for r in rows]))
        rp_ci = average.pop("rp_ci")
    overall = dict(ev.get("stability") or {})
    if "stability_exp_ppl" not in overall:  # an older record: its stability used exp(NLL)
        overall.pop("stability", None)
    if rows and len(stab) == len(rows):
        overall["stability"] = float(np.mean([r["stability"] for r in rows]))
        overall["stability_ci"] = interval(*percentile_ci(np.mean(list(stab.values()), axis=0)))
    return {"tasks": rows, "average": average, "rp_ci": rp_ci, "stability": overall,
            "recomputed": done, "draws": draws}  # fmt: skip


def at_chance(row: dict[str, Any], side: str) -> bool:
    if "majority" not in row and "chance" not in row:
        return False
    floor = max(row.get("majority", -1.0), row.get("chance", -1.0))
    return row.get(side) is not None and row[side] <= floor + 1e-12


def results(run: Run, side: str) -> dict[str, Any]:
    """The evaluation of one side (``dense`` or ``pruned``) of a run, by table column; a
    column's half-width and at-chance mark go under ``column + PM`` and ``column + MARK``."""
    ev = run.get("eval") or {}
    found = recompute(run) if ev else {"tasks": [], "average": {}}
    values: dict[str, Any] = {}
    for r in found["tasks"]:
        column = task_column(r)
        values[column] = r[side]
        values[column + PM] = half(r.get(f"{side}_ci"))
        values[column + MARK] = at_chance(r, side)
    avg = found["average"]
    values.update({"Avg": avg.get(side), "Avg" + PM: half(avg.get(f"{side}_ci"))})
    for name, entry in perplexities(ev).items():
        values[ppl_column(name)] = get(entry, f"{side}.ppl")
        values[ppl_column(name) + PM] = half(get(entry, f"{side}.ci"))
    if side == "pruned" and ev:
        values.update({"ΔAvg": avg.get("delta"), "ΔAvg" + PM: half(avg.get("delta_ci")),
                       "RP" + PM: half(found["rp_ci"])})  # fmt: skip
    return values


def pruned_row(run: Run) -> dict[str, Any]:
    """Removed layers are net of the layers a recovery puts back."""
    plan = run.get("plan") or {}
    return {
        "Removed layers": plan["num_layers"] - plan["num_layers_after"] if plan else None,
        "Removed params": plan.get("removed_param_ratio"),
        "Train tokens": train_tokens(run),
        **{column: get(run, f"speed.{phase}.speedup") for column, phase in SPEED.items()},
        **results(run, "pruned"),
        "RP": get(run, "eval.rp"),
        "Agreement": get(run, "eval.stability.agreement"),
        "Stability": recompute(run)["stability"].get("stability") if run.get("eval") else None,
        "Stability" + PM: half(recompute(run)["stability"].get("stability_ci"))
        if run.get("eval")
        else None,
        "Stability (legacy)": get(run, "eval.stability.stability_legacy"),
    }


def dense_row(runs: Iterable[Run]) -> dict[str, Any]:
    """The original model, from the newest run that evaluated each task."""
    row: dict[str, Any] = {"Removed layers": 0, "Removed params": 0.0}
    for run in sorted(filter(finished, runs), key=lambda r: r["created"]):
        values = results(run, "dense")
        for column, value in values.items():
            if value is not None and not column.endswith((PM, MARK)):
                row.update({k: values[k] for k in (column, column + PM, column + MARK)
                            if k in values})  # fmt: skip
    return {**row, "RP": 1.0} if row.get("Avg") is not None else row


def build_table(
    chosen: dict[Key, Run], group_by: Sequence[str] = (), seeds: dict[Key, list[Run]] | None = None
) -> Table:
    """Per model a dense row, then per sparsity unit every (amount, method) pair seen in that
    unit; a pair without a finished run is a row of gaps (a sweep's missing cell), while a
    method seen only in another unit (e.g. plain removal of a block given in layers) adds none.
    A cell in ``seeds`` (:func:`seed_groups`) is one row over its seeds (:func:`seed_row`)."""
    seeds = seeds or {}
    names = dict.fromkeys(
        col
        for run in chosen.values()
        for col in results(run, "dense")
        if not col.endswith((PM, MARK))
    )
    tasks = [name for name in names if name not in SUMMARY and not name.startswith("PPL")]
    ppl = [name for name in names if name.startswith("PPL")]
    trained = ["Train tokens"] if any(r.get("recovery") for r in chosen.values()) else []
    timed = list(SPEED) if any(r.get("speed") for r in chosen.values()) else []
    columns = [*TEXT, *group_by, "Removed layers", "Removed params", *timed, *trained, *tasks,
               *SUMMARY, *ppl]  # fmt: skip
    rows = []
    for model in sorted({key[0] for key in chosen}):
        keys = [key for key in chosen if key[0] == model]
        of_model = [run for key, run in chosen.items() if key[0] == model]
        rows.append({"Model": model, "Sparsity": "0", "Method": "dense", **dense_row(of_model)})
        for unit, amount in sorted({key[1:3] for key in keys}):
            for method, *groups in sorted({key[3:] for key in keys if key[1] == unit}):
                key = (model, unit, amount, method, *groups)
                run, several = chosen.get(key), seeds.get(key)
                values = seed_row(several) if several else pruned_row(run) if run else {}
                label = seeds_label(method, len(several or ()))
                rows.append({"Model": model, "Sparsity": sparsity_label(unit, amount),
                             "Method": label, **dict(zip(group_by, groups, strict=True)),
                             **values})  # fmt: skip
    return Table(columns, rows)


def is_gap(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def fmt_number(column: str, value: float) -> str:
    if column in ("Agreement", "Stability", "Stability (legacy)"):
        return f"{value:.3f}"
    if column in SPEED:
        return f"{value:.2f}"
    if column.startswith(("MSE", "cos", "LM loss")):  # the recovery table's held-out figures
        return f"{value:.4g}"
    if column.startswith("PPL"):
        return f"{value:.2f}"
    return f"{100 * value:.1f}"


def fmt(column: str, value: Any, pm: Any = None, mark: bool = False) -> str:
    """A cell: the value, `` ± half-width`` where it has one, ``†`` where at chance."""
    if is_gap(value):
        return GAP
    if isinstance(value, str):
        return value
    if column in ("Removed layers", "Train tokens"):
        return f"{value:,}"
    text = fmt_number(column, value)
    if not is_gap(pm):
        text += f" ± {fmt_number(column, pm)}"
    return text + ("†" if mark else "")


def cell(column: str, row: dict[str, Any]) -> str:
    return fmt(column, row.get(column), row.get(column + PM), bool(row.get(column + MARK)))


def to_markdown(table: Table, note: str = NOTE) -> str:
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    for row in table.rows:
        lines.append("| " + " | ".join(cell(c, row) for c in table.columns) + " |")
    return "\n".join([*lines, "", note, ""])


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
        cells = (latex_escape(cell(c, row)).replace("±", r"$\pm$").replace("†", r"$^\dagger$")
                 for c in cols)  # fmt: skip
        lines.append(" & ".join(cells) + r" \\")
    return "\n".join([*lines, r"\bottomrule", r"\end{tabular}", ""])


def to_csv(table: Table) -> str:
    """Raw values (fractions, not %) for further analysis, each followed by its half-width
    (``<column> ±``) and at-chance mark (``<column> †``, 0/1) where any row has one; gaps
    are NaN."""
    columns = []
    for c in table.columns:
        columns.append(c)
        columns += [c + x for x in (PM, MARK) if any(c + x in row for row in table.rows)]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in table.rows:
        values = []
        for c in columns:
            v = row.get(c)
            values.append(int(bool(v)) if c.endswith(MARK) else "NaN" if is_gap(v) else v)
        writer.writerow(values)
    return buf.getvalue()


def save(fig: Any, path: Path) -> Path:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return path


def filename(*parts: Any) -> str:
    return re.sub(r"[^\w.-]+", "_", "_".join(map(str, parts))) + ".png"


def curve_point(run: Run | None, column: str) -> tuple[float, float, float]:
    """A pruned run's value of a table column and its interval's half-widths below and above
    (NaN where missing; 0 where it has no interval)."""
    if run is None or not run.get("eval"):
        return (math.nan, 0.0, 0.0)
    if column == "Avg":
        avg = recompute(run)["average"]
        value, ci = avg.get("pruned"), avg.get("pruned_ci")
    else:
        entry = perplexities(run["eval"]).get(column)
        value, ci = get(entry, "pruned.ppl"), get(entry, "pruned.ci")
    if is_gap(value):
        return (math.nan, 0.0, 0.0)
    if not isinstance(ci, dict):
        return (value, 0.0, 0.0)
    return (value, max(0.0, value - ci["lo"]), max(0.0, ci["hi"] - value))


def seeds_point(runs: Sequence[Run], column: str) -> tuple[float, float, float]:
    """Several seeds' value of a column: their mean, with their standard deviation both ways."""
    values = [v for v, _, _ in (curve_point(run, column) for run in runs) if not math.isnan(v)]
    if not values:
        return (math.nan, 0.0, 0.0)
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return (float(np.mean(values)), sd, sd)


def first_text(runs: Iterable[Run]) -> str | None:
    for run in runs:
        names = list(perplexities(run.get("eval") or {}))
        if names:
            return names[0]
    return None


def plot_curves(
    chosen: dict[Key, Run],
    out: Path,
    seeds: dict[Key, list[Run]] | None = None,
    over: tuple[str, Sequence[str]] | None = None,
) -> list[Path]:
    """Average accuracy and perplexity (of the first text) against sparsity, per model and
    sparsity unit, with 95% error bars (a cell of several seeds: their mean ± standard
    deviation); a missing run breaks its line instead of drawing a zero. ``over``: a group-by
    key and the group-by keys, to draw against that key's (numeric) values instead, per model
    and sparsity (a training budget, say)."""
    seeds = seeds or {}
    # Where a key holds its x value, and how much of the key names its figure: the model and
    # unit (against sparsity), or the model, unit and sparsity (against a group-by key).
    x_at = 2 if over is None else len(TEXT) + 1 + list(over[1]).index(over[0])
    figure_of = len(TEXT) - 1 if over is None else len(TEXT)

    def point(key: Key, field: str) -> tuple[float, float, float]:
        return (
            seeds_point(seeds[key], field) if key in seeds else curve_point(chosen.get(key), field)
        )

    def line(key: Key) -> Key:
        return tuple(v for i, v in enumerate(key) if i >= figure_of and i != x_at)

    def numeric(value: Any) -> bool:
        try:
            return not math.isnan(float(value))
        except (TypeError, ValueError):
            return False

    paths = []
    drawn = [key for key in chosen if numeric(key[x_at])]  # (a control has no budget, say)
    for figure in sorted({key[:figure_of] for key in drawn}, key=str):
        keys = [key for key in drawn if key[:figure_of] == figure]
        xs = sorted({key[x_at] for key in keys}, key=float)
        if len(xs) < 2 or not any(get(chosen[key], "eval") for key in keys):
            continue
        model, unit = figure[:2]
        dense = dense_row(run for key, run in chosen.items() if key[0] == model)
        text = first_text(chosen[key] for key in keys)
        panels = [("Avg", "average accuracy (%)", 100.0, "Avg")]
        if text is not None:
            panels.append((text, f"perplexity {text}".strip(), 1.0, ppl_column(text)))
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
        for ax, (field, ylabel, scale, column) in zip(axes, panels, strict=False):
            for name in sorted({line(key) for key in keys}, key=str):
                at = {key[x_at]: key for key in keys if line(key) == name}
                points = [point(at[x], field) if x in at else (math.nan, 0.0, 0.0) for x in xs]
                ys = [scale * y for y, _, _ in points]
                err = [[scale * lo for _, lo, _ in points], [scale * hi for _, _, hi in points]]
                ax.errorbar(list(map(float, xs)), ys, yerr=err, marker="o", capsize=3,
                            label=" ".join(map(str, name)))  # fmt: skip
            if not is_gap(dense.get(column)):
                ax.axhline(scale * dense[column], color="black", ls="--", lw=1, label="dense")
            if over is None:
                ax.set(xlabel=f"sparsity ({unit})", ylabel=ylabel)
            else:
                ax.set(xlabel=over[0], ylabel=ylabel, xscale="log")
        axes[1].set_yscale("log")
        axes[0].legend(fontsize=8)
        where = model if over is None else f"{model}, {sparsity_label(unit, figure[2])}"
        fig.suptitle(f"{where} (bars: 95% intervals; over seeds: ± standard deviation)")
        suffix = () if over is None else (figure[2], over[0])
        paths.append(save(fig, out / filename("curve", model, unit, *suffix)))
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


ALPHA = 0.05


def pruned_samples(run: Run) -> dict[str, tuple[str, list[Sample]]] | None:
    """``{task: (metric, pruned samples)}`` for every task of a run; None when any task lacks
    its samples file."""
    out = {}
    for row in get(run, "eval.tasks") or []:
        samples = load_side(run, "pruned", row["task"])
        if not samples or row["metric"] not in ("acc", "acc_norm"):
            return None
        out[row["task"]] = (row["metric"], samples)
    return out or None


@dataclass
class Comparison:
    a: str
    b: str
    task: str  # "average" or a task
    delta: float  # a − b
    ci: tuple[float, float]
    p: float
    p_holm: float = math.nan


TaskSamples = dict[str, tuple[str, list[Sample]]]  # {task: (metric, samples)}


def correct(runs: Sequence[TaskSamples], task: str) -> np.ndarray:
    """Per document of ``task``, in doc_id order, the share of ``runs`` (a method's seeds, or
    its one run) right on it."""
    norm = runs[0][task][0] == "acc_norm"
    return np.mean([paired_correct(r[task][1], r[task][1], norm)[:, 0] for r in runs], axis=0)


def compare_pair(
    a: Sequence[TaskSamples],
    b: Sequence[TaskSamples],
    names: tuple[str, str],
    seed: int,
    iters: int,
) -> list[Comparison]:
    """Paired bootstrap of method a minus method b, per task and on the average: each task's
    documents resampled on their own, the same indices for both methods. A method run with
    several seeds counts, per document, the share of its seeds right on it: the interval is
    over documents, for these seeds."""
    draws, observed = {}, {}
    for task in a[0]:
        cols = np.stack([correct(a, task), correct(b, task)], axis=1)
        draws[task] = resample_means({task: cols}, iters, seed)[task]
        observed[task] = float(cols[:, 0].mean() - cols[:, 1].mean())
    out = []
    for task, d in draws.items():
        diff = d[:, 0] - d[:, 1]
        out.append(Comparison(*names, task, observed[task], percentile_ci(diff),
                              bootstrap_p(diff, observed[task])))  # fmt: skip
    mean = np.mean(list(draws.values()), axis=0)
    diff, delta = mean[:, 0] - mean[:, 1], float(np.mean(list(observed.values())))
    out.append(Comparison(*names, "average", delta, percentile_ci(diff), bootstrap_p(diff, delta)))
    return out


def same_documents(a: TaskSamples, b: TaskSamples) -> bool:
    if a.keys() != b.keys():
        return False
    return all(
        a[t][0] == b[t][0] and {s.doc_id for s in a[t][1]} == {s.doc_id for s in b[t][1]} for t in a
    )


def compare_methods(chosen: dict[Key, Run], seeds: dict[Key, list[Run]] | None = None) -> str:
    """``comparisons.md``: per model, sparsity and group, every pair of methods evaluated on the
    same documents, with the paired bootstrap interval of their difference (average and per
    task) and a Holm-corrected p-value (the average comparisons of a cell are one family, its
    per-task comparisons another); the best method is named only where it is significantly
    above every other one. A cell in ``seeds`` is compared as all its seeds
    (:func:`compare_pair`)."""
    lines = [
        "# Method comparisons",
        "",
        "Δ = accuracy of the first method minus the second's, in points, on the same documents. "
        "95% interval: paired percentile bootstrap over documents (each task resampled on its "
        "own, the same documents for both methods). p: two-sided normal p-value of the "
        "difference from its bootstrap standard error, 2Φ(−|Δ| / SE), Holm-corrected within "
        f"each family. Significant: Holm p < {ALPHA}. A method run with several seeds: per "
        "document, the share of its seeds right on it (the interval is over documents, for "
        "those seeds).",
        "",
    ]
    cells: dict[Key, dict[str, list[Run]]] = {}
    for key, run in chosen.items():
        if finished(run) and run.get("eval"):
            group = (seeds or {}).get(key) or [run]
            cells.setdefault((*key[:3], *key[4:]), {})[seeds_label(key[3], len(group))] = group
    for cell_key, runs in sorted(cells.items(), key=lambda kv: str(kv[0])):
        if len(runs) < 2:
            continue
        model, unit, amount, *groups = cell_key
        title = " ".join([str(model), sparsity_label(unit, amount), *map(str, groups)])
        lines += [f"## {title}", ""]
        samples = {m: [pruned_samples(r) for r in group] for m, group in sorted(runs.items())}
        without = [m for m, s in samples.items() if any(x is None for x in s)]
        if without:
            lines += [f"Without per-document samples, so not compared (no interval can be "
                      f"computed): {', '.join(without)}.", ""]  # fmt: skip
        have = {m: [x for x in s if x is not None] for m, s in samples.items() if m not in without}
        seed, iters = uncertainty(next(iter(runs.values()))[0])
        found: list[Comparison] = []
        methods = sorted(have)
        for i, a in enumerate(methods):
            for b in methods[i + 1 :]:
                if all(same_documents(have[a][0], x) for x in have[a][1:] + have[b]):
                    found += compare_pair(have[a], have[b], (a, b), seed, iters)
                else:
                    lines += [f"{a} and {b} were evaluated on different documents: not "
                              "compared.", ""]  # fmt: skip
        if not found:
            continue
        for family in ("average", "tasks"):
            members = [c for c in found if (c.task == "average") == (family == "average")]
            for c, p in zip(members, holm([c.p for c in members]), strict=True):
                c.p_holm = p
        lines += ["| method A | method B | task | Δ (A − B) | 95% interval | p (Holm) | |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for c in sorted(found, key=lambda c: (c.task != "average", c.task, c.a, c.b)):
            verdict = "significant" if c.p_holm < ALPHA else "undecided"
            lines.append(
                f"| {c.a} | {c.b} | {c.task} | {100 * c.delta:+.1f} | "
                f"[{100 * c.ci[0]:+.1f}, {100 * c.ci[1]:+.1f}] | {c.p_holm:.3g} | {verdict} |"
            )
        lines += ["", *verdicts([c for c in found if c.task == "average"], methods), ""]
    return "\n".join(lines)


def verdicts(average: list[Comparison], methods: list[str]) -> list[str]:
    """In words: the best method where it is significantly above every other, and the
    undecided pairs."""
    wins = {m: 0 for m in methods}
    for c in average:
        if c.p_holm < ALPHA:
            wins[c.a if c.delta > 0 else c.b] += 1
    best = [m for m, w in wins.items() if w == len(methods) - 1]
    out = [f"Best on the average: **{best[0]}**, significantly above every other method."
           if best else "No method is significantly best on the average."]  # fmt: skip
    undecided = [c for c in average if c.p_holm >= ALPHA]
    if undecided:
        pairs = "; ".join(
            f"{c.a} vs {c.b} (Δ {100 * c.delta:+.1f}, [{100 * c.ci[0]:+.1f}, "
            f"{100 * c.ci[1]:+.1f}], p = {c.p_holm:.3g})"
            for c in undecided
        )
        out.append(f"Undecided on the average (the data cannot order them): {pairs}.")
    return out


RECOVERY_NOTE = (
    "Each recovered run beside plain removal of the same block (its control: the newest run "
    "without recovery that removed the same layers, all of the block's, from the same model and "
    "was evaluated the same way; – where there is none, see `python -m layerprune.controls`). "
    "A block replacement (layer, ffn, swiglu) keeps one added layer in place of the block, so "
    "its model has one layer more than its control (a replaced block of n + 1 layers removes n "
    "net, the control n + 1); the linear fold adds none. Train tokens: tokens the "
    "recovery trained or fitted on, repeats counted. MSE, cos: held-out mean squared error and "
    "mean token cosine against the dense block's output, over all tokens and over the tokens "
    "the objective fitted; LM loss: the model's held-out next-token loss, where the run "
    "measured it; plain = the block's input (plain removal). Avg, ΔAvg vs plain in %; "
    "± : half-width of the paired bootstrap 95% interval over documents."
)


def paired_comparison(a: Run, b: Run) -> Comparison | None:
    """Average accuracy of ``a`` minus ``b`` on the same documents, with its paired interval;
    None unless both kept their samples of the same documents."""
    sa, sb = pruned_samples(a), pruned_samples(b)
    if not sa or not sb or not same_documents(sa, sb):
        return None
    seed, iters = uncertainty(a)
    return compare_pair([sa], [sb], ("a", "b"), seed, iters)[-1]


def paired_average(a: Run, b: Run) -> tuple[float, float] | None:
    """:func:`paired_comparison` as the difference and its interval's half-width."""
    average = paired_comparison(a, b)
    return None if average is None else (average.delta, (average.ci[1] - average.ci[0]) / 2)


def recovery_table(runs: list[Run]) -> Table | None:
    """Recovered runs beside their controls (:mod:`layerprune.controls`); None without any."""
    pairs = pair(runs)
    if not pairs:
        return None
    return Table(*recovery_rows(pairs, method_label, results, paired_average))


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
    parser.add_argument(
        "--curve-over", metavar="KEY", default=None,
        help="draw the curves against this --group-by key instead of the sparsity, e.g. "
        "recovery.budget.tokens",
    )  # fmt: skip
    parser.add_argument(
        "--choices", action="store_true",
        help="also write choices.md: how much each criterion's chosen layers depend on the "
        "--group-by settings and seeds, and what the differences cost",
    )  # fmt: skip
    parser.add_argument("--wandb", action="store_true", help="also log it all as a W&B run")
    parser.add_argument("--wandb-mode", choices=("offline", "online"), default="offline")
    parser.add_argument("--wandb-project", default="layerprune")
    args = parser.parse_args(argv)
    if args.curve_over is not None and args.curve_over not in args.group_by:
        parser.error(
            f"--curve-over: {args.curve_over}; allowed: one of the --group-by keys "
            f"({','.join(args.group_by) or 'none given'})"
        )
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(argv)
    runs = load_runs(args.paths, args.model)
    searches = find_searches(args.paths, args.model)
    if not runs and not searches:
        raise SystemExit(f"layerprune-report: no runs under {' '.join(map(str, args.paths))}")
    for folder, record in searches:
        render(record, args.out / folder)
        print(f"search {folder} -> {args.out / folder}")
    if runs:
        report_runs(runs, args)


def report_runs(runs: list[Run], args: argparse.Namespace) -> None:
    """The table, comparisons, claims, choices and figures of ``runs``."""
    chosen = choose(runs, args.group_by)
    seeds = seed_groups(runs, args.group_by)
    table = build_table(chosen, args.group_by, seeds)
    markdown = to_markdown(table, NOTE + SPEED_NOTE if "Prefill ×" in table.columns else NOTE)
    write_text(args.out / "table.md", markdown)
    write_text(args.out / "table.tex", to_latex(table))
    write_text(args.out / "table.csv", to_csv(table))
    write_text(args.out / "comparisons.md", compare_methods(chosen, seeds))
    if recovered := recovery_table(runs):
        write_text(args.out / "recovery.md", to_markdown(recovered, RECOVERY_NOTE))
        write_text(args.out / "recovery.csv", to_csv(recovered))
    from layerprune.claims import claims_markdown, claims_table  # it reads this module's runs

    claims = claims_table(runs)
    if any(row["Verdict"] != "gap" for row in claims.rows):
        write_text(args.out / "claims.md", claims_markdown(claims))
    if args.choices:
        from layerprune.choices import choices_markdown  # it reads this module's runs

        write_text(args.out / "choices.md", choices_markdown(runs, args.group_by))
    over = None if args.curve_over is None else (args.curve_over, args.group_by)
    figures = [*plot_curves(chosen, args.out, seeds, over), *plot_layers(chosen, args.out)]
    done = sum(map(finished, runs))
    print(markdown)
    print(f"{done} finished and {len(runs) - done} unfinished runs -> {args.out}")
    if args.wandb:
        log_wandb(table, figures, args.out, args.wandb_mode, args.wandb_project)


if __name__ == "__main__":
    main()
