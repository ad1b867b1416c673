"""LLM-Streamline: replace a contiguous block of layers by one trained lightweight module.

The dense model comes in. f is trained so that f(h_in) ~ h_out, h_in being the residual state
entering the block and h_out the one leaving it, from the frozen model (``mse``, ``nmse``,
``cosine``: token losses over the fitted tokens, see :mod:`layerprune.recovery.objective`), or
with the next-token loss through the frozen rest of the model (``lm``). The states are streamed
batch by batch, or read from the activation cache (:mod:`layerprune.recovery.cache`). The
surgery happens only once training succeeded, so a failure leaves the model untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import PreTrainedModel

from layerprune.errors import LayerpruneError
from layerprune.layers import decoder_stack
from layerprune.recovery.activations import (
    BlockBatch,
    BlockStates,
    check_block,
    contiguous_block,
    in_order,
)
from layerprune.recovery.cache import CacheSettings
from layerprune.recovery.modules import KINDS, Float32, build_replacement
from layerprune.recovery.objective import TOKEN_LOSSES, TokenFilter, heldout_fit, token_loss_sum
from layerprune.recovery.report import RecoveryReport, record_recovery
from layerprune.recovery.training import (
    Budget,
    Training,
    TrainResult,
    lm_loss,
    optimise,
    predicted_tokens,
    shuffled,
    token_batches,
)
from layerprune.surgery import remove_layers

LOSSES = (*TOKEN_LOSSES, "lm")


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
class LayerReplacement(Training, TokenFilter, CacheSettings):
    """LLM-Streamline: one trained module (``kind`` in :data:`KINDS`) replaces the block.

    Gets the dense model and removes the block itself (it trains on the dense states). The
    module takes one layer's place, so removing n layers net takes a block of n + 1.
    """

    prunes: ClassVar[bool] = True
    contiguous: ClassVar[bool] = True
    layers_added: ClassVar[int] = 1

    kind: str = "layer"
    loss: str = "mse"  # mse | nmse | cosine: f(h_in) ~ h_out | lm: next-token loss through the rest
    grad_clip: float = 5.0  # as the authors' MSE training

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise LayerpruneError(
                f"unknown recovery kind '{self.kind}'; allowed: {', '.join(KINDS)}"
            )
        if self.loss not in LOSSES:
            raise LayerpruneError(
                f"unknown recovery loss '{self.loss}'; allowed: {', '.join(LOSSES)}"
            )
        self.check_filter(self.kind)
        self.check_cache(self.kind)
        if self.loss == "lm" and self.filters:
            raise LayerpruneError(
                f"recovery '{self.kind}': loss lm with exclude_positions "
                f"{self.exclude_positions} and exclude_outliers {self.exclude_outliers}; "
                "allowed: null or [] and null (the tokens to leave out apply to mse, nmse, cosine)"
            )

    @property
    def step_name(self) -> str:
        return self.kind

    def check(self, model: PreTrainedModel, removed: list[int]) -> None:
        check_block(model, *contiguous_block(removed, self.kind), self.kind)

    def train(
        self,
        model: PreTrainedModel,
        removed: list[int],
        train: torch.Tensor,
        heldout: torch.Tensor,
        cache_dir: str | None = None,
    ) -> RecoveryReport:
        """Replace the block ``removed`` of the dense ``model`` in place by a trained module."""
        self.check_positions(min(train.shape[1], heldout.shape[1]), self.kind)
        start, size = contiguous_block(removed, self.kind)
        stack = decoder_stack(model)
        dtype = next(model.parameters()).dtype
        budget = self.budget(len(train), train.shape[1])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            f = Float32(build_replacement(self.kind, stack, start))

        def apply(batch: BlockBatch) -> torch.Tensor:
            return f(batch.h_in, **batch.layer_kwargs)

        held = self.states(model, start, size, heldout, self.batch_size, cache_dir)
        fns = {"identity": lambda b: b.h_in, "before": apply}
        before, n_fitted = heldout_fit(in_order(held, self.batch_size), fns, self)
        lm = {"identity": self._lm_loss(model, start, size, _Skip(), heldout),
              "before": self._lm_loss(model, start, size, f, heldout)}  # fmt: skip
        result = self._optimise(model, start, size, train, f, apply, budget, cache_dir)
        after, _ = heldout_fit(in_order(held, self.batch_size), {"after": apply}, self)
        lm["after"] = self._lm_loss(model, start, size, f, heldout)

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
            train_tokens=result.tokens,
            tokens_per_step=budget.step_tokens,
            final_loss=result.final_loss,
            train_time_s=result.seconds,
            train_windows=len(train),
            heldout_windows=len(heldout),
            heldout_tokens=heldout.numel(),
            heldout_fitted_tokens=n_fitted,
            settings=self.reported(
                budget,
                kind=self.kind,
                loss=self.loss,
                **self.filter_settings(),
                **self.cache_settings(),
            ),
        )
        for side, fit in [*before.items(), *after.items()]:
            report.add_fit(side, fit)
        for side, loss in lm.items():
            setattr(report, f"heldout_lm_loss_{side}", loss)
        record_recovery(model, report, list(range(start, start + size)))
        stack.layers[start] = module
        remove_layers(model, range(start + 1, start + size))
        return report

    def _lm_loss(
        self, model: PreTrainedModel, start: int, size: int, f: nn.Module, heldout: torch.Tensor
    ) -> float:
        """The held-out next-token loss with ``f`` in place of the block: what the evaluation
        will see, which the fit of the block's output alone does not tell."""
        with _in_place_of_block(model, start, size, f):
            return lm_loss(model, heldout, self.batch_size)

    def _optimise(
        self,
        model: PreTrainedModel,
        start: int,
        size: int,
        train: torch.Tensor,
        f: nn.Module,
        apply: Callable[[BlockBatch], torch.Tensor],
        budget: Budget,
        cache_dir: str | None,
    ) -> TrainResult:
        """Train ``f`` with the step's loss; the dense model is left as it came in."""
        params = [p for p in f.parameters() if p.requires_grad]

        def run(batches: Iterator[Any], loss_fn: Any) -> TrainResult:
            return optimise(
                params, batches, loss_fn, budget, self.schedule, self.kind, self.progress
            )

        if self.loss != "lm":
            states: BlockStates = self.states(model, start, size, train, self.batch_size, cache_dir)
            batches = (states.batch(i) for i in shuffled(len(train), self.batch_size, self.seed))

            def loss_fn(b: BlockBatch) -> tuple[torch.Tensor, int]:
                mask = self.fitted(b.h_in, b.h_out)
                return token_loss_sum(self.loss, apply(b), b.h_out, mask)

            return run(batches, loss_fn)
        device = next(model.parameters()).device
        ids = token_batches(train, self.batch_size, self.seed, device)
        with _in_place_of_block(model, start, size, f):

            def lm_loss_sum(b: torch.Tensor) -> tuple[torch.Tensor, int]:
                n = predicted_tokens(b)
                return model(input_ids=b, labels=b, use_cache=False).loss * n, n

            return run(ids, lm_loss_sum)
