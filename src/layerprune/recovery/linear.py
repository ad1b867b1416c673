"""ReplaceMe: a training-free linear map folded into the MLP of the layer before the block.

With i = start - 1, M the MLP output of layer i (what it adds to the residual), h_i the
residual after layer i and h_n the residual leaving the block, the pruned model should give
h_n = (h_i - M) + M T. T solves min ||M T - (h_n - (h_i - M))||^2 (+ ridge ||T||^2) from the
normal equations, accumulated in float64 over streamed batches. Folding T into the down
projection (y = z W^T + b becomes y T = z (T^T W)^T + b T) adds no parameter and keeps the
architecture standard.
"""

from __future__ import annotations

import time

import torch
from torch import nn
from transformers import PreTrainedModel

from layerprune.errors import LayerpruneError
from layerprune.layers import decoder_stack
from layerprune.recovery.activations import check_block, stream_block
from layerprune.recovery.report import RecoveryReport, record_recovery
from layerprune.surgery import remove_layers

# Norms applied to the MLP output before it joins the residual: T cannot pass through them.
_POST_MLP_NORMS = ("post_feedforward_layernorm",)


def _down_projection(layer: nn.Module) -> nn.Linear:
    name = type(layer).__name__
    for norm in _POST_MLP_NORMS:
        if hasattr(layer, norm):
            raise LayerpruneError(
                f"recovery 'linear' cannot fold T into {name}: its MLP output goes through "
                f"{norm} before joining the residual, so a linear map on it is not exact; "
                "allowed: Llama/Mistral/Qwen2-style layers (use recovery 'layer' or 'ffn')"
            )
    down = getattr(getattr(layer, "mlp", None), "down_proj", None)
    if not isinstance(down, nn.Linear):
        raise LayerpruneError(
            f"recovery 'linear' needs a layer with mlp.down_proj (Llama, Mistral, Qwen2 style); "
            f"{name} has none"
        )
    return down


@torch.no_grad()
def fit_linear(
    model: PreTrainedModel,
    start: int,
    size: int,
    windows: torch.Tensor,
    ridge: float = 0.0,
    batch_size: int = 8,
) -> tuple[torch.Tensor, int]:
    """The float64 (d, d) least-squares T on CPU, and the number of tokens it was fitted on."""
    stack = decoder_stack(model)
    mlp = stack.layers[start - 1].get_submodule("mlp")
    dim = stack.config.hidden_size
    gram = ridge * torch.eye(dim, dtype=torch.float64)
    cross = torch.zeros(dim, dim, dtype=torch.float64)
    n_tokens = 0
    for batch in stream_block(model, start, size, windows, batch_size, taps={"mlp": mlp}):
        m = batch.taps["mlp"].reshape(-1, dim).double()
        y = (batch.h_out - batch.h_in + batch.taps["mlp"]).reshape(-1, dim).double()
        gram += (m.T @ m).cpu()
        cross += (m.T @ y).cpu()
        n_tokens += m.shape[0]
    # gelsd gives the minimum-norm solution when M^T M is singular (e.g. too few tokens).
    return torch.linalg.lstsq(gram, cross, driver="gelsd").solution, n_tokens


def replace_linear(
    model: PreTrainedModel,
    start: int,
    size: int,
    windows: torch.Tensor,
    ridge: float = 0.0,
    batch_size: int = 8,
) -> tuple[PreTrainedModel, RecoveryReport]:
    """Remove layers ``[start, start + size)`` in place, folding the fitted T into layer start-1."""
    check_block(model, start, size, "linear")
    if start == 0:
        raise LayerpruneError(
            "recovery 'linear' folds T into the layer before the block, and block start 0 has "
            "none; allowed: blocks starting at layer 1 or later"
        )
    down = _down_projection(decoder_stack(model).layers[start - 1])
    started = time.perf_counter()
    transform, n_tokens = fit_linear(model, start, size, windows, ridge, batch_size)
    with torch.no_grad():
        t = transform.to(device=down.weight.device)
        down.weight.copy_((t.T @ down.weight.double()).to(down.weight.dtype))
        if down.bias is not None:
            down.bias.copy_((down.bias.double() @ t).to(down.bias.dtype))
    report = RecoveryReport(
        method="replace_linear",
        block_start=start,
        block_size=size,
        params_removed=sum(
            p.numel()
            for layer in decoder_stack(model).layers[start : start + size]
            for p in layer.parameters()
        ),
        train_time_s=time.perf_counter() - started,
        train_windows=len(windows),
        settings={"ridge": ridge, "batch_size": batch_size, "tokens": n_tokens},
    )
    record_recovery(model, report, list(range(start, start + size)))
    remove_layers(model, range(start, start + size))
    return model, report
