"""Removing decoder layers so that the result is a standard, consistent checkpoint.

Beyond dropping modules, transformers 5 needs three things to stay consistent: each attention's
``layer_idx`` (KV-cache slot), ``num_hidden_layers`` (cache size) and per-layer config lists such
as ``layer_types`` (which mask each position gets). Gemma3 and Qwen2 give silently wrong logits
when these are left stale.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn
from transformers import PreTrainedModel

from layerprune.errors import LayerpruneError
from layerprune.layers import decoder_stack

PRUNING_RECORD = "layerprune"


def original_layer_indices(model: PreTrainedModel) -> list[int]:
    """Original indices of the model's current layers (composes repeated pruning)."""
    stack = decoder_stack(model)
    record = getattr(stack.config, PRUNING_RECORD, None)
    if record:
        return list(record["kept_layers"])
    return list(range(stack.num_layers))


def per_layer_lists(config: object, num_layers: int) -> dict[str, list[Any] | tuple[Any, ...]]:
    """Config lists with one entry per layer, such as ``layer_types``."""
    return {
        key: value
        for key, value in vars(config).items()
        if isinstance(value, (list, tuple)) and len(value) == num_layers and key != PRUNING_RECORD
    }


def _slice_per_layer_lists(config: object, num_layers: int, kept: list[int]) -> list[str]:
    lists = per_layer_lists(config, num_layers)
    for key, value in lists.items():
        setattr(config, key, type(value)(value[i] for i in kept))
    return list(lists)


def renumber(layer: nn.Module, new_idx: int) -> None:
    for module in layer.modules():
        if hasattr(module, "layer_idx"):
            setattr(module, "layer_idx", new_idx)  # noqa: B010 (mypy types it as a Module)


def remove_layers(model: PreTrainedModel, removed: Iterable[int]) -> list[int]:
    """Remove the given (current) layer indices in place; return the kept current indices."""
    stack = decoder_stack(model)
    num_layers = stack.num_layers
    drop = sorted(set(removed))
    bad = [i for i in drop if not 0 <= i < num_layers]
    if bad:
        raise LayerpruneError(f"layer indices {bad} out of range; the model has {num_layers}")
    kept = [i for i in range(num_layers) if i not in drop]
    if not kept:
        raise LayerpruneError(f"cannot remove all {num_layers} layers; keep at least one")
    originals = original_layer_indices(model)
    layers = stack.layers
    stack.layers = nn.ModuleList(layers[i] for i in kept)
    for new_idx, layer in enumerate(stack.layers):
        renumber(layer, new_idx)
    configs = {id(c): c for c in (stack.config, model.config)}
    for config in configs.values():
        if getattr(config, "num_hidden_layers", None) == num_layers:
            _slice_per_layer_lists(config, num_layers, kept)
            config.num_hidden_layers = len(kept)
    original_num = getattr(stack.config, PRUNING_RECORD, {}).get("original_num_hidden_layers")
    setattr(
        stack.config,
        PRUNING_RECORD,
        {
            "original_num_hidden_layers": original_num or num_layers,
            "kept_layers": [originals[i] for i in kept],
        },
    )
    return kept
