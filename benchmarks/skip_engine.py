"""Time of SLEB's removal loop on the SkipEngine against the naive loops, on the same windows.

    python benchmarks/skip_engine.py --model smollm2_135m --n 1 --seq-len 256 --steps 1
    python benchmarks/skip_engine.py --shape llama2_7b --n 4 --seq-len 2048 --steps 2   # GPU

The naive loop prunes copies, as Shortened LLaMA's PPL code does for its one-shot measure
(there once per layer of the dense model), at every step of the removal loop: for every
candidate layer, prune a copy of the current model and run it whole (LM head included) over
the windows; then remove the best layer. The masked loop is SLEB's own code: no copy, the candidate
layer is switched off (passes its input through) and the model runs whole. The engine runs the
model once, keeps the residual states at the layer boundaries and, for a candidate, runs only
the layers after it; after a removal it recomputes only the states after the removed layer.
All three run ``--steps`` removals with SLEB's barriers (never the first or last remaining
layer), alternating (each repeat starting with another loop), ``--repeats`` times; their
choices are checked equal, and the figures are medians. ``--shape`` builds a random-init model
of a real architecture (times like the real weights).
"""

from __future__ import annotations

import copy
import statistics

import torch
from common import load, parser, windows
from torch import nn
from transformers import PreTrainedModel

from layerprune.criteria import SLEB
from layerprune.layers import decoder_stack
from layerprune.resources import measure
from layerprune.surgery import original_layer_indices, remove_layers


@torch.no_grad()
def total_nll(model: PreTrainedModel, ids: torch.Tensor, batch_size: int) -> float:
    """Summed -log p(x_t | x_<t), t >= 1, from the model's own forward."""
    total = 0.0
    device = next(model.parameters()).device
    for batch in ids.split(batch_size):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        logp = torch.log_softmax(logits, dim=-1)
        total -= float(logp.gather(-1, batch[:, 1:].unsqueeze(-1)).double().sum())
    return total


def naive_sleb(model: PreTrainedModel, ids: torch.Tensor, steps: int, batch_size: int) -> list[int]:
    """The naive loop: a pruned copy of the current model per candidate, run whole."""
    current = copy.deepcopy(model)
    order = []
    for _ in range(steps):
        alive = original_layer_indices(current)
        losses = {}
        for j in range(1, len(alive) - 1):
            candidate = copy.deepcopy(current)
            remove_layers(candidate, [j])
            losses[j] = total_nll(candidate, ids, batch_size)
            del candidate
        best = min(losses, key=losses.__getitem__)
        order.append(alive[best])
        remove_layers(current, [best])
    return order


class Off(nn.Module):
    """A decoder layer switched off: its input passes through (SLEB's ``turn_off``)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        if hasattr(layer, "attention_type"):
            self.attention_type = layer.attention_type

    def forward(self, hidden_states: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return hidden_states


def masked_sleb(
    model: PreTrainedModel, ids: torch.Tensor, steps: int, batch_size: int
) -> list[int]:
    """SLEB's loop: each candidate switched off in place, the whole model run."""
    layers = decoder_stack(model).layers
    alive = list(range(len(layers)))
    originals = list(layers)
    order = []
    try:
        for _ in range(steps):
            losses = {}
            for j in range(1, len(alive) - 1):
                layers[alive[j]] = Off(originals[alive[j]])
                losses[j] = total_nll(model, ids, batch_size)
                layers[alive[j]] = originals[alive[j]]
            best = min(losses, key=losses.__getitem__)
            order.append(alive.pop(best))
            layers[order[-1]] = Off(originals[order[-1]])
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    return order


def main() -> None:
    cli = parser(__doc__, n=2, seq_len=256)
    cli.add_argument("--steps", type=int, default=2, help="SLEB removals")
    args = cli.parse_args()

    loaded = load(args)
    model, device = loaded.model, next(loaded.model.parameters()).device
    ids = windows(loaded, args, "wikitext2_tokenized_valid.txt")
    num = decoder_stack(model).num_layers
    candidates = sum(num - 2 - s for s in range(args.steps))

    def engine() -> list[int]:
        return SLEB().measure(model, ids, args.steps, args.batch_size).order

    loops = {"naive loop": lambda: naive_sleb(model, ids, args.steps, args.batch_size),
             "masked loop": lambda: masked_sleb(model, ids, args.steps, args.batch_size),
             "SkipEngine": engine}  # fmt: skip
    times: dict[str, list[float]] = {label: [] for label in loops}
    peaks: dict[str, list[float]] = {label: [] for label in loops}
    choices = {}
    labels = list(loops)
    for repeat in range(args.repeats):
        # each repeat starts with another loop, so that a load drifting over time favours none
        for label in labels[repeat % 3 :] + labels[: repeat % 3]:
            order, seconds, peak = measure(loops[label], device)
            times[label].append(seconds)
            peaks[label].append(peak)
            choices[label] = order
    if len(set(map(tuple, choices.values()))) != 1:
        raise SystemExit(f"the loops chose differently: {choices}")

    name = args.shape or args.model
    print(
        f"{name} on {device}: SLEB, {args.steps} removal(s) of {num} layers = {candidates} "
        f"candidates, {args.n} windows x {args.seq_len} tokens, batch {args.batch_size}, "
        f"median of {args.repeats}"
    )
    print(f"  all chose {choices['SkipEngine']} (removal order, original indices)")
    medians = {label: statistics.median(t) for label, t in times.items()}
    for label, runs in times.items():
        print(
            f"  {label:11s} {medians[label]:8.2f} s  ({medians[label] / candidates:.3f} s a "
            f"candidate)  peak +{statistics.median(peaks[label]):.2f} GiB  "
            f"(times: {', '.join(f'{t:.2f}' for t in runs)})"
        )
    for reference in ("naive loop", "masked loop"):
        speedup = medians[reference] / medians["SkipEngine"]
        print(f"  speed-up of the SkipEngine over the {reference}: {speedup:.2f}x")


if __name__ == "__main__":
    main()
