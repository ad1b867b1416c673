"""What a recovery step did, in a form the app can log and write as JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from transformers import PreTrainedModel

from layerprune.layers import decoder_stack
from layerprune.surgery import original_layer_indices

if TYPE_CHECKING:
    from layerprune.recovery.objective import Fit


@dataclass
class RecoveryReport:
    """Held-out figures compare f(h_in) with the dense model's h_out on windows not trained on.

    ``*_identity`` is the plain pruning baseline f(h) = h; ``*_before`` the module at its
    initialisation; ``*_fitted`` the same over the tokens the objective counts (all of them
    unless the step leaves some out, see :class:`~layerprune.recovery.objective.TokenFilter`).
    ``train_tokens`` counts every token the objective saw, repeats included (the fold: the
    tokens it was fitted on); ``train_windows`` x seq_len are the distinct ones. LoRA healing
    reports the held-out LM loss in ``heldout_lm_loss_*`` instead (before and after healing);
    a trained replacement reports it too, the block skipped (identity), and with the module in
    place before and after training.
    """

    method: str
    block_start: int | None = None
    block_size: int = 0
    layers_added: int = 0
    params_removed: int = 0
    params_added: int = 0
    steps: int = 0
    train_tokens: int = 0
    tokens_per_step: int = 0
    final_loss: float | None = None
    train_time_s: float = 0.0
    train_windows: int = 0
    heldout_windows: int = 0
    heldout_mse_identity: float | None = None
    heldout_mse_before: float | None = None
    heldout_mse_after: float | None = None
    heldout_cosine_identity: float | None = None
    heldout_cosine_before: float | None = None
    heldout_cosine_after: float | None = None
    heldout_tokens: int = 0
    heldout_fitted_tokens: int = 0
    heldout_mse_identity_fitted: float | None = None
    heldout_mse_before_fitted: float | None = None
    heldout_mse_after_fitted: float | None = None
    heldout_cosine_identity_fitted: float | None = None
    heldout_cosine_before_fitted: float | None = None
    heldout_cosine_after_fitted: float | None = None
    heldout_lm_loss_identity: float | None = None
    heldout_lm_loss_before: float | None = None
    heldout_lm_loss_after: float | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def params_net(self) -> int:
        """Parameters removed minus added (positive: the model got smaller)."""
        return self.params_removed - self.params_added

    def add_fit(self, side: str, fit: Fit) -> None:
        """Set the held-out figures of ``side`` (identity, before or after)."""
        setattr(self, f"heldout_mse_{side}", fit.mse)
        setattr(self, f"heldout_cosine_{side}", fit.cosine)
        setattr(self, f"heldout_mse_{side}_fitted", fit.mse_fitted)
        setattr(self, f"heldout_cosine_{side}_fitted", fit.cosine_fitted)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "params_net": self.params_net}


RECOVERY_RECORD = "layerprune_recovery"


def record_recovery(model: PreTrainedModel, report: RecoveryReport, replaced: list[int]) -> None:
    """Note in the config what replaced which original layers, so a saved checkpoint tells.

    A dict, not a list: surgery slices every config list as long as the layer count.
    """
    config = decoder_stack(model).config
    originals = original_layer_indices(model)
    entry = {"method": report.method, "original_layers": [originals[i] for i in replaced]}
    record = getattr(config, RECOVERY_RECORD, None) or {"steps": []}
    record["steps"].append({**entry, **report.settings})
    setattr(config, RECOVERY_RECORD, record)
