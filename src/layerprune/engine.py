"""The calibration loss of a model without one of its layers, for every layer, cheaply.

Loss-based criteria (SLEB, Shortened LLaMA's PPL) ask, for each layer i of the current model,
what the calibration loss would be without it. Pruning a copy and running the whole model for
every candidate repeats work: the residual stream entering layer i does not depend on layer i.
:class:`SkipEngine` runs the model once and keeps the residual states at every layer boundary
(h_0 .. h_m of the current m layers); "without layer i" feeds h_i to layer i+1 and runs only
the layers after i, then the final norm and the LM head. The candidates run together: at each
layer, the states of every candidate that has reached it go through in chunks of
``batch_size`` rows, so that one call can hold rows of several candidates. After a removal
(SLEB), the states before the removed layer stay as they are and only those after it are
recomputed.

Each layer is called as the model's own forward calls it: the other arguments (attention mask,
rotary embeddings, position ids) are captured from a forward of two windows (the first two; the
one window twice where there is one, and three rows where the windows are two tokens long, so
that a row count is never mistaken for a token count). Calibration windows have no padding, so
these depend on the positions only and are the same for every row; they are kept for one row
and expanded to any number of rows. That they are the same for every row (tensors of one entry
per row, and of one row each) is checked when they are captured: a model whose layers take
inputs computed from the tokens (per-layer embeddings) cannot be evaluated this way and is
refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from layerprune.errors import LayerpruneError
from layerprune.layers import DecoderStack, decoder_stack
from layerprune.lmhead import token_logprobs
from layerprune.scoring import capture_residuals

HEAD_TOKENS = 4096  # tokens per LM-head call: bounds the (tokens x vocabulary) logits in memory
STATE_BYTES = 2 << 30  # the running states of one group of candidates stay below this


class UnsupportedLayers(LayerpruneError):
    """The model's layers cannot be run one by one from cached states."""


@dataclass(frozen=True)
class _PerRow:
    """A captured argument that has one (identical) row per window: kept for one row."""

    row: torch.Tensor

    def expand(self, rows: int) -> torch.Tensor:
        return self.row.expand(rows, *self.row.shape[1:])


def _reduce(value: Any, rows: int, where: str, tokens: int = 0) -> Any:
    """``value`` with every per-row tensor replaced by its first row (checked identical): a
    tensor of two or more dimensions whose first is ``rows``, or of one dimension of ``rows``
    entries (unless ``rows`` equals ``tokens``, where it may be one entry per token)."""
    if (
        isinstance(value, torch.Tensor)
        and value.ndim >= 1
        and value.shape[0] == rows
        and (value.ndim >= 2 or rows != tokens)
    ):
        first = value[:1]
        if not torch.equal(value, first.expand_as(value)):
            raise UnsupportedLayers(
                f"the decoder layers take an input ({where}) that differs between windows"
            )
        return _PerRow(first)
    if isinstance(value, (tuple, list)):
        return type(value)(_reduce(v, rows, where, tokens) for v in value)
    if isinstance(value, dict):
        return {k: _reduce(v, rows, f"{where}.{k}", tokens) for k, v in value.items()}
    return value


def probe_rows(windows: torch.Tensor) -> torch.Tensor:
    """Two rows of ``windows`` to capture the layer calls from (the first two, or the one
    twice), three where the windows are two tokens long: never as many rows as tokens."""
    count = 3 if windows.shape[1] == 2 else 2
    return windows[[min(i, windows.shape[0] - 1) for i in range(count)]]


def _expand(value: Any, rows: int) -> Any:
    if isinstance(value, _PerRow):
        return value.expand(rows)
    if isinstance(value, (tuple, list)):
        return type(value)(_expand(v, rows) for v in value)
    if isinstance(value, dict):
        return {k: _expand(v, rows) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class LayerCall:
    """How the model's forward calls one decoder layer, less the hidden states."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    def __call__(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        rows = hidden.shape[0]
        out = layer(hidden, *_expand(self.args, rows), **_expand(self.kwargs, rows))
        return out[0] if isinstance(out, tuple) else out


@contextmanager
def capture_calls(stack: DecoderStack) -> Iterator[list[LayerCall]]:
    """Yield a list that the next forward fills with every layer's :class:`LayerCall`."""
    calls: list[LayerCall] = []

    def record(index: int) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if len(calls) != index:
                return  # only the first forward is recorded
            hidden = args[0] if args else kwargs.get("hidden_states")
            if not isinstance(hidden, torch.Tensor) or hidden.ndim != 3:
                raise UnsupportedLayers(
                    "the decoder layers do not take the residual stream as one "
                    "(batch, tokens, hidden) tensor"
                )
            rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            rows, tokens = hidden.shape[:2]
            calls.append(LayerCall(
                _reduce(tuple(args[1:]), rows, "args", tokens),
                _reduce(rest, rows, "kwargs", tokens),
            ))  # fmt: skip

        return hook

    handles = [
        layer.register_forward_pre_hook(record(i), with_kwargs=True)
        for i, layer in enumerate(stack.layers)
    ]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def window_nll(stack: DecoderStack, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per row, the summed NLL of tokens 1.. of ``ids`` given the last layer's output.

    The arithmetic of :func:`layerprune.perplexity.perplexity`, whose LM head and log-softmax
    it shares (:func:`~layerprune.lmhead.token_logprobs`): logits in the model's dtype,
    log-softmax in float32, sums in float64."""
    rows = max(1, HEAD_TOKENS // ids.shape[1])
    sums = []
    for h, x in zip(hidden.split(rows), ids.split(rows), strict=True):
        states = stack.final_states(h[:, :-1])
        targets = x[:, 1:]
        logp, _ = token_logprobs(stack.model, states.flatten(0, 1), targets.flatten())
        sums.append(-logp.view(targets.shape).double().sum(1))
    return torch.cat(sums)


class SkipEngine:
    """Calibration NLL of the current model and of the current model without one layer.

    The current model starts as the whole model; :meth:`remove` drops a layer from it (the
    model itself is never changed). ``kept`` holds the original indices of its layers and
    ``states[p]`` the residual stream entering its layer p (``states[-1]``: leaving the last).
    """

    def __init__(self, model: PreTrainedModel, windows: torch.Tensor, batch_size: int = 8):
        if windows.ndim != 2 or windows.shape[1] < 2:
            raise LayerpruneError(f"windows must be (n, seq_len >= 2); got {tuple(windows.shape)}")
        self.stack = decoder_stack(model)
        self.batch_size = batch_size
        self.ids = windows.to(next(model.parameters()).device)
        self.kept = list(range(self.stack.num_layers))
        self.layers: list[nn.Module] = list(self.stack.layers)
        self.calls, self.states = self._first_pass()

    @property
    def n_windows(self) -> int:
        return self.ids.shape[0]

    @property
    def n_tokens(self) -> int:
        """Tokens scored: all but the first of each window."""
        return self.ids.numel() - self.n_windows

    @torch.no_grad()
    def _first_pass(self) -> tuple[list[LayerCall], list[torch.Tensor]]:
        with capture_calls(self.stack) as calls:
            self.stack.base(input_ids=probe_rows(self.ids), use_cache=False)
        chunks: list[list[torch.Tensor]] = []
        with capture_residuals(self.stack.model, "residual") as states:
            for batch in self.ids.split(self.batch_size):
                states.clear()
                self.stack.base(input_ids=batch, use_cache=False)
                chunks.append(list(states))
        return calls, [torch.cat(parts) for parts in zip(*chunks, strict=True)]

    def _run(self, position: int, hidden: torch.Tensor) -> torch.Tensor:
        """The current model's layer ``position`` on ``hidden``, ``batch_size`` rows a call."""
        layer, call = self.layers[position], self.calls[self.kept[position]]
        return torch.cat([call(layer, part) for part in hidden.split(self.batch_size)])

    def _targets(self, copies: int) -> torch.Tensor:
        return self.ids.repeat(copies, 1)

    @torch.no_grad()
    def nll(self) -> torch.Tensor:
        """(n,) summed NLL of each window under the current model."""
        return window_nll(self.stack, self.states[-1], self.ids)

    @torch.no_grad()
    def nll_without(
        self, positions: Sequence[int], progress: Callable[[int], None] | None = None
    ) -> dict[int, torch.Tensor]:
        """For each position p of the current model, (n,) summed NLL of each window when layer
        p is left out. ``progress`` is called with the number of candidates done."""
        todo = sorted(set(positions))
        if any(not 0 <= p < len(self.kept) for p in todo):
            raise LayerpruneError(f"positions {todo} out of range for {len(self.kept)} layers")
        per_candidate = self.states[0].numel() * self.states[0].element_size()
        group = max(1, STATE_BYTES // max(1, per_candidate))
        result: dict[int, torch.Tensor] = {}
        for start in range(0, len(todo), group):
            chunk = todo[start : start + group]
            nll = self._sweep(chunk)
            result.update(zip(chunk, nll.view(len(chunk), self.n_windows), strict=True))
            if progress is not None:
                progress(len(chunk))
        return result

    def _sweep(self, candidates: list[int]) -> torch.Tensor:
        """One pass from the first candidate to the end: candidate p joins the running rows
        with h_p just before layer p+1 (it skips layer p), in the order of ``candidates``."""
        running: torch.Tensor | None = None
        waiting = list(candidates)
        for q in range(candidates[0] + 1, len(self.kept) + 1):
            if waiting and waiting[0] == q - 1:
                joined = self.states[waiting.pop(0)]
                running = joined if running is None else torch.cat([running, joined])
            if q < len(self.kept) and running is not None:
                running = self._run(q, running)
        assert running is not None and not waiting
        return window_nll(self.stack, running, self._targets(len(candidates)))

    @torch.no_grad()
    def final_without(self, removed: Collection[int]) -> torch.Tensor:
        """(n, seq_len, hidden) residual stream leaving the last layer when the current layers
        at positions ``removed`` are left out: the run starts at the first of them."""
        drop = sorted(set(removed))
        if not drop:
            return self.states[-1]
        if drop[0] < 0 or drop[-1] >= len(self.kept) or len(drop) == len(self.kept):
            raise LayerpruneError(f"cannot leave out {drop} of {len(self.kept)} layers")
        hidden = self.states[drop[0]]
        for q in range(drop[0] + 1, len(self.kept)):
            if q not in drop:
                hidden = self._run(q, hidden)
        return hidden

    @torch.no_grad()
    def divergence(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per window, summed over its predicted tokens: KL(current model || the model whose
        last layer leaves ``hidden``) of the next-token distributions, and that model's NLL."""
        rows = max(1, HEAD_TOKENS // self.ids.shape[1])
        kls, nlls = [], []
        parts = zip(
            self.states[-1].split(rows), hidden.split(rows), self.ids.split(rows), strict=True
        )
        for ref, h, x in parts:
            p = torch.log_softmax(self.stack.logits(ref[:, :-1]).float(), dim=-1)
            q = torch.log_softmax(self.stack.logits(h[:, :-1]).float(), dim=-1)
            prob = p.exp()  # a token of probability 0 adds 0, even where q is -inf too
            kl = torch.where(prob > 0, prob * (p - q), torch.zeros((), device=prob.device))
            kls.append(kl.sum(-1).double().sum(1))
            nlls.append(-q.gather(-1, x[:, 1:].unsqueeze(-1)).double().sum(dim=(1, 2)))
        return torch.cat(kls), torch.cat(nlls)

    @torch.no_grad()
    def remove(self, position: int) -> None:
        """Drop the current layer ``position``: the states up to it stay, the later ones are
        recomputed through the remaining layers."""
        if not 0 <= position < len(self.kept) or len(self.kept) < 2:
            raise LayerpruneError(f"cannot remove position {position} of {len(self.kept)} layers")
        del self.kept[position], self.layers[position], self.states[position + 1]
        for p in range(position, len(self.kept)):
            self.states[p + 1] = self._run(p, self.states[p])


def perplexity_of(nll: torch.Tensor, n_tokens: int) -> float:
    """exp(mean NLL per scored token) of summed window NLLs."""
    return math.exp(float(nll.sum()) / n_tokens)
