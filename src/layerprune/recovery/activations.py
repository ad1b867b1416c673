"""The residual states around a block, streamed one batch at a time from the frozen model.

Each batch runs the dense model without grad only as far as the block's last layer: a forward
hook there raises :class:`_StopForward`, so the layers after the block (and the LM head) never
run, and nothing outlives the batch: peak memory does not grow with the number of windows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from transformers import PreTrainedModel

from layerprune.errors import LayerpruneError
from layerprune.layers import decoder_stack
from layerprune.scoring import layer_input


class _StopForward(Exception):
    """Raised after the block's last layer: the rest of the forward is not needed."""


@dataclass
class BlockBatch:
    """One batch of residual states around layers ``[start, start + size)``."""

    input_ids: torch.Tensor
    h_in: torch.Tensor  # entering layer ``start``
    h_out: torch.Tensor  # leaving layer ``start + size - 1``, before the final norm
    # What layer ``start`` is called with besides the hidden states (masks, rotary, ...).
    layer_kwargs: dict[str, Any]
    taps: dict[str, torch.Tensor] = field(default_factory=dict)


def contiguous_block(removed: list[int], step: str = "replacement") -> tuple[int, int]:
    """``(start, size)`` of a contiguous block of layer indices."""
    drop = sorted(set(removed))
    if not drop or drop != list(range(drop[0], drop[-1] + 1)):
        raise LayerpruneError(f"recovery '{step}' needs a contiguous block; got layers {drop}")
    return drop[0], len(drop)


def check_block(model: PreTrainedModel, start: int, size: int, step: str) -> None:
    num = decoder_stack(model).num_layers
    if size < 1 or start < 0 or start + size > num:
        raise LayerpruneError(
            f"recovery '{step}': block [{start}, {start + size}) is out of range; the model has "
            f"{num} layers, so allowed blocks satisfy 0 <= start, size >= 1, start + size <= {num}"
        )


def _output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def block_batch(
    model: PreTrainedModel,
    start: int,
    size: int,
    ids: torch.Tensor,
    taps: Mapping[str, nn.Module] | None = None,
) -> BlockBatch:
    """One no-grad forward of ``ids`` up to the block's last layer; ``taps`` adds module outputs."""
    stack = decoder_stack(model)
    seen: dict[str, Any] = {}

    def on_input(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen["h_in"] = layer_input(args, kwargs)
        seen["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}

    def on_tap(name: str) -> Any:
        return lambda _m, _a, output: seen.__setitem__(name, _output(output))

    def on_end(_m: nn.Module, _args: Any, output: Any) -> None:
        seen["h_out"] = _output(output)
        raise _StopForward

    tapped = dict(taps or {})
    # Hooks live for one forward only, so an abandoned iterator leaves none behind.
    handles = [stack.layers[start].register_forward_pre_hook(on_input, with_kwargs=True)]
    handles += [module.register_forward_hook(on_tap(name)) for name, module in tapped.items()]
    # Registered last so that taps on the block's last layer fire before the stop.
    handles.append(stack.layers[start + size - 1].register_forward_hook(on_end))
    try:
        with contextlib.suppress(_StopForward):
            stack.base(input_ids=ids.to(next(model.parameters()).device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return BlockBatch(
        ids, seen["h_in"], seen["h_out"], seen["kwargs"], {n: seen[n] for n in tapped}
    )


def stream_block(
    model: PreTrainedModel,
    start: int,
    size: int,
    windows: torch.Tensor,
    batch_size: int,
    taps: Mapping[str, nn.Module] | None = None,
) -> Iterator[BlockBatch]:
    """Yield a :class:`BlockBatch` per batch of ``windows``; ``taps`` adds module outputs."""
    for batch in windows.split(batch_size):
        yield block_batch(model, start, size, batch, taps)


class BlockStates(Protocol):
    """The states around one block for a fixed set of windows, batch by batch: streamed from
    the model, or read from an activation cache (:mod:`layerprune.recovery.cache`)."""

    @property
    def windows(self) -> torch.Tensor: ...

    def batch(self, index: torch.Tensor) -> BlockBatch:
        """The states of ``windows[index]``."""
        ...


@dataclass
class Streamed:
    """:class:`BlockStates` computed by a forward of the frozen model for every batch."""

    model: PreTrainedModel
    start: int
    size: int
    windows: torch.Tensor
    taps: Mapping[str, nn.Module] | None = None

    def batch(self, index: torch.Tensor) -> BlockBatch:
        return block_batch(self.model, self.start, self.size, self.windows[index], self.taps)


def in_order(states: BlockStates, batch_size: int) -> Iterator[BlockBatch]:
    """Every window once, in order, ``batch_size`` at a time."""
    for index in torch.arange(len(states.windows)).split(batch_size):
        yield states.batch(index)
