"""Recovery steps as Hydra-instantiable callables: ``step(model, removed, windows) -> report``.

``removed`` are the planned layer indices of the model the step receives. A step with
``prunes = True`` gets the DENSE model and removes ``removed`` itself (it needs the dense
states); one with ``prunes = False`` gets the already pruned model and ignores ``removed``.
``layers_added`` says how many layers the step puts back: net removal = len(removed) -
layers_added. The hyper-parameters are the dataclass fields, set from ``conf/recovery``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
from transformers import PreTrainedModel

from layerprune.recovery.activations import contiguous_block
from layerprune.recovery.linear import replace_linear
from layerprune.recovery.lora import TARGET_MODULES, lora_heal
from layerprune.recovery.replace import replace_block
from layerprune.recovery.report import RecoveryReport


@dataclass
class LayerReplacement:
    """LLM-Streamline: one trained module (``kind`` layer | swiglu | ffn) replaces the block."""

    prunes: ClassVar[bool] = True
    contiguous: ClassVar[bool] = True
    layers_added: ClassVar[int] = 1

    kind: str = "layer"
    loss: str = "mse"
    epochs: int = 1
    batch_size: int = 8
    lr: float = 2e-4
    weight_decay: float = 1e-3
    warmup_ratio: float = 0.05
    min_lr: float = 5e-5
    grad_clip: float = 1.0
    heldout_fraction: float = 0.1
    seed: int = 0
    progress: bool = True

    def __call__(
        self, model: PreTrainedModel, removed: list[int], windows: torch.Tensor
    ) -> RecoveryReport:
        start, size = contiguous_block(removed, self.kind)
        return replace_block(model, start, size, windows=windows, **asdict(self))[1]


@dataclass
class LinearReplacement:
    """ReplaceMe: training-free least-squares map folded into the layer before the block."""

    prunes: ClassVar[bool] = True
    contiguous: ClassVar[bool] = True
    layers_added: ClassVar[int] = 0

    ridge: float = 0.0
    batch_size: int = 8

    def __call__(
        self, model: PreTrainedModel, removed: list[int], windows: torch.Tensor
    ) -> RecoveryReport:
        start, size = contiguous_block(removed, "linear")
        return replace_linear(model, start, size, windows, **asdict(self))[1]


@dataclass
class LoraHealing:
    """LoRA adapters trained with the LM loss on the pruned model, then merged."""

    prunes: ClassVar[bool] = False
    contiguous: ClassVar[bool] = False
    layers_added: ClassVar[int] = 0

    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = TARGET_MODULES
    steps: int | None = None
    batch_size: int = 4
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    min_lr: float = 0.0
    grad_clip: float = 1.0
    heldout_fraction: float = 0.1
    seed: int = 0
    progress: bool = True

    def __call__(
        self, model: PreTrainedModel, removed: list[int], windows: torch.Tensor
    ) -> RecoveryReport:
        return lora_heal(model, windows, **asdict(self))[1]
