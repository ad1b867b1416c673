"""What the trained recovery steps share: settings, budget, schedule, optimisation loop.

Budgets are in tokens, as the papers state them: ``tokens`` is the training budget (null:
``epochs`` passes over the training windows) and ``batch_tokens`` the tokens per optimiser step,
reached by accumulating gradients over micro-batches of ``batch_size`` windows (``batch_size``
sets memory, ``batch_tokens`` the optimisation). LLM-Streamline's code takes 8 windows x 16
accumulation steps x 2048 tokens = 262,144 tokens per step.

Defaults take LLM-Streamline's stated settings: AdamW (lr 2e-4, weight decay 1e-3), linear
warmup over the first 5% of optimiser steps, then cosine decay toward 5e-5 over the rest. That
is the schedule as stated, not what their code effectively runs: train_lightweightnetwork.py
sizes its scheduler in micro-batches (warmup 0.5% and total 50% of them) but steps it once per
optimiser step (every 16 micro-batches), so its warmup spans about 8% of the optimiser steps and
the cosine only reaches about 12% of its course: the lr stays at or above 0.975 x 2e-4 after
warmup. A non-finite loss stops training with a :class:`LayerpruneError` naming the step,
before the optimiser touches the weights.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm import tqdm
from transformers import PreTrainedModel

from layerprune.errors import LayerpruneError
from layerprune.recovery.report import RecoveryReport


@dataclass
class Schedule:
    lr: float = 2e-4
    weight_decay: float = 1e-3
    warmup_ratio: float = 0.05
    min_lr: float = 5e-5
    grad_clip: float = 1.0
    betas: tuple[float, float] = (0.9, 0.999)

    def factor(self, step: int, total: int) -> float:
        """Multiplier of ``lr`` before optimiser step ``step`` (0-based) of ``total``: linear
        warmup over ``ceil(warmup_ratio * total)`` steps, then a half cosine from 1 toward
        ``min_lr / lr``, reached after the last step (see the module's note on LLM-Streamline's
        code)."""
        warmup = math.ceil(self.warmup_ratio * total)
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        floor = self.min_lr / self.lr
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Budget:
    """``steps`` optimiser steps, each of ``accumulation`` micro-batches of ``batch_size``
    windows of ``seq_len`` tokens."""

    batch_size: int
    accumulation: int
    steps: int
    seq_len: int

    @property
    def step_tokens(self) -> int:
        return self.batch_size * self.accumulation * self.seq_len

    @property
    def tokens(self) -> int:
        """Tokens the optimiser sees in all, repeats counted."""
        return self.steps * self.step_tokens

    @property
    def micro_batches(self) -> int:
        return self.steps * self.accumulation


@dataclass(kw_only=True)
class Training:
    """Settings every trained step has; a step subclasses it and adds its own.

    The defaults are LLM-Streamline's; a step with other defaults redeclares those fields.
    """

    batch_size: int = 8  # windows per forward pass (memory)
    batch_tokens: int | None = None  # tokens per optimiser step (null: one batch of windows)
    tokens: int | None = None  # training budget (null: `epochs` passes over the windows)
    epochs: int = 1
    lr: float = 2e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 1e-3
    warmup_ratio: float = 0.05
    min_lr: float = 5e-5
    grad_clip: float = 1.0
    heldout_fraction: float = 0.1  # the last windows, held out for the before/after figures
    seed: int = 0
    progress: bool = True

    @property
    def schedule(self) -> Schedule:
        betas = (float(self.betas[0]), float(self.betas[1]))
        return Schedule(
            self.lr, self.weight_decay, self.warmup_ratio, self.min_lr, self.grad_clip, betas
        )

    @property
    def step_name(self) -> str:
        """How errors and progress bars name the step."""
        raise NotImplementedError

    def budget(self, n_windows: int, seq_len: int, steps: int | None = None) -> Budget:
        """Optimiser steps and accumulation for ``n_windows`` training windows of ``seq_len``;
        ``steps`` (LoRA's own setting) overrides the budget."""
        micro = self.batch_size * seq_len
        accumulation = 1
        if self.batch_tokens is not None:
            if self.batch_tokens % micro:
                raise LayerpruneError(
                    f"recovery '{self.step_name}': batch_tokens {self.batch_tokens}; allowed: a "
                    f"multiple of batch_size x seq_len = {self.batch_size} x {seq_len} = {micro}"
                )
            accumulation = self.batch_tokens // micro
        step_tokens = micro * accumulation
        if steps is None and self.tokens is not None:
            steps = math.ceil(self.tokens / step_tokens)
        if steps is None:
            steps = math.ceil(self.epochs * n_windows / (self.batch_size * accumulation))
        return Budget(self.batch_size, accumulation, steps, seq_len)

    def __call__(
        self,
        model: PreTrainedModel,
        removed: list[int],
        windows: torch.Tensor,
        heldout: torch.Tensor | None = None,
        cache_dir: str | None = None,
    ) -> RecoveryReport:
        """Apply the step in place; ``heldout`` replaces the last ``heldout_fraction`` windows;
        ``cache_dir`` is the layerprune cache (for a step's activation cache)."""
        self.check(model, removed)
        train, heldout = split_heldout(
            windows, heldout, self.heldout_fraction, self.batch_size, self.step_name
        )
        self.budget(len(train), train.shape[1])  # a bad batch_tokens fails before any work
        return self.train(model, removed, train, heldout, cache_dir)

    def check(self, model: PreTrainedModel, removed: list[int]) -> None:
        """Refuse a model or selection the step cannot work on, before any training."""

    def train(
        self,
        model: PreTrainedModel,
        removed: list[int],
        train: torch.Tensor,
        heldout: torch.Tensor,
        cache_dir: str | None = None,
    ) -> RecoveryReport:
        """Train on ``train``, report figures on ``heldout``; the step's own work."""
        raise NotImplementedError

    def reported(self, budget: Budget, **own: Any) -> dict[str, Any]:
        """A report's ``settings``: the step's own, then budget, schedule and seed."""
        return {
            **own,
            "batch_size": self.batch_size,
            "batch_tokens": self.batch_tokens,
            "tokens": self.tokens,
            "epochs": self.epochs,
            "accumulation": budget.accumulation,
            **asdict(self.schedule),
            "seed": self.seed,
        }


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    seconds: float
    tokens: int


def optimise(
    params: Iterable[nn.Parameter],
    batches: Iterator[object],
    loss_fn: Callable[[object], tuple[torch.Tensor, int]],
    budget: Budget,
    schedule: Schedule,
    name: str,
    progress: bool = True,
) -> TrainResult:
    """``budget.steps`` AdamW steps over ``budget.accumulation`` micro-batches each, drawn from
    ``batches``. ``loss_fn`` gives a micro-batch's summed token loss and its number of tokens;
    a step's loss is the sum over its micro-batches divided by their total count, the mean over
    the step's tokens (a micro-batch with fewer fitted tokens weighs less, one with none adds
    nothing)."""
    params = list(params)
    optimizer = torch.optim.AdamW(
        params, lr=schedule.lr, weight_decay=schedule.weight_decay, betas=schedule.betas
    )
    total = budget.steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: schedule.factor(step, total)
    )
    bar = tqdm(range(total), desc=f"recovery {name}", unit="step", disable=not progress)
    started, loss_value = time.perf_counter(), math.nan
    scale = budget.step_tokens  # keeps the accumulated gradients near the mean's magnitude
    for step in bar:
        optimizer.zero_grad(set_to_none=True)
        loss_sum, count = 0.0, 0
        for _ in range(budget.accumulation):
            loss, n = loss_fn(next(batches))
            value = float(loss.detach())
            if not math.isfinite(value):
                raise LayerpruneError(
                    f"recovery '{name}': the loss became {value} at step {step + 1} of {total}; "
                    f"the model is left unchanged (try a lower lr than {schedule.lr:g})"
                )
            (loss / scale).backward()
            loss_sum += value
            count += n
        for p in params:
            if p.grad is not None:
                p.grad.mul_(scale / max(1, count))
        loss_value = loss_sum / max(1, count)
        torch.nn.utils.clip_grad_norm_(params, schedule.grad_clip)
        optimizer.step()
        scheduler.step()
        bar.set_postfix(loss=f"{loss_value:.4g}")
    return TrainResult(total, loss_value, time.perf_counter() - started, budget.tokens)


def predicted_tokens(ids: torch.Tensor) -> int:
    """Tokens a causal LM loss averages over in windows ``ids`` (all but each window's first)."""
    return ids.shape[0] * (ids.shape[1] - 1)


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


def shuffled(n: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless index batches of ``batch_size`` windows out of ``n``: a new seeded shuffle for each
    pass, a batch running on into the next pass, so that every batch has the same size."""
    gen = torch.Generator().manual_seed(seed)
    pending = torch.empty(0, dtype=torch.long)
    while True:
        while len(pending) < batch_size:
            pending = torch.cat([pending, torch.randperm(n, generator=gen)])
        yield pending[:batch_size]
        pending = pending[batch_size:]


def token_batches(
    windows: torch.Tensor, batch_size: int, seed: int, device: torch.device
) -> Iterator[torch.Tensor]:
    """Endless batches of token windows on ``device`` (see :func:`shuffled`)."""
    return (windows[i].to(device) for i in shuffled(len(windows), batch_size, seed))


@torch.no_grad()
def lm_loss(model: nn.Module, windows: torch.Tensor, batch_size: int) -> float:
    """Token-weighted mean next-token loss."""
    device = next(model.parameters()).device
    total = 0.0
    for batch in windows.split(batch_size):
        ids = batch.to(device)
        total += float(model(input_ids=ids, labels=ids, use_cache=False).loss) * batch.shape[0]
    return total / len(windows)
