"""What a block replacement is fitted to: which tokens count, and how an error is measured.

Attention sinks dominate squared errors. On SmolLM2-135M the block [9, 19) writes an update of
median norm about 24,000 at position 0 of every window (the BOS, an attention sink) against
about 120 elsewhere, so that one token per window holds over 95% of the squared target: an MSE
fit spends itself on the sink. :class:`TokenFilter` leaves such tokens out of the fit or the
loss, by position (``exclude_positions``) or by a stated outlier rule (``exclude_outliers``),
and is shared by the linear fold and the trained replacements, so "fitted tokens" means the
same in both. Losses and held-out figures are computed over token masks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from layerprune.errors import LayerpruneError
from layerprune.recovery.activations import BlockBatch

TOKEN_LOSSES = ("mse", "nmse", "cosine")  # losses between f(h_in) and h_out, per token
# Positions each objective leaves out by default (exclude_positions: null). Squared errors are
# dominated by the sink at position 0; measured on SmolLM2-135M (README), leaving it out halves
# the linear fold's perplexity and helps the trained layer. Per-token normalised objectives
# (nmse, cosine) weigh every token alike and the LM loss is not a state error: none.
LEFT_OUT = {"mse": [0]}
TINY = 1e-12


@dataclass(kw_only=True)
class TokenFilter:
    """Tokens left out of a step's fit or loss (the held-out figures report both sets).

    ``exclude_positions``: positions in every window, e.g. ``[0]`` for the BOS/sink token;
    null: the objective's default, :data:`LEFT_OUT`. ``exclude_outliers``: k, or null. A token
    is left out when its block update ||h_out - h_in|| exceeds k times the median update norm
    of its window. The update is what the replacement must produce, and what the sink inflates
    (the sink's INPUT norm is only about 5x the median on SmolLM2, its update about 200x); the
    window median makes the rule independent of the batch size.
    """

    loss: str = "mse"
    exclude_positions: list[int] | None = None
    exclude_outliers: float | None = None

    def check_filter(self, step: str) -> None:
        given = self.exclude_positions
        if given is not None and (
            not isinstance(given, (list, tuple))
            or any(not isinstance(p, int) or isinstance(p, bool) or p < 0 for p in given)
        ):
            raise LayerpruneError(
                f"recovery '{step}': exclude_positions {self.exclude_positions}; allowed: null "
                "or positions >= 0 (e.g. [0] for the BOS token)"
            )
        if self.exclude_outliers is not None and not self.exclude_outliers > 1:
            raise LayerpruneError(
                f"recovery '{step}': exclude_outliers {self.exclude_outliers}; allowed: null or "
                "a factor > 1 of the window's median update norm"
            )

    def check_positions(self, seq_len: int, step: str | None = None) -> None:
        """Refuse positions the windows do not have, before any work (none is ignored)."""
        if any(p >= seq_len for p in self.positions_left_out):
            named = f"recovery '{step}': " if step else ""
            raise LayerpruneError(
                f"{named}exclude_positions {self.exclude_positions}; allowed: positions < "
                f"{seq_len}, the length of the windows"
            )

    @property
    def positions_left_out(self) -> list[int]:
        if self.exclude_positions is None:
            return list(LEFT_OUT.get(self.loss, []))
        return list(self.exclude_positions)

    @property
    def filters(self) -> bool:
        return bool(self.positions_left_out) or self.exclude_outliers is not None

    def fitted(self, h_in: torch.Tensor, h_out: torch.Tensor) -> torch.Tensor:
        """``(windows, positions)`` bool: the tokens the objective counts."""
        self.check_positions(h_in.shape[1])
        keep = torch.ones(h_in.shape[:2], dtype=torch.bool, device=h_in.device)
        keep[:, self.positions_left_out] = False
        if self.exclude_outliers is not None:
            update = (h_out.float() - h_in.float()).norm(dim=-1)
            median = update.median(dim=1, keepdim=True).values
            keep &= update <= self.exclude_outliers * median
        return keep

    def filter_settings(self) -> dict[str, object]:
        return {
            "exclude_positions": self.positions_left_out,
            "exclude_outliers": self.exclude_outliers,
        }


def token_loss_sum(
    loss: str, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """The sum over the tokens in ``mask`` of the per-token loss, in float32, and their number.

    ``mse``: ||p - y||^2 / d; ``nmse``: ||p - y||^2 / ||y||^2, each token's error relative to
    its own target, so a token of norm 24,000 weighs no more than one of norm 120; ``cosine``:
    1 - cos(p, y). A training step divides the sum over its micro-batches by their total count,
    so that its loss is the mean over its fitted tokens however they fall into micro-batches.
    """
    if loss not in TOKEN_LOSSES:
        raise LayerpruneError(f"unknown token loss '{loss}'; allowed: {', '.join(TOKEN_LOSSES)}")
    pred, target = pred.float(), target.float()
    count = int(mask.sum())
    if not count:
        return pred.sum() * 0.0, 0  # no token to fit in this batch: no gradient, no NaN
    p, y = pred[mask], target[mask]
    if loss == "mse":
        per_token = (p - y).pow(2).mean(-1)
    elif loss == "nmse":
        per_token = (p - y).pow(2).sum(-1) / y.pow(2).sum(-1).clamp_min(TINY)
    else:
        per_token = 1 - F.cosine_similarity(p, y, dim=-1)
    return per_token.sum(), count


def token_loss(
    loss: str, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Mean over the tokens in ``mask`` of the per-token loss (see :func:`token_loss_sum`);
    ``mse`` is ``F.mse_loss`` over the kept tokens."""
    total, count = token_loss_sum(loss, pred, target, mask)
    return total / max(1, count)


Predictor = Callable[[BlockBatch], torch.Tensor]


@dataclass
class _Sums:
    sq: float = 0.0
    cos: float = 0.0
    values: int = 0
    tokens: int = 0

    def add(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        self.sq += float((pred - target).pow(2).sum())
        self.cos += float(F.cosine_similarity(pred, target, dim=-1).sum())
        self.values += target.numel()
        self.tokens += target.numel() // max(1, target.shape[-1])

    def result(self) -> tuple[float | None, float | None]:
        if not self.tokens:
            return None, None
        return self.sq / self.values, self.cos / self.tokens


@dataclass
class Fit:
    """Held-out mean squared error and mean token cosine against h_out, over all tokens and
    over the fitted ones (those :class:`TokenFilter` keeps)."""

    mse: float | None
    cosine: float | None
    mse_fitted: float | None
    cosine_fitted: float | None


@torch.no_grad()
def heldout_fit(
    batches: Iterable[BlockBatch], fns: dict[str, Predictor], tokens: TokenFilter
) -> tuple[dict[str, Fit], int]:
    """:class:`Fit` of each ``fns[name](batch)``, and the number of fitted tokens."""
    every = {name: _Sums() for name in fns}
    kept = {name: _Sums() for name in fns}
    n_fitted = 0
    for batch in batches:
        target = batch.h_out.double()
        mask = tokens.fitted(batch.h_in, batch.h_out)
        n_fitted += int(mask.sum())
        for name, fn in fns.items():
            pred = fn(batch).double()
            every[name].add(pred, target)
            kept[name].add(pred[mask], target[mask])
    return {name: Fit(*every[name].result(), *kept[name].result()) for name in fns}, n_fitted
