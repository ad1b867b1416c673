"""LoRA healing of an already pruned model, merged back so the result is a standard model.

Adapters are trained with the next-token loss on calibration windows, then merged into the
weights (``merge_and_unload``): no peft needed to load or evaluate the result. On failure they
are removed unmerged, leaving the model as it came in.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
from transformers import PreTrainedModel

from layerprune.errors import LayerpruneError
from layerprune.layers import decoder_stack
from layerprune.recovery.report import RecoveryReport, record_recovery
from layerprune.recovery.training import (
    Training,
    lm_loss,
    optimise,
    predicted_tokens,
    token_batches,
)


@dataclass(kw_only=True)
class LoraHealing(Training):
    """LoRA adapters trained with the LM loss on the pruned model, then merged.

    Gets the already pruned model and ignores ``removed``. ``target_modules=None`` adapts
    every linear module of the decoder layers (see ``DecoderStack.lora_targets``); ``steps``,
    when set, overrides the budget in tokens (``tokens``, else ``epochs`` passes).
    """

    prunes: ClassVar[bool] = False
    contiguous: ClassVar[bool] = False
    layers_added: ClassVar[int] = 0

    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] | None = None
    steps: int | None = None
    batch_size: int = 4
    weight_decay: float = 0.0
    min_lr: float = 0.0

    @property
    def step_name(self) -> str:
        return "lora"

    def train(
        self,
        model: PreTrainedModel,
        removed: list[int],
        train: torch.Tensor,
        heldout: torch.Tensor,
        cache_dir: str | None = None,
    ) -> RecoveryReport:
        """Heal ``model`` in place with merged LoRA adapters."""
        from peft import LoraConfig, get_peft_model

        budget = self.budget(len(train), train.shape[1], self.steps)
        targets = list(self.target_modules or decoder_stack(model).lora_targets())
        loss_before = lm_loss(model, heldout, self.batch_size)
        grads = {p: p.requires_grad for p in model.parameters()}
        config = LoraConfig(
            r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=targets
        )
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            torch.manual_seed(self.seed)
            # peft reads transformers' deprecated alias of is_activation_checkpointing; the
            # warning is about peft's code, not about anything a user of this step can change.
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated")
            try:
                peft_model = get_peft_model(model, config)
            except ValueError as e:
                raise LayerpruneError(
                    f"recovery 'lora': target_modules {targets} do not fit "
                    f"{type(model).__name__}: {str(e).splitlines()[0]}"
                ) from e
        device = next(model.parameters()).device
        batches = token_batches(train, self.batch_size, self.seed, device)

        def loss_fn(batch: object) -> tuple[torch.Tensor, int]:
            assert isinstance(batch, torch.Tensor)
            n = predicted_tokens(batch)
            return peft_model(input_ids=batch, labels=batch, use_cache=False).loss * n, n

        params = [p for p in peft_model.parameters() if p.requires_grad]
        peft_model.train()
        try:
            result = optimise(
                params, batches, loss_fn, budget, self.schedule, "lora", self.progress
            )
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
            train_tokens=result.tokens,
            tokens_per_step=budget.step_tokens,
            final_loss=result.final_loss,
            train_time_s=result.seconds,
            train_windows=len(train),
            heldout_windows=len(heldout),
            heldout_lm_loss_before=loss_before,
            heldout_lm_loss_after=lm_loss(model, heldout, self.batch_size),
            settings=self.reported(
                budget,
                rank=self.rank,
                alpha=self.alpha,
                dropout=self.dropout,
                lora_params=sum(p.numel() for p in params),
                target_modules=targets,
            ),
        )
        record_recovery(model, report, [])
        return report
