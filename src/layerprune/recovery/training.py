"""What the trained recovery steps share: settings, schedule, optimisation loop, held-out data.

Defaults follow the LLM-Streamline code: AdamW (lr 2e-4, weight decay 1e-3), linear warmup then
cosine decay to 5e-5, gradient clipping at 1.0. A non-finite loss stops training with a
:class:`LayerpruneError` naming the step, before the optimiser touches the weights.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm
from transformers import PreTrainedModel

from layerprune.errors import LayerpruneError
from layerprune.recovery.activations import BlockBatch, stream_block
from layerprune.recovery.report import RecoveryReport


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


@dataclass(kw_only=True)
class Training:
    """Settings every trained step has; a step subclasses it and adds its own.

    The defaults are LLM-Streamline's; a step with other defaults redeclares those fields.
    """

    batch_size: int = 8
    lr: float = 2e-4
    weight_decay: float = 1e-3
    warmup_ratio: float = 0.05
    min_lr: float = 5e-5
    grad_clip: float = 1.0
    heldout_fraction: float = 0.1  # the last windows, held out for the before/after figures
    seed: int = 0
    progress: bool = True

    @property
    def schedule(self) -> Schedule:
        return Schedule(self.lr, self.weight_decay, self.warmup_ratio, self.min_lr, self.grad_clip)

    @property
    def step_name(self) -> str:
        """How errors and progress bars name the step."""
        raise NotImplementedError

    def __call__(
        self,
        model: PreTrainedModel,
        removed: list[int],
        windows: torch.Tensor,
        heldout: torch.Tensor | None = None,
    ) -> RecoveryReport:
        """Apply the step in place; ``heldout`` replaces the last ``heldout_fraction`` windows."""
        self.check(model, removed)
        train, heldout = split_heldout(
            windows, heldout, self.heldout_fraction, self.batch_size, self.step_name
        )
        return self.train(model, removed, train, heldout)

    def check(self, model: PreTrainedModel, removed: list[int]) -> None:
        """Refuse a model or selection the step cannot work on, before any training."""

    def train(
        self, model: PreTrainedModel, removed: list[int], train: torch.Tensor, heldout: torch.Tensor
    ) -> RecoveryReport:
        """Train on ``train``, report figures on ``heldout``; the step's own work."""
        raise NotImplementedError

    def reported(self, **own: Any) -> dict[str, Any]:
        """A report's ``settings``: the step's own, then batch size, schedule and seed."""
        return {**own, "batch_size": self.batch_size, **asdict(self.schedule), "seed": self.seed}


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


def token_batches(
    windows: torch.Tensor, epochs: int, batch_size: int, seed: int, device: torch.device
) -> Iterator[torch.Tensor]:
    """Batches of token windows on ``device``, over ``epochs`` seeded shuffles."""
    return (b.to(device) for w in epochs_of(windows, epochs, seed) for b in w.split(batch_size))


@torch.no_grad()
def lm_loss(model: nn.Module, windows: torch.Tensor, batch_size: int) -> float:
    """Token-weighted mean next-token loss."""
    device = next(model.parameters()).device
    total = 0.0
    for batch in windows.split(batch_size):
        ids = batch.to(device)
        total += float(model(input_ids=ids, labels=ids, use_cache=False).loss) * batch.shape[0]
    return total / len(windows)


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
