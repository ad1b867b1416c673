"""One interface over the decoder stacks of many architectures.

Llama, Mistral, Qwen2/Qwen3 and Gemma3 (and most decoder-only models in transformers) keep
their blocks in ``<base>.layers`` and the final norm in ``<base>.norm``; OPT uses
``model.decoder.layers`` / ``model.decoder.final_layer_norm``; GPT-2-style models use
``transformer.h`` / ``transformer.ln_f``.

Recovery needs a few parts inside a decoder layer (the attention, its output projection, the
MLP's down projection). Their names differ between families, so they are looked up here, and
no recovery module names an architecture's internals.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from layerprune.errors import LayerpruneError

# (base model attribute, layer list attribute, final norm attribute)
_LAYOUTS = (
    ("model", "layers", "norm"),
    ("model.language_model", "layers", "norm"),
    ("model.decoder", "layers", "final_layer_norm"),
    ("transformer", "h", "ln_f"),
    ("gpt_neox", "layers", "final_layer_norm"),
)


@dataclass(frozen=True)
class LayerParts:
    """Dotted names, inside one decoder layer, of the parts recovery works on."""

    family: str
    attention: str  # the self-attention module
    attention_norm: str  # the norm in front of it (pre-norm layers)
    attention_out: str  # its output projection, whose output joins the residual
    mlp_out: str  # the MLP's down projection, whose output joins the residual


_PARTS = (
    LayerParts(
        "Llama/Qwen/Gemma", "self_attn", "input_layernorm", "self_attn.o_proj", "mlp.down_proj"
    ),
    LayerParts("OPT", "self_attn", "self_attn_layer_norm", "self_attn.out_proj", "fc2"),
)
# Norms applied to the MLP output before it joins the residual (Gemma3): a linear map on the
# down projection's output cannot pass through them.
_POST_MLP_NORMS = ("post_feedforward_layernorm",)


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

    @property
    def norm_eps(self) -> float:
        """The final norm's epsilon, for new norms that should behave like the model's own."""
        owners: list[tuple[object, str]] = [(self.norm, "eps"), (self.norm, "variance_epsilon")]
        owners += [(self.config, "rms_norm_eps"), (self.config, "layer_norm_eps")]
        for owner, attr in owners:
            value = getattr(owner, attr, None)
            if isinstance(value, float):
                return value
        return 1e-6

    def final_states(self, hidden: torch.Tensor) -> torch.Tensor:
        """What the LM head reads from the residual stream leaving the last layer: the final
        norm, then OPT's output projection where there is one."""
        hidden = self.norm(hidden)
        project_out = getattr(self.base, "project_out", None)
        if isinstance(project_out, nn.Module):
            hidden = project_out(hidden)
        assert isinstance(hidden, torch.Tensor)
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's logits from the residual stream leaving its last layer: the final norm,
        OPT's output projection where there is one, the LM head, and Gemma's logit
        soft-capping where configured, as the model's own forward applies them."""
        hidden = self.final_states(hidden)
        head = self.model.get_output_embeddings()
        if not isinstance(head, nn.Module):
            raise LayerpruneError(f"{type(self.model).__name__} has no LM head")
        logits = head(hidden)
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        assert isinstance(logits, torch.Tensor)
        return logits

    def lora_targets(self) -> tuple[str, ...]:
        """Leaf names of the linear modules in the decoder layers, in order of first use.

        peft matches ``target_modules`` by these names, so adapting every linear of every
        layer (attention and MLP) needs no per-architecture list.
        """
        names: dict[str, None] = {}
        for layer in self.layers:
            for name, module in layer.named_modules():
                if isinstance(module, nn.Linear):
                    names[name.rsplit(".", 1)[-1]] = None
        return tuple(names)

    def parts(self, index: int, step: str) -> LayerParts:
        """The part names of layer ``index``; ``step`` names who asks, for the error."""
        layer = self.layers[index]
        for parts in _PARTS:
            names = (parts.attention_out, parts.mlp_out)
            if all(isinstance(_get(layer, name), nn.Linear) for name in names):
                return parts
        known = "; ".join(f"{p.family}: {p.attention_out}, {p.mlp_out}" for p in _PARTS)
        raise LayerpruneError(
            f"recovery '{step}' cannot find the attention and MLP output projections of "
            f"{type(layer).__name__}; known layouts: {known}"
        )

    def _linear(self, index: int, name: str) -> nn.Linear:
        module = self.layers[index].get_submodule(name)
        assert isinstance(module, nn.Linear)
        return module

    def attention_out(self, index: int, step: str) -> nn.Linear:
        """The attention's output projection in layer ``index``."""
        return self._linear(index, self.parts(index, step).attention_out)

    def mlp_out(self, index: int, step: str) -> nn.Linear:
        """The MLP's down projection in layer ``index``: its output is what the MLP adds."""
        return self._linear(index, self.parts(index, step).mlp_out)

    def post_mlp_norm(self, index: int) -> str | None:
        """The name of a norm between the MLP output and the residual in layer ``index``."""
        layer = self.layers[index]
        return next((n for n in _POST_MLP_NORMS if isinstance(_get(layer, n), nn.Module)), None)


def decoder_stack(model: PreTrainedModel) -> DecoderStack:
    for base_path, layers_attr, norm_attr in _LAYOUTS:
        base = _get(model, base_path)
        layers = getattr(base, layers_attr, None) if base is not None else None
        if not isinstance(layers, nn.ModuleList):
            continue
        assert isinstance(base, nn.Module)
        norm = getattr(base, norm_attr, None)
        if not isinstance(norm, nn.Module):
            raise LayerpruneError(
                f"{type(model).__name__} has no final norm ({base_path}.{norm_attr} is None): a "
                "post-norm model (OPT with do_layer_norm_before=False, e.g. opt-350m) has no "
                "residual stream to score or prune; allowed: pre-norm models"
            )
        return DecoderStack(model, base, layers_attr, norm)
    tried = ", ".join(f"{b}.{la}" for b, la, _ in _LAYOUTS)
    raise LayerpruneError(
        f"cannot find the decoder layers of {type(model).__name__}; supported layouts: {tried} "
        "(Llama, Mistral, Qwen2/Qwen3, Gemma3, OPT and similar)"
    )


def layer_param_counts(model: PreTrainedModel) -> list[int]:
    return [sum(p.numel() for p in layer.parameters()) for layer in decoder_stack(model).layers]


def param_count(model: PreTrainedModel) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())
