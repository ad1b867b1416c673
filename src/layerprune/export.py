"""A pruned checkpoint that says how it was made.

``config.json`` gets a ``layerprune_recipe`` entry (the base model, the scorer and selection,
the sparsity, the removed and kept original layers, every recovery step with its settings and
training budget, the calibration text, the layerprune version), and the folder gets a model
card (README.md) with the same recipe, the parameter counts and, when there is one, the
evaluation table. The weights are written by :func:`layerprune.recovery.save_recovered`, so a
model holding non-standard replacement modules is saved so that it cannot be mis-loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import layerprune
from layerprune.calibration import Calibration
from layerprune.files import commit_dir, staging_dir, write_text
from layerprune.layers import decoder_stack
from layerprune.models import LoadedModel
from layerprune.recovery import save_recovered
from layerprune.selection import Plan

RECIPE = "layerprune_recipe"
# A GGUF conversion leaves the GGUF's internal name here; it would pass for the base model.
STALE_NAME_KEYS = ("_model_name_or_path",)


def recipe(
    loaded: LoadedModel,
    plan: Plan,
    calibration: Calibration | None,
    recovery: list[dict[str, Any]],
) -> dict[str, Any]:
    """How the model was made, as plain JSON data."""
    return {
        "layerprune_version": layerprune.__version__,
        "base_model": {
            "name": loaded.name,
            "source": loaded.source,
            "fingerprint": loaded.fingerprint,
        },
        "scorer": plan.scorer,
        "selection": plan.selection,
        "sparsity": plan.sparsity,
        "original_num_layers": plan.num_layers,
        "removed_layers": plan.removed_layers,
        "kept_layers": plan.kept_layers,
        "layers_added": plan.layers_added,
        "params_before": plan.params_before,
        "params_after": plan.params_after,
        "calibration": calibration.identity() if calibration else None,
        "recovery": recovery,
    }


def model_card(made: dict[str, Any], table: str | None) -> str:
    """README.md of the checkpoint: Hugging Face metadata, then the recipe in words."""
    base = made["base_model"]
    removed = made["params_before"] - made["params_after"]
    sparsity = made["sparsity"]
    steps = [r.get("method", "?") for r in made["recovery"]] or ["none"]
    lines = [
        "---",
        f"base_model: {json.dumps(base['source'])}",
        "library_name: transformers",
        "tags: [layerprune, depth-pruning]",
        "---",
        "",
        f"# {base['name']}, depth-pruned with layerprune {made['layerprune_version']}",
        "",
        f"- Base model: `{base['source']}` (fingerprint `{base['fingerprint']}`)",
        f"- Scorer: {made['scorer']} ({made['selection']} selection), sparsity "
        f"{sparsity['amount']:g} ({sparsity['unit']})",
        f"- Removed original layers: {made['removed_layers']} of {made['original_num_layers']}",
        f"- Layers put back by recovery: {made['layers_added']}; recovery: {', '.join(steps)}",
        f"- Parameters: {made['params_before']:,} -> {made['params_after']:,} "
        f"(-{removed / made['params_before']:.1%})",
        "",
        "The full recipe (calibration text, every recovery step's settings and training budget) "
        f"is the `{RECIPE}` entry of `config.json`.",
    ]
    if table:
        lines += ["", "## Evaluation", "", "```", table, "```"]
    return "\n".join([*lines, ""])


def save_checkpoint(
    loaded: LoadedModel,
    out: Path,
    plan: Plan,
    calibration: Calibration | None,
    recovery: list[dict[str, Any]],
    evaluation: dict[str, Any] | None = None,
    table: str | None = None,
) -> Path:
    """Write model, tokenizer, recipe and model card to ``out``, all or nothing."""
    made = recipe(loaded, plan, calibration, recovery)
    if evaluation is not None:
        made["evaluation"] = {k: evaluation.get(k) for k in ("tasks", "average", "rp")}
    config = decoder_stack(loaded.model).config
    configs = {id(c): c for c in (config, loaded.model.config)}.values()
    for c in configs:
        setattr(c, RECIPE, made)
        c._name_or_path = loaded.source
        for key in STALE_NAME_KEYS:
            if hasattr(c, key):
                delattr(c, key)
    tmp = staging_dir(out)
    save_recovered(loaded.model, tmp)
    loaded.tokenizer.save_pretrained(tmp)
    write_text(tmp / "README.md", model_card(made, table))
    commit_dir(tmp, out)
    return out
