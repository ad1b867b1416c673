"""Criteria that measure the model itself: SLEB, and Shortened LLaMA's PPL and Taylor+.

Unlike the statistic scorers of :mod:`layerprune.scoring`, these cannot be read from the
one-pass :class:`~layerprune.scoring.LayerStats`: they need the model's loss on calibration
windows. A :class:`ModelScorer` is given the model, the windows and the number of layers to
remove, and returns :class:`CriterionScores`: one measured value per layer, the order in which
the layers go, and the layers it never removes. The plan reads the order; scores.json and the
importance figure record all of it, as they record the statistics.

* :class:`SLEB` (Song et al. 2024, jiwonsong-dev/SLEB): remove one layer at a time, each time
  the one whose removal raises the calibration NLL least, re-measuring the current model after
  every removal; never the first or the last remaining layer (``early_barrier``,
  ``latter_barrier``). Runs on :class:`~layerprune.engine.SkipEngine`.
* :class:`PPLCriterion` (Kim et al. 2024, Nota-NetsPresso/shortened-llm): one shot, the
  calibration perplexity of the model without each layer; the lowest go.
* :class:`TaylorPlus` (same paper): one shot, sum over the layer's weights of
  ``|sum over batches of w * dL/dw|``, L the batch's mean next-token loss; the lowest go.

The official code keeps the first four and last two blocks of every Shortened-LLaMA plan (its
"+" heuristic, applied by its pruning script to both criteria): ``keep_first``, ``keep_last``.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from layerprune.engine import SkipEngine, perplexity_of
from layerprune.errors import LayerpruneError
from layerprune.layers import decoder_stack
from layerprune.scoring import Scorer, Selection

# Receives an iterative criterion's steps so far, after each step.
StepSink = Callable[[list[dict[str, Any]]], None]


@dataclass
class CriterionScores:
    """What a :class:`ModelScorer` measured, as scores.json records it and the plan reads it.

    ``values`` has one entry per layer (None where the layer was not measured) in the
    criterion's own terms, low = prune; ``order`` lists the layers in the order they are
    removed (an iterative criterion lists only those it removed); ``steps`` holds, for an
    iterative criterion, every step's candidates and choice.
    """

    criterion: str
    key: str  # the field of scores.json's layer_metrics
    label: str  # the legend of the drawn values
    values: list[float | None]
    order: list[int]
    protected: list[int] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)
    n_windows: int = 0
    n_tokens: int = 0
    dense_ppl: float | None = None  # the whole model's calibration perplexity

    @property
    def num_layers(self) -> int:
        return len(self.values)

    def choose(self, k: int) -> tuple[list[int], list[float]]:
        """The k layers to remove and the importances (low = prune) the choice reads: the
        measured values of a one-shot criterion, the removal rank of an iterative one."""
        if k > len(self.order):
            raise LayerpruneError(
                f"{self.criterion} ranked {len(self.order)} layers; cannot remove {k}"
            )
        if self.steps:
            rank = {layer: float(i) for i, layer in enumerate(self.order)}
            importance = [rank.get(i, float(len(self.order))) for i in range(self.num_layers)]
        else:
            importance = [math.inf if v is None else v for v in self.values]
        return sorted(self.order[:k]), importance

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CriterionScores:
        return cls(**d)


class ModelScorer(Scorer):
    """A scorer that measures the model on calibration windows (see the module docstring).

    ``iterative``: the criterion removes one layer at a time and measures the model again
    after each removal. Its order for k layers is the first k of its order for more (which is
    what lets a stopped measurement resume and a longer one extend a shorter one), but its
    values, read at the last step, depend on k, so the scores cache key holds k.
    """

    iterative: ClassVar[bool] = False
    skips_layers: ClassVar[bool] = True  # measured on the SkipEngine (layers run one by one)
    selections: ClassVar[tuple[str, ...]] = ("independent",)

    def __init__(self, selection: Selection = "independent") -> None:
        super().__init__(selection)
        if selection not in self.selections:
            raise LayerpruneError(
                f"{self.name} measures single layers: selection '{selection}' is not "
                f"supported; allowed: {', '.join(self.selections)}"
            )

    @abstractmethod
    def protected(self, num_layers: int) -> list[int]:
        """Layers this criterion never removes from a model of ``num_layers``."""

    @abstractmethod
    def protection(self) -> str:
        """The rule behind :meth:`protected`, with its config keys, for error messages."""

    def max_removable(self, num_layers: int) -> int:
        return num_layers - len(self.protected(num_layers))

    def settings(self) -> dict[str, Any]:
        """Everything the measurement depends on besides the model, windows and k."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def identity(self, k: int | None) -> dict[str, Any]:
        """The scores cache key's part for this scorer: its class, settings and, for an
        iterative criterion, the number of layers it removes (None: the key of its steps,
        which serve every k)."""
        cls = type(self)
        return {
            "scorer": f"{cls.__module__}.{cls.__qualname__}",
            **self.settings(),
            "k": k if self.iterative else None,
        }

    @abstractmethod
    def measure(
        self, model: PreTrainedModel, windows: torch.Tensor, k: int, batch_size: int = 8,
        progress: bool = False, resume: Sequence[dict[str, Any]] = (),
        on_step: StepSink | None = None,
    ) -> CriterionScores:  # fmt: skip
        """Measure ``model`` on ``windows`` (n, seq_len) for a plan removing ``k`` layers.

        An iterative criterion's measurement can take hours, so it can be stopped and resumed:
        it starts after the steps in ``resume`` (the first steps of an earlier measurement with
        the same model, windows and settings) and hands its steps so far to ``on_step`` after
        each one. A one-shot criterion measures in one step and takes neither."""

    def _check_budget(self, num_layers: int, k: int) -> None:
        if k > self.max_removable(num_layers):
            raise LayerpruneError(
                f"{self.name} removes at most {self.max_removable(num_layers)} of {num_layers} "
                f"layers ({self.protection()}); asked for {k}"
            )

    def _engine(
        self, model: PreTrainedModel, windows: torch.Tensor, k: int, batch_size: int
    ) -> SkipEngine:
        """The budget checked, then the engine of the loss-based criteria over ``windows``."""
        self._check_budget(decoder_stack(model).num_layers, k)
        return SkipEngine(model, windows, batch_size)


def _count(scorer: str, name: str, value: Any, low: int) -> int:
    """A whole-number setting of a criterion, checked: ``<scorer> <name>: <value>; allowed``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise LayerpruneError(f"{scorer} {name}: {value}; allowed: an integer >= {low}")
    return value


def _bar(total: int, desc: str, show: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="layer", disable=not show)


def ends(num_layers: int, first: int, last: int) -> list[int]:
    """The first ``first`` and the last ``last`` of ``num_layers`` layers, in order."""
    head = range(min(first, num_layers))
    tail = range(max(num_layers - last, 0), num_layers)
    return sorted(set(head) | set(tail))


class SLEB(ModelScorer):
    """SLEB: greedy removal of the layer whose absence raises the calibration NLL least.

    Its values are calibration perplexities without each layer: a removed layer's at the step
    that removed it, a kept layer's at the last step, the barrier layers' unmeasured (None)."""

    name = "sleb"
    iterative = True

    def __init__(
        self, early_barrier: int = 1, latter_barrier: int = 1,
        selection: Selection = "independent",
    ) -> None:  # fmt: skip
        super().__init__(selection)
        self.early_barrier = _count(self.name, "early_barrier", early_barrier, 0)
        self.latter_barrier = _count(self.name, "latter_barrier", latter_barrier, 0)

    def protected(self, num_layers: int) -> list[int]:
        """The first ``early_barrier`` layers are always the first remaining ones (and the
        last ``latter_barrier`` the last), so the barriers never let them go."""
        return ends(num_layers, self.early_barrier, self.latter_barrier)

    def protection(self) -> str:
        return (
            f"it never removes the first {self.early_barrier} or the last "
            f"{self.latter_barrier} remaining layer(s): scorer.early_barrier, "
            "scorer.latter_barrier"
        )

    def measure(
        self, model: PreTrainedModel, windows: torch.Tensor, k: int, batch_size: int = 8,
        progress: bool = False, resume: Sequence[dict[str, Any]] = (),
        on_step: StepSink | None = None,
    ) -> CriterionScores:  # fmt: skip
        engine = self._engine(model, windows, k, batch_size)
        num = engine.stack.num_layers
        dense_ppl = perplexity_of(engine.nll(), engine.n_tokens)
        steps = [dict(step) for step in resume[:k]]
        for step in steps:  # the current model of the last step taken, rebuilt
            removable = engine.kept[self.early_barrier : len(engine.kept) - self.latter_barrier]
            if step.get("removed") not in removable:
                raise LayerpruneError(
                    f"sleb cannot resume from its cached steps: {step.get('removed')} is not a "
                    "removable layer of this model (delete the criterion-steps cache folder)"
                )
            engine.remove(engine.kept.index(step["removed"]))
        barriers = self.early_barrier + self.latter_barrier
        total = sum(num - s - barriers for s in range(len(steps), k))
        with _bar(total, "sleb", progress) as bar:
            for _ in range(len(steps), k):
                alive = len(engine.kept)
                positions = range(self.early_barrier, alive - self.latter_barrier)
                nll = engine.nll_without(positions, bar.update)
                ppl = {p: perplexity_of(nll[p], engine.n_tokens) for p in positions}
                # The first position of least NLL wins, as in the official loop's strict '<'.
                best = min(positions, key=lambda p: float(nll[p].sum()))
                candidates = {str(engine.kept[p]): ppl[p] for p in positions}
                removed = engine.kept[best]
                steps.append({"removed": removed, "ppl": ppl[best], "candidates": candidates})
                engine.remove(best)
                if on_step is not None:
                    on_step(steps)
        return CriterionScores(
            criterion=self.name, key="sleb_ppl", label="calibration PPL without the layer (SLEB)",
            values=sleb_values(num, steps), order=[step["removed"] for step in steps],
            protected=self.protected(num), steps=steps, n_windows=engine.n_windows,
            n_tokens=engine.n_tokens, dense_ppl=dense_ppl,
        )  # fmt: skip


def sleb_values(num_layers: int, steps: Sequence[dict[str, Any]]) -> list[float | None]:
    """A kept layer's perplexity at the last step that measured it, a removed layer's at the
    step that removed it, a barrier layer's None."""
    values: list[float | None] = [None] * num_layers
    for step in steps:
        for layer, ppl in step["candidates"].items():
            values[int(layer)] = ppl
    for step in steps:
        values[step["removed"]] = step["ppl"]
    return values


class _KeepEnds(ModelScorer):
    """A one-shot criterion with Shortened LLaMA's heuristic: keep the first and last few."""

    def __init__(
        self, keep_first: int = 4, keep_last: int = 2, selection: Selection = "independent"
    ) -> None:
        super().__init__(selection)
        self.keep_first = _count(self.name, "keep_first", keep_first, 0)
        self.keep_last = _count(self.name, "keep_last", keep_last, 0)

    def protected(self, num_layers: int) -> list[int]:
        return ends(num_layers, self.keep_first, self.keep_last)

    def protection(self) -> str:
        return (
            f"it keeps the first {self.keep_first} and the last {self.keep_last} layers: "
            "scorer.keep_first, scorer.keep_last"
        )

    def _scores(self, values: Sequence[float], **extra: Any) -> CriterionScores:
        """Ascending order of the values (ties by index), protected layers left out."""
        protected = self.protected(len(values))
        order = sorted((i for i in range(len(values)) if i not in protected),
                       key=lambda i: (values[i], i))  # fmt: skip
        return CriterionScores(
            criterion=self.name, values=list(values), order=order, protected=protected, **extra
        )


class PPLCriterion(_KeepEnds):
    """Shortened LLaMA's PPL criterion: the calibration perplexity without each layer."""

    name = "ppl"

    def measure(
        self, model: PreTrainedModel, windows: torch.Tensor, k: int, batch_size: int = 8,
        progress: bool = False, resume: Sequence[dict[str, Any]] = (),
        on_step: StepSink | None = None,
    ) -> CriterionScores:  # fmt: skip
        engine = self._engine(model, windows, k, batch_size)
        num = engine.stack.num_layers
        with _bar(num, "ppl criterion", progress) as bar:
            nll = engine.nll_without(range(num), bar.update)
        values = [perplexity_of(nll[i], engine.n_tokens) for i in range(num)]
        return self._scores(
            values, key="ppl_without_layer", label="calibration PPL without the layer",
            n_windows=engine.n_windows, n_tokens=engine.n_tokens,
            dense_ppl=perplexity_of(engine.nll(), engine.n_tokens),
        )  # fmt: skip


class TaylorPlus(_KeepEnds):
    """Shortened LLaMA's Taylor+ criterion: first-order saliency of the layer's weights."""

    name = "taylor"
    skips_layers = False  # gradients of the whole model, no layer skipped

    def __init__(
        self, keep_first: int = 4, keep_last: int = 2, batch_size: int = 10,
        selection: Selection = "independent",
    ) -> None:  # fmt: skip
        super().__init__(keep_first, keep_last, selection)
        self.batch_size = _count(self.name, "batch_size", batch_size, 1)

    def measure(
        self, model: PreTrainedModel, windows: torch.Tensor, k: int, batch_size: int = 8,
        progress: bool = False, resume: Sequence[dict[str, Any]] = (),
        on_step: StepSink | None = None,
    ) -> CriterionScores:  # fmt: skip
        """``batch_size`` is unused: the batches define the loss, so the scorer's own
        ``batch_size`` sets them (the official code's, 10)."""
        stack = decoder_stack(model)
        self._check_budget(stack.num_layers, k)
        values = taylor_saliency(model, windows, self.batch_size)
        n = windows.shape[0]
        return self._scores(
            values, key="taylor_saliency", label="Taylor saliency sum |w dL/dw|",
            n_windows=n, n_tokens=windows.numel() - n,
        )  # fmt: skip


def taylor_saliency(model: PreTrainedModel, windows: torch.Tensor, batch_size: int) -> list[float]:
    """Per layer, the sum over its weights (every parameter named ``*weight*``, biases not,
    as the official code) of ``|sum over batches of w * dL_b/dw|``, L_b the mean next-token
    loss of batch b. Forward and backward run in the model's dtype; each batch's saliency
    ``w * dL_b/dw`` is added in float32 to a float32 buffer per weight, as the official code
    accumulates ``salience.data.clone().float()`` (the buffers take 4 bytes per scored weight).
    The model is left as it was: no gradients kept, ``requires_grad`` restored.
    """
    stack = decoder_stack(model)
    weights = [
        (i, p) for i, layer in enumerate(stack.layers)
        for name, p in layer.named_parameters() if "weight" in name
    ]  # fmt: skip
    flags = {p: p.requires_grad for p in model.parameters()}
    device = next(model.parameters()).device
    try:
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        for _, p in weights:
            p.requires_grad_(True)  # only the scored weights: no gradient for the embeddings
        saliency: list[torch.Tensor | None] = [None] * len(weights)
        with torch.enable_grad():
            for batch in windows.split(batch_size):
                batch = batch.to(device)
                logits = model(input_ids=batch, use_cache=False).logits[:, :-1]
                loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
                loss.backward()
                del logits, loss
                for j, (_, p) in enumerate(weights):
                    assert p.grad is not None
                    s = p.detach().float() * p.grad.float()
                    done = saliency[j]
                    saliency[j] = s if done is None else done.add_(s)
                    p.grad = None
        scores = [0.0] * stack.num_layers
        for (i, _), total in zip(weights, saliency, strict=True):
            assert total is not None
            scores[i] += float(total.abs().sum(dtype=torch.float64))
        return scores
    finally:
        for p, flag in flags.items():
            p.grad = None
            p.requires_grad_(flag)
