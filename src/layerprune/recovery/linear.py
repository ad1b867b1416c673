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
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from transformers import PreTrainedModel

from layerprune.errors import LayerpruneError
from layerprune.layers import decoder_stack
from layerprune.recovery.activations import check_block, contiguous_block, stream_block
from layerprune.recovery.report import RecoveryReport, record_recovery
from layerprune.surgery import remove_layers


def _down_projection(model: PreTrainedModel, index: int) -> nn.Linear:
    """Layer ``index``'s down projection, if T can be folded into it exactly."""
    stack = decoder_stack(model)
    norm = stack.post_mlp_norm(index)
    if norm is not None:
        raise LayerpruneError(
            f"recovery 'linear' cannot fold T into {type(stack.layers[index]).__name__}: its MLP "
            f"output goes through {norm} before joining the residual, so a linear map on it is "
            "not exact; allowed: Llama/Mistral/Qwen/OPT-style layers (use recovery 'layer' or "
            "'ffn')"
        )
    return stack.mlp_out(index, "linear")


@dataclass(kw_only=True)
class LinearReplacement:
    """ReplaceMe: training-free least-squares map folded into the layer before the block.

    Gets the dense model and removes the block itself; adds no layer.
    """

    prunes: ClassVar[bool] = True
    contiguous: ClassVar[bool] = True
    layers_added: ClassVar[int] = 0

    ridge: float = 0.0
    batch_size: int = 8

    @torch.no_grad()
    def fit(
        self, model: PreTrainedModel, start: int, size: int, windows: torch.Tensor
    ) -> tuple[torch.Tensor, int]:
        """The float64 (d, d) least-squares T on CPU, and the number of tokens it was fitted on."""
        down = decoder_stack(model).mlp_out(start - 1, "linear")
        dim = down.out_features
        gram = self.ridge * torch.eye(dim, dtype=torch.float64)
        cross = torch.zeros(dim, dim, dtype=torch.float64)
        n_tokens = 0
        batches = stream_block(model, start, size, windows, self.batch_size, taps={"m": down})
        for batch in batches:
            # OPT runs its MLP on (tokens, d): bring M back to the residual's shape.
            mlp_output = batch.taps["m"].reshape(batch.h_out.shape)
            m = mlp_output.reshape(-1, dim).double()
            y = (batch.h_out - batch.h_in + mlp_output).reshape(-1, dim).double()
            gram += (m.T @ m).cpu()
            cross += (m.T @ y).cpu()
            n_tokens += m.shape[0]
        # gelsd gives the minimum-norm solution when M^T M is singular (e.g. too few tokens).
        return torch.linalg.lstsq(gram, cross, driver="gelsd").solution, n_tokens

    def __call__(
        self, model: PreTrainedModel, removed: list[int], windows: torch.Tensor
    ) -> RecoveryReport:
        """Remove the block ``removed`` in place, folding the fitted T into the layer before."""
        start, size = contiguous_block(removed, "linear")
        check_block(model, start, size, "linear")
        if start == 0:
            raise LayerpruneError(
                "recovery 'linear' folds T into the layer before the block, and block start 0 "
                "has none; allowed: blocks starting at layer 1 or later"
            )
        down = _down_projection(model, start - 1)
        started = time.perf_counter()
        transform, n_tokens = self.fit(model, start, size, windows)
        with torch.no_grad():
            t = transform.to(device=down.weight.device)
            down.weight.copy_((t.T @ down.weight.double()).to(down.weight.dtype))
            if down.bias is not None:
                down.bias.copy_((down.bias.double() @ t).to(down.bias.dtype))
        block = decoder_stack(model).layers[start : start + size]
        report = RecoveryReport(
            method="replace_linear",
            block_start=start,
            block_size=size,
            params_removed=sum(p.numel() for layer in block for p in layer.parameters()),
            train_time_s=time.perf_counter() - started,
            train_windows=len(windows),
            settings={"ridge": self.ridge, "batch_size": self.batch_size, "tokens": n_tokens},
        )
        record_recovery(model, report, list(range(start, start + size)))
        remove_layers(model, range(start, start + size))
        return report
