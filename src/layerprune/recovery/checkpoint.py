"""Saving a model that holds MLP replacements, which no transformers config can describe.

A transformers checkpoint rebuilds every decoder layer from one config: the same class, one
``intermediate_size`` and ``hidden_act``, a gated MLP and an attention in every layer. An
:class:`~layerprune.recovery.modules.MLPReplacement` (``ffn``, ``ffn_residual``, ``swiglu``: an
MLP with no attention, maybe no gate, no norm, no residual) fits none of that, so
:func:`save_recovered` writes

* a standard checkpoint of the rest (the model without the replacement slots: loaded alone,
  it is the block-pruned model without recovery),
* ``layerprune_replacement.safetensors`` with the modules' weights, and
* a ``layerprune_replacement`` config entry saying where each slot goes and what it is (the
  module's constructor arguments),

and :func:`load_recovered` puts the modules back in their slots. Loaded alone, the rest would
silently be the block-pruned model WITHOUT its replacement, so ``config.json`` names a
``model_type`` (and ``architectures``) transformers does not know: plain ``from_pretrained``
fails, and its error quotes the model type, which names :func:`load_recovered`. The real ones
are kept in the ``layerprune_checkpoint`` entry, from which :func:`load_recovered` restores them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from layerprune.files import atomic_write, read_json, write_json
from layerprune.layers import decoder_stack
from layerprune.recovery.modules import MLPReplacement
from layerprune.surgery import PRUNING_RECORD, per_layer_lists, remove_layers, renumber

WEIGHTS = "layerprune_replacement.safetensors"
RECORD = "layerprune_replacement"
IDENTITY = "layerprune_checkpoint"  # config.json entry holding the real model type
MODEL_TYPE = "layerprune_recovered (load it with layerprune.recovery.load_recovered)"


def _configs(model: PreTrainedModel) -> list[Any]:
    stack = decoder_stack(model)
    return list({id(c): c for c in (stack.config, model.config)}.values())


def save_recovered(model: PreTrainedModel, path: str | Path) -> Path:
    """Write ``model`` (possibly holding :class:`MLPReplacement` layers) to the folder ``path``."""
    path = Path(path)
    stack = decoder_stack(model)
    layers = stack.layers
    slots = {i: layer for i, layer in enumerate(layers) if isinstance(layer, MLPReplacement)}
    if not slots:  # a standard model: a standard checkpoint and nothing else
        model.save_pretrained(path)
        return path
    per_layer = per_layer_lists(stack.config, stack.num_layers)
    entries = [
        {
            "index": i,
            "module": dict(module.spec),
            "per_layer": {key: values[i] for key, values in per_layer.items()},
        }
        for i, module in slots.items()
    ]
    tensors = {
        f"{i}.{name}": t.detach().contiguous().cpu()
        for i, module in slots.items()
        for name, t in module.state_dict().items()
    }
    # Save the rest by pruning the slots for the moment, then restore layers and configs.
    snapshots = [(c, dict(vars(c))) for c in _configs(model)]
    try:
        remove_layers(model, list(slots))
        record = {"slots": entries, PRUNING_RECORD: snapshots[0][1].get(PRUNING_RECORD)}
        setattr(stack.config, RECORD, record)
        model.save_pretrained(path)
        _hide_model_type(path / "config.json")
        atomic_write(path / WEIGHTS, lambda tmp: save_file(tensors, str(tmp)))
    finally:
        stack.layers = layers
        for idx, layer in enumerate(layers):
            renumber(layer, idx)
        for config, saved in snapshots:
            vars(config).clear()
            vars(config).update(saved)
    return path


def _hide_model_type(config_json: Path) -> None:
    """Give ``config.json`` a model type transformers refuses, keeping the real one aside."""
    config = read_json(config_json)
    config[IDENTITY] = {key: config.get(key) for key in ("model_type", "architectures")}
    config["model_type"] = MODEL_TYPE
    config["architectures"] = [MODEL_TYPE]
    write_json(config_json, config)


def _real_config(path: Path) -> PretrainedConfig | None:
    """The config of a :func:`save_recovered` folder with its real model type; None if standard."""
    config_dict, _ = PretrainedConfig.get_config_dict(str(path))
    identity = config_dict.pop(IDENTITY, None)
    if identity is None:
        return None
    config_dict.update(identity)
    config = CONFIG_MAPPING[identity["model_type"]].from_dict(config_dict)
    assert isinstance(config, PretrainedConfig)
    return config


def _module(entry: dict[str, Any]) -> MLPReplacement:
    """The empty module of a slot; entries written before ``module`` held a residual ReLU MLP."""
    if "module" in entry:
        return MLPReplacement(**entry["module"])
    d = entry["hidden_size"]
    return MLPReplacement(d, entry["expansion"] * d, residual=True, norm_eps=entry["eps"])


def load_recovered(path: str | Path, **kwargs: Any) -> PreTrainedModel:
    """Load a folder written by :func:`save_recovered`; ``kwargs`` go to ``from_pretrained``."""
    path = Path(path)
    config = _real_config(path)
    if config is not None:
        kwargs = {**kwargs, "config": config}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    stack = decoder_stack(model)
    record = getattr(stack.config, RECORD, None)
    if not record:
        return model
    weights = load_file(str(path / WEIGHTS))
    param = next(model.parameters())
    layers = list(stack.layers)
    configs = [c for c in _configs(model) if getattr(c, "num_hidden_layers", None) == len(layers)]
    for entry in sorted(record["slots"], key=lambda e: e["index"]):
        i = entry["index"]
        module = _module(entry)
        prefix = f"{i}."
        module.load_state_dict(
            {k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)}
        )
        layers.insert(i, module.to(device=param.device, dtype=param.dtype))
        for config in configs:
            for key, value in entry["per_layer"].items():
                values = list(getattr(config, key))
                values.insert(i, value)
                setattr(config, key, values)
    stack.layers = nn.ModuleList(layers)
    for idx, layer in enumerate(layers):
        renumber(layer, idx)
    for config in configs:
        config.num_hidden_layers = len(layers)
    setattr(stack.config, PRUNING_RECORD, record[PRUNING_RECORD])
    delattr(stack.config, RECORD)
    return model.eval()
