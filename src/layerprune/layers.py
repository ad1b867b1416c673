"""One interface over the decoder stacks of many architectures.

Llama, Mistral, Qwen2/Qwen3 and Gemma3 (and most decoder-only models in transformers) keep
their blocks in ``<base>.layers`` and the final norm in ``<base>.norm``; GPT-2-style models use
``transformer.h`` / ``transformer.ln_f``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from layerprune.errors import LayerpruneError

# (base model attribute, layer list attribute, final norm attribute)
_LAYOUTS = (
    ("model", "layers", "norm"),
    ("model.language_model", "layers", "norm"),
    ("transformer", "h", "ln_f"),
    ("gpt_neox", "layers", "final_layer_norm"),
)


def _get(obj: object, dotted: str) -> object | None:
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


@dataclass
class DecoderStack:
    """The parts of a causal LM that layer pruning touches."""

    model: PreTrainedModel
    base: nn.Module
    layers_attr: str
    norm: nn.Module

    @property
    def layers(self) -> nn.ModuleList:
        layers = getattr(self.base, self.layers_attr)
        assert isinstance(layers, nn.ModuleList)
        return layers

    @layers.setter
    def layers(self, value: nn.ModuleList) -> None:
        setattr(self.base, self.layers_attr, value)

    @property
    def config(self) -> PretrainedConfig:
        """The config holding ``num_hidden_layers`` (the text config of multimodal models)."""
        config = self.base.config if hasattr(self.base, "config") else self.model.config
        assert isinstance(config, PretrainedConfig)
        return config

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def decoder_stack(model: PreTrainedModel) -> DecoderStack:
    for base_path, layers_attr, norm_attr in _LAYOUTS:
        base = _get(model, base_path)
        layers = getattr(base, layers_attr, None) if base is not None else None
        norm = getattr(base, norm_attr, None) if base is not None else None
        if isinstance(layers, nn.ModuleList) and isinstance(norm, nn.Module):
            assert isinstance(base, nn.Module)
            return DecoderStack(model, base, layers_attr, norm)
    tried = ", ".join(f"{b}.{la}" for b, la, _ in _LAYOUTS)
    raise LayerpruneError(
        f"cannot find the decoder layers of {type(model).__name__}; supported layouts: {tried} "
        "(Llama, Mistral, Qwen2/Qwen3, Gemma3 and similar)"
    )


def layer_param_counts(model: PreTrainedModel) -> list[int]:
    return [sum(p.numel() for p in layer.parameters()) for layer in decoder_stack(model).layers]


def param_count(model: PreTrainedModel) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())
