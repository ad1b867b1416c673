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
from dataclasses import asdict
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from layerprune.errors import LayerpruneError
from layerprune.layers import decoder_stack
from layerprune.recovery.activations import BlockBatch, check_block, stream_block
from layerprune.recovery.modules import KINDS, Float32, build_replacement
from layerprune.recovery.report import RecoveryReport, record_recovery
from layerprune.recovery.training import Schedule, optimise
from layerprune.surgery import remove_layers

LOSSES = ("mse", "lm")


class _Skip(nn.Module):
    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


def split_heldout(
    windows: torch.Tensor, heldout: torch.Tensor | None, fraction: float, batch_size: int, step: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training and held-out windows; the last ``fraction`` is held out unless given."""
    if heldout is None:
        n_held = max(1, round(fraction * len(windows)))
        windows, heldout = windows[:-n_held], windows[len(windows) - n_held :]
    if len(windows) < batch_size:
        raise LayerpruneError(
            f"recovery '{step}' needs at least batch_size={batch_size} training windows (one "
            f"batch); got {len(windows)} after holding out {len(heldout)}: give more windows "
            "or a smaller batch_size"
        )
    return windows, heldout


def epochs_of(windows: torch.Tensor, epochs: int, seed: int) -> Iterator[torch.Tensor]:
    """The windows, reshuffled (seeded) for each epoch."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        yield windows[torch.randperm(len(windows), generator=gen)]


@torch.no_grad()
def heldout_fit(
    model: PreTrainedModel,
    start: int,
    size: int,
    heldout: torch.Tensor,
    batch_size: int,
    fns: dict[str, Callable[[BlockBatch], torch.Tensor]],
) -> dict[str, tuple[float, float]]:
    """Mean squared error and mean token cosine of each ``fns[name](batch)`` against h_out."""
    sq = dict.fromkeys(fns, 0.0)
    cos = dict.fromkeys(fns, 0.0)
    n_values = n_tokens = 0
    for batch in stream_block(model, start, size, heldout, batch_size):
        target = batch.h_out.double()
        for name, fn in fns.items():
            pred = fn(batch).double()
            sq[name] += float(((pred - target) ** 2).sum())
            cos[name] += float(F.cosine_similarity(pred, target, dim=-1).sum())
        n_values += target.numel()
        n_tokens += target.numel() // target.shape[-1]
    return {name: (sq[name] / n_values, cos[name] / n_tokens) for name in fns}


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


def replace_block(
    model: PreTrainedModel,
    start: int,
    size: int,
    kind: str,
    windows: torch.Tensor,
    loss: str = "mse",
    heldout: torch.Tensor | None = None,
    heldout_fraction: float = 0.1,
    epochs: int = 1,
    batch_size: int = 8,
    lr: float = 2e-4,
    weight_decay: float = 1e-3,
    warmup_ratio: float = 0.05,
    min_lr: float = 5e-5,
    grad_clip: float = 1.0,
    seed: int = 0,
    progress: bool = True,
) -> tuple[PreTrainedModel, RecoveryReport]:
    """Replace layers ``[start, start + size)`` of the dense ``model`` by one trained module.

    The model is modified in place (and returned). With ``kind='layer'`` or ``'swiglu'`` the
    module is a decoder layer, so removing n layers net takes a block of n + 1.
    """
    if kind not in KINDS:
        raise LayerpruneError(f"unknown recovery kind '{kind}'; allowed: {', '.join(KINDS)}")
    if loss not in LOSSES:
        raise LayerpruneError(f"unknown recovery loss '{loss}'; allowed: {', '.join(LOSSES)}")
    check_block(model, start, size, kind)
    train, heldout = split_heldout(windows, heldout, heldout_fraction, batch_size, kind)
    schedule = Schedule(lr, weight_decay, warmup_ratio, min_lr, grad_clip)
    stack = decoder_stack(model)
    dtype = next(model.parameters()).dtype
    eps = float(getattr(stack.config, "rms_norm_eps", 1e-6))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        f = Float32(build_replacement(kind, stack.layers[start], stack.config.hidden_size, eps))

    def apply(batch: BlockBatch) -> torch.Tensor:
        return f(batch.h_in, **batch.layer_kwargs)

    before = heldout_fit(
        model, start, size, heldout, batch_size, {"identity": lambda b: b.h_in, "f": apply}
    )
    steps = epochs * math.ceil(len(train) / batch_size)
    params = [p for p in f.parameters() if p.requires_grad]
    shuffled = epochs_of(train, epochs, seed)
    if loss == "mse":
        batches: Iterator[Any] = (
            b for w in shuffled for b in stream_block(model, start, size, w, batch_size)
        )

        def loss_fn(batch: Any) -> torch.Tensor:
            return F.mse_loss(apply(batch).float(), batch.h_out.float())

        result = optimise(params, batches, loss_fn, steps, schedule, kind, progress)
    else:
        device = next(model.parameters()).device
        batches = (b.to(device) for w in shuffled for b in w.split(batch_size))

        def loss_fn(batch: Any) -> torch.Tensor:
            return model(input_ids=batch, labels=batch, use_cache=False).loss

        with _in_place_of_block(model, start, size, f):
            result = optimise(params, batches, loss_fn, steps, schedule, kind, progress)
    after = heldout_fit(model, start, size, heldout, batch_size, {"f": apply})

    module = f.module.to(dtype).requires_grad_(False)
    removed = sum(
        p.numel() for layer in stack.layers[start : start + size] for p in layer.parameters()
    )
    report = RecoveryReport(
        method="replace_block",
        block_start=start,
        block_size=size,
        layers_added=1,
        params_removed=removed,
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
        settings={
            "kind": kind,
            "loss": loss,
            "epochs": epochs,
            "batch_size": batch_size,
            **asdict(schedule),
            "seed": seed,
        },
    )
    record_recovery(model, report, list(range(start, start + size)))
    stack.layers[start] = module
    remove_layers(model, range(start + 1, start + size))
    return model, report
