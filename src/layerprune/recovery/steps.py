"""Recovery steps as Hydra-instantiable callables: ``step(model, removed, windows) -> report``.

``removed`` are the planned layer indices of the model the step receives. A step with
``prunes = True`` gets the DENSE model and removes ``removed`` itself (it needs the dense
states); one with ``prunes = False`` gets the already pruned model and ignores ``removed``.
``layers_added`` says how many layers the step puts back: net removal = len(removed) -
layers_added. The hyper-parameters are the dataclass fields, set from ``conf/recovery``.
:class:`Recovery` is one ``conf/recovery`` option: its steps and the text they train on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
from transformers import PreTrainedModel

from layerprune.calibration import Calibration
from layerprune.errors import LayerpruneError
from layerprune.models import LoadedModel
from layerprune.recovery.activations import contiguous_block
from layerprune.recovery.linear import replace_linear
from layerprune.recovery.lora import TARGET_MODULES, lora_heal
from layerprune.recovery.replace import replace_block
from layerprune.recovery.report import RecoveryReport
from layerprune.scoring import Scorer
from layerprune.surgery import remove_layers


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


@dataclass
class Recovery:
    """A ``conf/recovery`` option: steps run in order, on windows from ``train_data``."""

    steps: list[Any]
    train_data: Calibration | None

    @property
    def layers_added(self) -> int:
        return sum(step.layers_added for step in self.steps)

    def check(self, scorer: Scorer) -> None:
        """A block replacement needs a contiguous block: say so before loading anything."""
        for step in self.steps:
            if step.contiguous and scorer.selection != "contiguous":
                raise LayerpruneError(
                    f"recovery step {type(step).__name__} needs a contiguous block, but scorer "
                    f"'{scorer.name}' selects '{scorer.selection}' layers; set "
                    "scorer.selection=contiguous"
                )

    def windows(self, loaded: LoadedModel) -> torch.Tensor | None:
        """The training windows, drawn before any long work so that too short a text fails fast."""
        if not self.steps:
            return None
        if self.train_data is None:
            names = ", ".join(type(step).__name__ for step in self.steps)
            raise LayerpruneError(
                f"recovery steps {names} train on text, but train_data is null; set "
                "recovery.train_data (e.g. the TextFile of conf/recovery/layer.yaml)"
            )
        return self.train_data.windows(loaded.tokenizer)

    def apply(
        self, loaded: LoadedModel, removed: list[int], windows: torch.Tensor | None
    ) -> list[dict[str, Any]]:
        """Prune (a replacing step prunes the dense model itself) and recover."""
        reports, pruned = [], False
        for step in self.steps:
            if not step.prunes and not pruned:
                remove_layers(loaded.model, removed)
                pruned = True
            assert windows is not None
            reports.append(step(loaded.model, removed, windows).to_dict())
            pruned = pruned or step.prunes
        if not pruned:
            remove_layers(loaded.model, removed)
        return reports
