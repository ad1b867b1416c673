"""What pruning buys in time: prefill and decode throughput of the pruned model against the
dense one, measured side by side in one process.

Machines drift (clocks, other work, caches), so the two models are timed alternately, dense
then pruned, in every repeat, and each side's median is reported: a drift that lasts longer
than a repeat touches both alike, and the ratio is what a table should quote.
"""

from __future__ import annotations

import inspect
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import torch
from transformers import PreTrainedModel

from layerprune.errors import LayerpruneError


@dataclass(frozen=True)
class SpeedSettings:
    """``batch_size`` prompts of ``prompt_tokens`` random tokens; decode generates
    ``new_tokens`` more greedily with the KV cache; ``repeats`` alternating timings per side
    (after one warm-up each)."""

    enabled: bool = False
    batch_size: int = 1
    prompt_tokens: int = 256
    new_tokens: int = 32
    repeats: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("batch_size", "prompt_tokens", "new_tokens", "repeats"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise LayerpruneError(f"speed.{name}: {value}; allowed: an integer >= 1")


def prompt(model: PreTrainedModel, settings: SpeedSettings) -> torch.Tensor:
    """Seeded random token ids in the model's vocabulary: timing does not depend on content."""
    generator = torch.Generator().manual_seed(settings.seed)
    shape = (settings.batch_size, settings.prompt_tokens)
    ids = torch.randint(0, model.config.vocab_size, shape, generator=generator)
    return ids.to(next(model.parameters()).device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def prefill(model: PreTrainedModel, ids: torch.Tensor) -> float:
    """Seconds of one forward of the prompts, without the KV cache."""
    _sync(ids.device)
    start = time.perf_counter()
    model(input_ids=ids, use_cache=False)
    _sync(ids.device)
    return time.perf_counter() - start


def cache_keyword(model: PreTrainedModel) -> str:
    """The name of the KV cache, as the forward's argument and as its output's field:
    transformers 5 names it ``cache`` (and logs a deprecation on the older
    ``past_key_values``, either way), 4.x ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def decode(model: PreTrainedModel, ids: torch.Tensor, new_tokens: int) -> float:
    """Seconds of ``new_tokens`` greedy steps of one token each with the KV cache, after the
    prompt's prefill (not counted)."""
    keyword = cache_keyword(model)
    out = model(input_ids=ids, use_cache=True)
    cache, token = getattr(out, keyword), out.logits[:, -1:].argmax(-1)
    _sync(ids.device)
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=token, use_cache=True, **{keyword: cache})
        cache, token = getattr(out, keyword), out.logits[:, -1:].argmax(-1)
    _sync(ids.device)
    return time.perf_counter() - start


def alternate(timings: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Each timing once to warm up, then ``repeats`` rounds of all of them in turn."""
    for fn in timings.values():
        fn()
    out: dict[str, list[float]] = {name: [] for name in timings}
    for _ in range(repeats):
        for name, fn in timings.items():
            out[name].append(fn())
    return out


def compare_speed(
    dense: PreTrainedModel, pruned: PreTrainedModel, settings: SpeedSettings
) -> dict[str, Any]:
    """Median prefill and decode tokens/s of both models and the pruned model's speed-up
    (its tokens/s over the dense model's), timed alternately on the same prompts.

    Give two models whose weights were made the same way (two deep copies, say): weights as
    loaded from a checkpoint can sit in memory that reads slower than a copy's (SmolLM2-135M on
    a 2-core CPU decoded 6% and, another time, 19% slower as loaded than copied), which would
    bias the ratio."""
    ids = prompt(dense, settings)
    models = {"dense": dense, "pruned": pruned}
    timings: dict[str, Callable[[], float]] = {}
    for side, model in models.items():
        timings[f"prefill_{side}"] = partial(prefill, model, ids)
        timings[f"decode_{side}"] = partial(decode, model, ids, settings.new_tokens)
    seconds = alternate(timings, settings.repeats)
    tokens = {"prefill": ids.numel(), "decode": settings.batch_size * settings.new_tokens}
    record: dict[str, Any] = {"settings": asdict(settings)}
    for phase, n in tokens.items():
        rates = {side: n / statistics.median(seconds[f"{phase}_{side}"]) for side in models}
        record[phase] = {
            "dense_tokens_per_s": rates["dense"],
            "pruned_tokens_per_s": rates["pruned"],
            "speedup": rates["pruned"] / rates["dense"],
            "seconds": {side: seconds[f"{phase}_{side}"] for side in models},
        }
    return record
