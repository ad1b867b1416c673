"""What every recovery step is, and :class:`Recovery`, the steps of one ``conf/recovery`` option.

``removed`` are the planned layer indices of the model a step receives. A step with
``prunes = True`` gets the DENSE model and removes ``removed`` itself (it needs the dense
states); one with ``prunes = False`` gets the already pruned model and ignores ``removed``.
``layers_added`` says how many layers the step puts back: net removal = len(removed) -
layers_added. A step may set ``first_start``, the earliest layer its block may start at (the
linear fold: 1); the plan's contiguous choice honours it. ``cache_dir`` is the layerprune cache,
where a step may keep its activation cache.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from transformers import PreTrainedModel

from layerprune.calibration import Calibration
from layerprune.errors import LayerpruneError
from layerprune.models import LoadedModel
from layerprune.recovery.report import RecoveryReport
from layerprune.scoring import Scorer
from layerprune.surgery import remove_layers


@runtime_checkable
class RecoveryStep(Protocol):
    """A recovery step: its settings are its fields, calling it applies it in place."""

    @property
    def prunes(self) -> bool:
        """True: gets the dense model and removes the block itself."""

    @property
    def contiguous(self) -> bool:
        """True: needs the removed layers to be one contiguous block."""

    @property
    def layers_added(self) -> int:
        """Layers the step puts back into the pruned model."""

    def __call__(
        self,
        model: PreTrainedModel,
        removed: list[int],
        windows: torch.Tensor,
        heldout: torch.Tensor | None = None,
        cache_dir: str | None = None,
    ) -> RecoveryReport: ...


def _order_error(steps: Mapping[str, RecoveryStep]) -> str | None:
    """Why ``steps`` cannot run in this order, or None.

    A pruning step needs the dense model, so it must come first, and only one can: a second
    would prune the same layers again.
    """
    pruning = [i for i, step in enumerate(steps.values()) if step.prunes]
    if pruning in ([], [0]):
        return None
    order = ", ".join(f"{name} ({type(s).__name__})" for name, s in steps.items())
    return (
        f"recovery steps run in the order {order}; allowed: at most one step that prunes the "
        "dense model itself (LayerReplacement, LinearReplacement), and it comes first"
    )


@dataclass
class Recovery:
    """A ``conf/recovery`` option: named steps run in order, on windows from ``train_data``.

    ``steps`` maps a name (``replace``, ``linear``, ``lora`` in ``conf/recovery``) to a step; a
    plain list is accepted and named by position. ``cache_dir`` is the layerprune cache
    (``paths.cache``; null: the default), where steps keep their activation caches.
    """

    steps: Mapping[str, RecoveryStep] | Sequence[RecoveryStep]
    train_data: Calibration | None
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.steps, Mapping):
            self.steps = {f"{i}": step for i, step in enumerate(self.steps)}
        self.steps = dict(self.steps)
        error = _order_error(self.steps)
        if error:
            raise LayerpruneError(error)

    @property
    def _steps(self) -> list[RecoveryStep]:
        assert isinstance(self.steps, Mapping)
        return list(self.steps.values())

    @property
    def layers_added(self) -> int:
        return sum(step.layers_added for step in self._steps)

    @property
    def first_start(self) -> int:
        """The earliest layer the removed block may start at, for every step."""
        return max((int(getattr(step, "first_start", 0)) for step in self._steps), default=0)

    def check(self, scorer: Scorer) -> None:
        """A block replacement needs a contiguous block: say so before loading anything."""
        for step in self._steps:
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
            names = ", ".join(type(step).__name__ for step in self._steps)
            raise LayerpruneError(
                f"recovery steps {names} train on text, but train_data is null; set "
                "recovery.train_data (e.g. the TextFile of conf/recovery/train_data/wiki.yaml)"
            )
        return self.train_data.windows(loaded.tokenizer)

    def apply(
        self, loaded: LoadedModel, removed: list[int], windows: torch.Tensor | None
    ) -> list[dict[str, Any]]:
        """Prune (a pruning step, always the first, prunes the dense model itself) and recover."""
        steps = self._steps
        if not steps or not steps[0].prunes:
            remove_layers(loaded.model, removed)
        reports = []
        for step in steps:
            assert windows is not None
            report = step(loaded.model, removed, windows, cache_dir=self.cache_dir)
            reports.append(report.to_dict())
        return reports
