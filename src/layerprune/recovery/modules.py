"""The lightweight modules that replace a pruned block (LLM-Streamline).

* ``layer``: a copy of the block's first layer, so training starts from a real layer of the
  right type (Gemma3 sliding/full attention follows its position). It stays a standard decoder
  layer: the model saves and loads as a standard checkpoint. The authors' code and their
  recommendation.
* ``ffn``: the authors' FFN example, W2 ReLU(W1 h + b1) + b2 with W1: d -> 4d, mapping h_in to
  h_out directly (no residual, no norm). Their module is a submodule of ``LlamaModel``, whose
  ``post_init`` gives every Linear N(0, initializer_range) weights and zero biases: so here.
* ``ffn_residual``: our variant, h + W2 ReLU(W1 RMSNorm(h)) with W1 PyTorch's default init and
  W2 zero, so that the untrained module IS plain pruning and training learns only the block's
  update. (The block was chosen because its output is close to its input.)
* ``swiglu``: the paper's SwiGLU, a fresh gated MLP of the model's width: W_down (act(W_gate h)
  * W_up h) with the model's ``intermediate_size``, ``hidden_act`` and MLP bias, initialised as
  the model initialises (N(0, initializer_range)), h_in to h_out directly as ``ffn``.

The MLP kinds are :class:`MLPReplacement` modules: no transformers config can describe a layer
without attention among the model's own layers, so they are saved by
:mod:`layerprune.recovery.checkpoint`.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from transformers.activations import ACT2FN

from layerprune.errors import LayerpruneError
from layerprune.layers import DecoderStack

KINDS = ("layer", "ffn", "ffn_residual", "swiglu")


class MLPReplacement(nn.Module):
    """An MLP in a decoder layer's place, called like a transformers 5 decoder layer.

    ``down(act(up(x)))``, or ``down(act(gate(x)) * up(x))`` when ``gated``, on x = h (or
    RMSNorm(h) when ``norm_eps`` is set), plus h when ``residual``. Decoder layers of Llama,
    Qwen, Gemma3 and OPT in transformers 5 take the hidden states first (masks, rotary embeddings
    etc. as keyword arguments) and return the hidden states tensor; so does this module.
    """

    def __init__(
        self,
        hidden_size: int,
        inner_size: int,
        activation: str = "relu",
        gated: bool = False,
        bias: bool = True,
        residual: bool = False,
        norm_eps: float | None = None,
    ) -> None:
        super().__init__()
        self.spec = {
            "hidden_size": hidden_size,
            "inner_size": inner_size,
            "activation": activation,
            "gated": gated,
            "bias": bias,
            "residual": residual,
            "norm_eps": norm_eps,
        }
        self.norm = nn.RMSNorm(hidden_size, eps=norm_eps) if norm_eps is not None else None
        self.gate = nn.Linear(hidden_size, inner_size, bias=bias) if gated else None
        self.up = nn.Linear(hidden_size, inner_size, bias=bias)
        self.down = nn.Linear(inner_size, hidden_size, bias=bias)
        self.act = ACT2FN[activation]

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        x = self.norm(hidden_states) if self.norm is not None else hidden_states
        inner = self.act(self.up(x)) if self.gate is None else self.act(self.gate(x)) * self.up(x)
        out = self.down(inner)
        return hidden_states + out if self.spec["residual"] else out


def _cast(obj: Any, dtype: torch.dtype) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_cast(o, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _cast(v, dtype) for k, v in obj.items()}
    return obj


class Float32(nn.Module):
    """Runs a module in fp32 inside a bf16/fp16 model: AdamW on half weights barely moves them."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module.float()

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.module(hidden_states.float(), *args, **_cast(kwargs, torch.float32))
        out = out[0] if isinstance(out, tuple) else out
        return out.to(hidden_states.dtype)


def _model_init(module: MLPReplacement, std: float) -> MLPReplacement:
    """The transformers initialisation of Linear layers: N(0, std) weights, zero biases."""
    for linear in module.modules():
        if isinstance(linear, nn.Linear):
            nn.init.normal_(linear.weight, mean=0.0, std=std)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)
    return module


def mlp_replacement(kind: str, stack: DecoderStack) -> MLPReplacement:
    """A fresh :class:`MLPReplacement` of ``kind`` (ffn, ffn_residual or swiglu) for ``stack``."""
    config = stack.config
    d = int(config.hidden_size)
    std = float(getattr(config, "initializer_range", 0.02))
    if kind == "ffn":
        return _model_init(MLPReplacement(d, 4 * d), std)
    if kind == "ffn_residual":
        module = MLPReplacement(d, 4 * d, residual=True, norm_eps=stack.norm_eps)
        nn.init.zeros_(module.down.weight)
        nn.init.zeros_(module.down.bias)
        return module
    inner = getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim", None)
    acts = ("hidden_act", "hidden_activation", "activation_function")
    act = next((getattr(config, a) for a in acts if getattr(config, a, None)), "silu")
    bias = bool(getattr(config, "mlp_bias", False))
    module = MLPReplacement(d, int(inner or 4 * d), activation=str(act), gated=True, bias=bias)
    return _model_init(module, std)


def build_replacement(kind: str, stack: DecoderStack, index: int) -> nn.Module:
    """The untrained module for ``kind`` replacing a block that starts at layer ``index``, on
    that layer's device and dtype. Its trainable parameters require grad."""
    if kind not in KINDS:
        raise LayerpruneError(f"unknown recovery kind '{kind}'; allowed: {', '.join(KINDS)}")
    layer = stack.layers[index]
    if kind == "layer":
        return copy.deepcopy(layer).requires_grad_(True)
    param = next(layer.parameters())
    return mlp_replacement(kind, stack).to(device=param.device, dtype=param.dtype)
