"""The optimisation loop shared by block replacement and LoRA healing.

Defaults follow the LLM-Streamline code: AdamW (lr 2e-4, weight decay 1e-3), linear warmup then
cosine decay to 5e-5, gradient clipping at 1.0. A non-finite loss stops training with a
:class:`LayerpruneError` naming the step, before the optimiser touches the weights.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from layerprune.errors import LayerpruneError


@dataclass
class Schedule:
    lr: float = 2e-4
    weight_decay: float = 1e-3
    warmup_ratio: float = 0.05
    min_lr: float = 5e-5
    grad_clip: float = 1.0

    def factor(self, step: int, total: int) -> float:
        """Multiplier of ``lr`` before optimiser step ``step`` (0-based) of ``total``."""
        warmup = math.ceil(self.warmup_ratio * total)
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        floor = self.min_lr / self.lr
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    seconds: float


def optimise(
    params: Iterable[nn.Parameter],
    batches: Iterator[object],
    loss_fn: Callable[[object], torch.Tensor],
    total: int,
    schedule: Schedule,
    name: str,
    progress: bool = True,
) -> TrainResult:
    """``total`` AdamW steps, one per batch drawn from ``batches``."""
    params = list(params)
    optimizer = torch.optim.AdamW(params, lr=schedule.lr, weight_decay=schedule.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: schedule.factor(step, total)
    )
    bar = tqdm(range(total), desc=f"recovery {name}", unit="step", disable=not progress)
    started, loss_value = time.perf_counter(), math.nan
    for step in bar:
        loss = loss_fn(next(batches))
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise LayerpruneError(
                f"recovery '{name}': the loss became {loss_value} at step {step + 1} of {total}; "
                f"the model is left unchanged (try a lower lr than {schedule.lr:g})"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, schedule.grad_clip)
        optimizer.step()
        scheduler.step()
        bar.set_postfix(loss=f"{loss_value:.4g}")
    return TrainResult(total, loss_value, time.perf_counter() - started)
