"""LLM-Streamline: replace a contiguous block of layers by one trained lightweight module.

The dense model comes in. f is trained so that f(h_in) ~ h_out, h_in being the residual state
entering the block and h_out the one leaving it, streamed batch by batch from the frozen model
(``mse``), or with the next-token loss through the frozen rest of the model (``lm``). The
surgery happens only once training succeeded, so a failure leaves the model untouched.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from layerprune.errors import LayerpruneError
from layerprune.layers import decoder_stack
from layerprune.recovery.activations import BlockBatch, check_block, contiguous_block, stream_block
from layerprune.recovery.modules import KINDS, Float32, build_replacement
from layerprune.recovery.report import RecoveryReport, record_recovery
from layerprune.recovery.training import (
    Training,
    TrainResult,
    epochs_of,
    heldout_fit,
    optimise,
    token_batches,
)
from layerprune.surgery import remove_layers

LOSSES = ("mse", "lm")


class _Skip(nn.Module):
    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


@contextmanager
def _in_place_of_block(
    model: PreTrainedModel, start: int, size: int, module: nn.Module
) -> Iterator[None]:
    """The model with ``module`` at ``start``, the rest of the block skipped, all else frozen."""
    layers = decoder_stack(model).layers
    saved = list(layers[start : start + size])
    grads = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    layers[start] = module
    for i in range(start + 1, start + size):
        layers[i] = _Skip()
    try:
        yield
    finally:
        for i, layer in enumerate(saved):
            layers[start + i] = layer
        for p, flag in grads.items():
            p.requires_grad_(flag)


@dataclass(kw_only=True)
class LayerReplacement(Training):
    """LLM-Streamline: one trained module (``kind`` layer | swiglu | ffn) replaces the block.

    Gets the dense model and removes the block itself (it trains on the dense states). With
    ``kind='layer'`` or ``'swiglu'`` the module is a decoder layer, so removing n layers net
    takes a block of n + 1.
    """

    prunes: ClassVar[bool] = True
    contiguous: ClassVar[bool] = True
    layers_added: ClassVar[int] = 1

    kind: str = "layer"
    loss: str = "mse"  # mse: f(h_in) ~ h_out | lm: next-token loss through the frozen rest
    epochs: int = 1

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise LayerpruneError(
                f"unknown recovery kind '{self.kind}'; allowed: {', '.join(KINDS)}"
            )
        if self.loss not in LOSSES:
            raise LayerpruneError(
                f"unknown recovery loss '{self.loss}'; allowed: {', '.join(LOSSES)}"
            )

    @property
    def step_name(self) -> str:
        return self.kind

    def check(self, model: PreTrainedModel, removed: list[int]) -> None:
        check_block(model, *contiguous_block(removed, self.kind), self.kind)

    def train(
        self, model: PreTrainedModel, removed: list[int], train: torch.Tensor, heldout: torch.Tensor
    ) -> RecoveryReport:
        """Replace the block ``removed`` of the dense ``model`` in place by a trained module."""
        start, size = contiguous_block(removed, self.kind)
        stack = decoder_stack(model)
        dtype = next(model.parameters()).dtype
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            f = Float32(build_replacement(self.kind, stack, start))

        def apply(batch: BlockBatch) -> torch.Tensor:
            return f(batch.h_in, **batch.layer_kwargs)

        fit = {"identity": lambda b: b.h_in, "f": apply}
        before = heldout_fit(model, start, size, heldout, self.batch_size, fit)
        result = self._optimise(model, start, size, train, f, apply)
        after = heldout_fit(model, start, size, heldout, self.batch_size, {"f": apply})

        module = f.module.to(dtype).requires_grad_(False)
        block = stack.layers[start : start + size]
        report = RecoveryReport(
            method="replace_block",
            block_start=start,
            block_size=size,
            layers_added=1,
            params_removed=sum(p.numel() for layer in block for p in layer.parameters()),
            params_added=sum(p.numel() for p in module.parameters()),
            steps=result.steps,
            final_loss=result.final_loss,
            train_time_s=result.seconds,
            train_windows=len(train),
            heldout_windows=len(heldout),
            heldout_mse_identity=before["identity"][0],
            heldout_mse_before=before["f"][0],
            heldout_mse_after=after["f"][0],
            heldout_cosine_identity=before["identity"][1],
            heldout_cosine_before=before["f"][1],
            heldout_cosine_after=after["f"][1],
            settings=self.reported(kind=self.kind, loss=self.loss, epochs=self.epochs),
        )
        record_recovery(model, report, list(range(start, start + size)))
        stack.layers[start] = module
        remove_layers(model, range(start + 1, start + size))
        return report

    def _optimise(
        self,
        model: PreTrainedModel,
        start: int,
        size: int,
        train: torch.Tensor,
        f: nn.Module,
        apply: Callable[[BlockBatch], torch.Tensor],
    ) -> TrainResult:
        """Train ``f`` with the step's loss; the dense model is left as it came in."""
        steps = self.epochs * math.ceil(len(train) / self.batch_size)
        params = [p for p in f.parameters() if p.requires_grad]

        def run(batches: Iterator[Any], loss_fn: Any) -> TrainResult:
            return optimise(
                params, batches, loss_fn, steps, self.schedule, self.kind, self.progress
            )

        if self.loss == "mse":
            shuffled = epochs_of(train, self.epochs, self.seed)
            states = (
                b for w in shuffled for b in stream_block(model, start, size, w, self.batch_size)
            )
            return run(states, lambda b: F.mse_loss(apply(b).float(), b.h_out.float()))
        device = next(model.parameters()).device
        ids = token_batches(train, self.epochs, self.batch_size, self.seed, device)
        with _in_place_of_block(model, start, size, f):
            return run(ids, lambda b: model(input_ids=b, labels=b, use_cache=False).loss)
