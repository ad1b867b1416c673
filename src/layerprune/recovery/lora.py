"""LoRA healing of an already pruned model, merged back so the result is a standard model.

Adapters are trained with the next-token loss on calibration windows, then merged into the
weights (``merge_and_unload``): no peft needed to load or evaluate the result. On failure they
are removed unmerged, leaving the model as it came in.
"""

from __future__ import annotations

import math
from dataclasses import asdict

import torch
from transformers import PreTrainedModel

from layerprune.errors import LayerpruneError
from layerprune.recovery.replace import epochs_of, split_heldout
from layerprune.recovery.report import RecoveryReport, record_recovery
from layerprune.recovery.training import Schedule, optimise

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@torch.no_grad()
def lm_loss(model: torch.nn.Module, windows: torch.Tensor, batch_size: int) -> float:
    """Token-weighted mean next-token loss."""
    device = next(model.parameters()).device
    total = 0.0
    for batch in windows.split(batch_size):
        ids = batch.to(device)
        total += float(model(input_ids=ids, labels=ids, use_cache=False).loss) * batch.shape[0]
    return total / len(windows)


def lora_heal(
    model: PreTrainedModel,
    windows: torch.Tensor,
    rank: int = 8,
    alpha: int = 16,
    dropout: float = 0.05,
    target_modules: tuple[str, ...] | list[str] = TARGET_MODULES,
    steps: int | None = None,
    batch_size: int = 4,
    lr: float = 2e-4,
    weight_decay: float = 0.0,
    warmup_ratio: float = 0.05,
    min_lr: float = 0.0,
    grad_clip: float = 1.0,
    heldout: torch.Tensor | None = None,
    heldout_fraction: float = 0.1,
    seed: int = 0,
    progress: bool = True,
) -> tuple[PreTrainedModel, RecoveryReport]:
    """Heal ``model`` in place with merged LoRA; ``steps=None`` is one pass over the windows."""
    from peft import LoraConfig, get_peft_model

    train, heldout = split_heldout(windows, heldout, heldout_fraction, batch_size, "lora")
    per_epoch = math.ceil(len(train) / batch_size)
    total = steps or per_epoch
    schedule = Schedule(lr, weight_decay, warmup_ratio, min_lr, grad_clip)
    loss_before = lm_loss(model, heldout, batch_size)
    grads = {p: p.requires_grad for p in model.parameters()}
    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules)
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            peft_model = get_peft_model(model, config)
        except ValueError as e:
            raise LayerpruneError(
                f"recovery 'lora': target_modules {list(target_modules)} do not fit "
                f"{type(model).__name__}: {str(e).splitlines()[0]}"
            ) from e
    device = next(model.parameters()).device
    shuffled = epochs_of(train, math.ceil(total / per_epoch), seed)
    batches = (b.to(device) for w in shuffled for b in w.split(batch_size))

    def loss_fn(batch: object) -> torch.Tensor:
        assert isinstance(batch, torch.Tensor)
        return peft_model(input_ids=batch, labels=batch, use_cache=False).loss

    params = [p for p in peft_model.parameters() if p.requires_grad]
    added = sum(p.numel() for p in params)
    peft_model.train()
    try:
        result = optimise(params, batches, loss_fn, total, schedule, "lora", progress)
    except BaseException:
        peft_model.unload()
        raise
    finally:
        model.eval()
        for p, flag in grads.items():
            p.requires_grad_(flag)
    merged = peft_model.merge_and_unload()
    assert merged is model
    report = RecoveryReport(
        method="lora_heal",
        steps=result.steps,
        final_loss=result.final_loss,
        train_time_s=result.seconds,
        train_windows=len(train),
        heldout_windows=len(heldout),
        heldout_lm_loss_before=loss_before,
        heldout_lm_loss_after=lm_loss(model, heldout, batch_size),
        settings={
            "rank": rank,
            "alpha": alpha,
            "dropout": dropout,
            "lora_params": added,
            "target_modules": list(target_modules),
            "batch_size": batch_size,
            **asdict(schedule),
            "seed": seed,
        },
    )
    record_recovery(model, report, [])
    return model, report
