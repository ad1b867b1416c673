"""The lightweight modules that replace a pruned block (LLM-Streamline).

* ``layer``: a copy of the block's first layer, so training starts from a real layer of the
  right type (Gemma3 sliding/full attention follows its position).
* ``swiglu``: the same copy with the attention output projection zeroed and frozen, so only
  the (copied) MLP and its norms learn. Copying rather than re-initialising the MLP starts from
  weights that already produce residual updates of the right scale (a fresh MLP adds noise of
  an arbitrary scale) and makes ``swiglu`` vs ``layer`` isolate the attention's contribution.
  Both stay a standard decoder layer, so the model saves and loads as a standard checkpoint.
* ``ffn``: h + W2 ReLU(W1 RMSNorm(h)) with W1: d -> 4d, random init, and W2 zero so that f
  starts as the identity. It is residual because the replaced block is close to the
  identity (its high input/output cosine is why it was chosen): f starts from plain pruning
  and learns only the block's update. (With W2 random too, the untrained f adds noise far
  larger than that update: 60x the identity's error on the tiny test models.) It is not a
  standard layer: a transformers checkpoint builds every layer from one config (one
  ``intermediate_size`` and ``hidden_act``, a gated MLP, attention in every layer), so a
  ReLU MLP of width 4d with no attention has no representation; see
  :mod:`layerprune.recovery.checkpoint`.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from layerprune.errors import LayerpruneError
from layerprune.layers import DecoderStack

KINDS = ("layer", "swiglu", "ffn")


class FFNReplacement(nn.Module):
    """h + down(ReLU(up(norm(h)))), called like a transformers 5 decoder layer.

    Decoder layers of Llama, Qwen, Gemma3 and OPT in transformers 5 take the hidden states first
    (masks, rotary embeddings etc. as keyword arguments) and return the hidden states tensor.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, expansion: int = 4) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(hidden_size, eps=eps)
        self.up = nn.Linear(hidden_size, expansion * hidden_size)
        self.down = nn.Linear(expansion * hidden_size, hidden_size)
        nn.init.zeros_(self.down.weight)
        nn.init.zeros_(self.down.bias)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states + self.down(torch.relu(self.up(self.norm(hidden_states))))


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


def build_replacement(kind: str, stack: DecoderStack, index: int) -> nn.Module:
    """The untrained module for ``kind`` replacing a block that starts at layer ``index``.

    Its trainable parameters require grad.
    """
    layer = stack.layers[index]
    if kind == "ffn":
        module: nn.Module = FFNReplacement(stack.config.hidden_size, stack.norm_eps)
        param = next(layer.parameters())
        return module.to(device=param.device, dtype=param.dtype)
    if kind not in KINDS:
        raise LayerpruneError(f"unknown recovery kind '{kind}'; allowed: {', '.join(KINDS)}")
    module = copy.deepcopy(layer).requires_grad_(True)
    if kind == "swiglu":
        parts = stack.parts(index, "swiglu")
        with torch.no_grad():
            for p in module.get_submodule(parts.attention_out).parameters():
                p.zero_()
        # Nothing before the zero projection can get a gradient; freezing it also keeps weight
        # decay from shrinking those (unused) weights.
        module.get_submodule(parts.attention).requires_grad_(False)
        module.get_submodule(parts.attention_norm).requires_grad_(False)
    return module
