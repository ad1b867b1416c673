"""Layer statistics from ONE forward pass, and the scorers that read them.

Forward hooks capture the residual stream entering every decoder layer and leaving the last one
(before the final norm), so there are L+1 states h_0..h_L. Per batch we accumulate

* ``cosine[a, b]``: the sum over tokens of cos(h_a, h_b), the full (L+1)x(L+1) matrix;
* ``angular[a, b]``: the sum over windows of arccos(cos(h_a, h_b)) / pi on the last token;

so memory does not grow with the number of windows, and every scorer, block size and sparsity
is read from the same statistics: ShortGPT's BI_i = 1 - cos[i, i+1], LLM-Streamline's block
score (1 + cos[j, j+n]) / 2 and Gromov et al.'s angular distance d[j, j+n].
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from layerprune.errors import LayerpruneError
from layerprune.layers import decoder_stack

Convention = Literal["residual", "hf_hidden_states"]
CONVENTIONS = ("residual", "hf_hidden_states")
Selection = Literal["independent", "contiguous"]
SELECTIONS = ("independent", "contiguous")


@dataclass
class LayerStats:
    """Token-mean cosine and last-token angular distance between all pairs of residual states."""

    cosine: torch.Tensor  # (L+1, L+1) float64, token mean
    angular: torch.Tensor  # (L+1, L+1) float64, window mean, in [0, 1]
    n_tokens: int
    n_windows: int
    convention: str

    @property
    def num_layers(self) -> int:
        return self.cosine.shape[0] - 1

    def block_cosine(self, n: int) -> torch.Tensor:
        """cos(h_j, h_{j+n}) for every block start j (L-n+1 values)."""
        return torch.diagonal(self.cosine, offset=n)

    def block_angular(self, n: int) -> torch.Tensor:
        return torch.diagonal(self.angular, offset=n)

    def block_influence(self) -> torch.Tensor:
        """ShortGPT's BI_i = 1 - E[cos(h_i, h_{i+1})]."""
        return 1 - self.block_cosine(1)

    MATRICES = ("cosine", "angular")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (the scores cache stores it)."""
        data = {k: v for k, v in vars(self).items() if k not in self.MATRICES}
        return {**{k: getattr(self, k).tolist() for k in self.MATRICES}, **data}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerStats:
        matrices = {k: torch.tensor(d[k], dtype=torch.float64) for k in cls.MATRICES}
        return cls(
            **matrices, n_tokens=int(d["n_tokens"]), n_windows=int(d["n_windows"]),
            convention=str(d["convention"]),
        )  # fmt: skip


def layer_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    h = args[0] if args else kwargs["hidden_states"]
    return h[0] if isinstance(h, tuple) else h


@contextmanager
def capture_residuals(
    model: PreTrainedModel, convention: Convention
) -> Iterator[list[torch.Tensor]]:
    """Yield a list that each forward fills with the L+1 residual states (in order)."""
    if convention not in CONVENTIONS:
        raise LayerpruneError(
            f"unknown convention '{convention}'; allowed: {', '.join(CONVENTIONS)}"
        )
    stack = decoder_stack(model)
    states: list[torch.Tensor] = []

    def on_input(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        states.append(layer_input(args, kwargs))

    def on_output(_m: nn.Module, _args: Any, output: Any) -> None:
        states.append(output[0] if isinstance(output, tuple) else output)

    handles = [
        layer.register_forward_pre_hook(on_input, with_kwargs=True) for layer in stack.layers
    ]
    # The published codes read HF's output_hidden_states, whose last entry is post-norm.
    last = stack.norm if convention == "hf_hidden_states" else stack.layers[-1]
    handles.append(last.register_forward_hook(on_output))
    try:
        yield states
    finally:
        for handle in handles:
            handle.remove()


def _unit(states: list[torch.Tensor]) -> torch.Tensor:
    """(L+1, B, T, D) unit vectors in fp32; a zero state gets a zero vector, never NaN."""
    return F.normalize(torch.stack(states).float(), dim=-1, eps=1e-12)


@torch.no_grad()
def collect_layer_stats(
    model: PreTrainedModel,
    windows: torch.Tensor,
    batch_size: int = 8,
    convention: Convention = "residual",
    progress: bool = False,
) -> LayerStats:
    """One no-grad pass over ``windows`` (N, T) accumulating :class:`LayerStats`."""
    stack = decoder_stack(model)
    size = stack.num_layers + 1
    device = next(model.parameters()).device
    cos_sum = torch.zeros(size, size, dtype=torch.float64, device=device)
    ang_sum = torch.zeros(size, size, dtype=torch.float64, device=device)
    n_tokens = 0
    batches = windows.split(batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="scoring", unit="batch")
    with capture_residuals(model, convention) as states:
        for batch in batches:
            states.clear()
            # The base model skips the LM head: logits are not needed for scoring.
            stack.base(input_ids=batch.to(device), use_cache=False)
            unit = _unit(states)  # (L+1, B, T, D)
            flat = unit.flatten(1)  # sum over tokens of <u_a, u_b> is one GEMM
            cos_sum += (flat @ flat.T).double()
            # arccos is ill-conditioned near 1: the few last-token vectors go in fp64.
            last = F.normalize(unit[:, :, -1].transpose(0, 1).double(), dim=-1)  # (B, L+1, D)
            cos_last = (last @ last.transpose(1, 2)).clamp(-1, 1)
            ang_sum += (torch.arccos(cos_last) / math.pi).sum(0)
            n_tokens += batch.numel()
            states.clear()
    n_windows = windows.shape[0]
    return LayerStats(
        cosine=(cos_sum / n_tokens).cpu(),
        angular=(ang_sum / n_windows).cpu(),
        n_tokens=n_tokens,
        n_windows=n_windows,
        convention=convention,
    )


@dataclass(frozen=True)
class LayerMetric:
    """A scorer's statistic as scores.json records it and the figures draw it.

    ``of_blocks(stats, n)`` is the statistic of every block of ``n`` layers (n=1: per layer), in
    the scorer's own terms; a ``similarity`` (high = prune) is drawn as ``1 - value`` so that
    every curve of a figure reads "low = prune".
    """

    key: str  # the field of scores.json's layer_metrics and block_metrics
    label: str  # the legend of the drawn importance
    of_blocks: Callable[[LayerStats, int], torch.Tensor]
    similarity: bool = False

    def importance(self, values: Sequence[float]) -> list[float]:
        """Recorded values as drawn: low = prune."""
        return [1 - v for v in values] if self.similarity else [float(v) for v in values]


class Scorer(ABC):
    """Ranks the layers for removal: the LOWEST importance is pruned first. A
    :class:`StatisticScorer` reads :class:`LayerStats`; a model scorer
    (:class:`layerprune.criteria.ModelScorer`) measures the model's loss itself."""

    name: str
    selection: Selection
    metric: ClassVar[LayerMetric | None] = None  # what scores.json records for this scorer

    def __init__(self, selection: Selection) -> None:
        if selection not in SELECTIONS:
            raise LayerpruneError(
                f"unknown selection '{selection}'; allowed: {', '.join(SELECTIONS)}"
            )
        self.selection = selection


class StatisticScorer(Scorer):
    """Turns :class:`LayerStats` into importances, for single layers and for blocks."""

    @abstractmethod
    def layer_importance(self, stats: LayerStats) -> torch.Tensor:
        """(L,) importance of each single layer."""

    @abstractmethod
    def block_importance(self, stats: LayerStats, n: int) -> torch.Tensor:
        """(L-n+1,) importance of the block of ``n`` layers starting at each j."""


class BlockInfluence(StatisticScorer):
    """ShortGPT: BI_i = 1 - E cos(h_i, h_{i+1}); for a block, 1 - E cos(h_j, h_{j+n})."""

    name = "block_influence"
    metric = LayerMetric(
        "block_influence", "block influence (ShortGPT)", lambda stats, n: 1 - stats.block_cosine(n)
    )

    def __init__(self, selection: Selection = "independent") -> None:
        super().__init__(selection)

    def layer_importance(self, stats: LayerStats) -> torch.Tensor:
        return stats.block_influence()

    def block_importance(self, stats: LayerStats, n: int) -> torch.Tensor:
        return 1 - stats.block_cosine(n)


class Streamline(StatisticScorer):
    """LLM-Streamline: prune the block maximising E (1 + cos(h_j, h_{j+n})) / 2."""

    name = "streamline"
    metric = LayerMetric(
        "streamline_similarity",
        "1 - Streamline similarity",
        lambda stats, n: Streamline.similarity(stats, n),
        similarity=True,
    )

    def __init__(self, selection: Selection = "contiguous") -> None:
        super().__init__(selection)

    @staticmethod
    def similarity(stats: LayerStats, n: int) -> torch.Tensor:
        return (1 + stats.block_cosine(n)) / 2

    def layer_importance(self, stats: LayerStats) -> torch.Tensor:
        return -self.similarity(stats, 1)

    def block_importance(self, stats: LayerStats, n: int) -> torch.Tensor:
        return -self.similarity(stats, n)


class Angular(StatisticScorer):
    """Gromov et al.: prune the block minimising arccos(cos(h_j, h_{j+n})) / pi, last token."""

    name = "angular"
    metric = LayerMetric(
        "angular_distance", "angular distance (Gromov)", lambda stats, n: stats.block_angular(n)
    )

    def __init__(self, selection: Selection = "contiguous") -> None:
        super().__init__(selection)

    def layer_importance(self, stats: LayerStats) -> torch.Tensor:
        return stats.block_angular(1)

    def block_importance(self, stats: LayerStats, n: int) -> torch.Tensor:
        return stats.block_angular(n)


class Random(StatisticScorer):
    """Seeded random importances: the baseline every criterion must beat."""

    name = "random"

    def __init__(self, seed: int = 0, selection: Selection = "independent") -> None:
        super().__init__(selection)
        self.seed = seed

    def _draw(self, size: int, salt: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + salt)
        return torch.rand(size, generator=gen, dtype=torch.float64)

    def layer_importance(self, stats: LayerStats) -> torch.Tensor:
        return self._draw(stats.num_layers, 0)

    def block_importance(self, stats: LayerStats, n: int) -> torch.Tensor:
        return self._draw(stats.num_layers - n + 1, n)


class Last(StatisticScorer):
    """Remove the n layers just before the final layer (which is kept)."""

    name = "last"

    def __init__(self, selection: Selection = "contiguous") -> None:
        super().__init__(selection)

    def layer_importance(self, stats: LayerStats) -> torch.Tensor:
        num = stats.num_layers
        imp = torch.arange(num, 0, -1, dtype=torch.float64) - 1  # layer i -> L-1-i
        imp[-1] = num  # the final layer is the most important
        return imp

    def block_importance(self, stats: LayerStats, n: int) -> torch.Tensor:
        num = stats.num_layers
        if n >= num:
            raise LayerpruneError(f"'last' keeps the final layer: cannot remove {n} of {num}")
        imp = torch.ones(num - n + 1, dtype=torch.float64)
        imp[num - 1 - n] = 0
        return imp


def layer_metric_definitions() -> list[LayerMetric]:
    """The statistics scores.json records and the figures draw: the ``metric`` of every
    statistic scorer that has one, in the order the scorers are defined above."""
    return [s.metric for s in StatisticScorer.__subclasses__() if s.metric is not None]


def layer_metrics(stats: LayerStats, block_size: int) -> dict[str, dict[str, Any]]:
    """scores.json's ``layer_metrics`` (per layer) and ``block_metrics`` (per block of
    ``block_size`` layers, the number removed): every statistic-based scorer's own values."""
    definitions = layer_metric_definitions()
    return {
        "layer_metrics": {m.key: m.of_blocks(stats, 1).tolist() for m in definitions},
        "block_metrics": {
            "size": block_size,
            **{m.key: m.of_blocks(stats, block_size).tolist() for m in definitions},
        },
    }
