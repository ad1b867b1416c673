"""A faster lm-eval backend with the same answers: each distinct context runs once.

lm-eval's ``HFLM`` runs every (context, continuation) pair as its own sequence, and computes the
LM head and log-softmax at every position, context included. A multiple-choice question with
four options therefore runs its context four times. :class:`SharedContextLM` changes only
``_loglikelihood_tokens``, where that happens:

* requests are grouped by context, and each group is packed into ONE row: the context, then
  every continuation (all its tokens but the last) one after another. A block-causal mask lets
  each continuation see the context and its own earlier tokens only, and each token keeps its
  true position, so every continuation is computed exactly as if it ran alone after the context;
* rows are batched by a token budget, longest first (so right padding wastes little), one
  forward per batch, no KV cache;
* the LM head and log-softmax run only at the positions whose next token is scored, in chunks,
  so no (batch, length, vocab) tensor is ever built;
* a request longer than the model's window, which ``HFLM`` truncates from the left, is left to
  ``HFLM`` itself, so truncation stays exactly lm-eval's. Sliding-window layers get their own
  mask, built from the true positions.

Everything else (prompts, filters, metrics, ``loglikelihood_rolling``, ``generate_until``) is
``HFLM``'s. The per-request log-likelihoods equal ``HFLM``'s to float rounding (the tests hold
them to 1e-4 in fp32, with identical greedy flags).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

from layerprune.lmhead import final_states, token_logprobs

Request = tuple[tuple[str, str], list[int], list[int]]


@dataclass
class Group:
    """One distinct context and the requests (by index) that continue it."""

    context: list[int]
    members: list[int]
    continuations: list[list[int]]

    @property
    def length(self) -> int:
        """Tokens in the packed row: the context, then each continuation but its last token."""
        return len(self.context) + sum(len(c) - 1 for c in self.continuations)


class SharedContextLM(HFLM):
    """``HFLM`` whose log-likelihoods run each distinct context once (see the module)."""

    def __init__(self, *args: Any, batch_tokens: int = 1024, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batch_tokens = batch_tokens  # padded tokens per forward
        config = self.model.config.get_text_config()
        window: int | None = getattr(config, "sliding_window", None)
        # attention kinds, each with its mask: `layer_types` where the model declares them, else
        # one kind for every layer (sliding where a window is set, as Mistral's)
        kinds = set(getattr(config, "layer_types", None) or [])
        if not kinds:
            kinds = {"sliding_attention" if window else "full_attention"}
        self.windows = {k: (window if k == "sliding_attention" else None) for k in kinds}

    def _loglikelihood_tokens(
        self,
        requests: list[Request],
        disable_tqdm: bool = False,
        override_bs: int | None = None,
    ) -> list[tuple[float, bool]]:
        answers: list[tuple[float, bool] | None] = [None] * len(requests)
        groups: dict[tuple[int, ...], Group] = {}
        too_long = []
        for i, (_, context, continuation) in enumerate(requests):
            if not context or len(context) + len(continuation) > self.max_length + 1:
                too_long.append(i)
                continue
            group = groups.setdefault(tuple(context), Group(list(context), [], []))
            group.members.append(i)
            group.continuations.append(list(continuation))
        if too_long:
            left = [requests[i] for i in too_long]
            for i, answer in zip(too_long, super()._loglikelihood_tokens(left, True), strict=True):
                answers[i] = answer
        bar = tqdm(
            total=len(requests) - len(too_long),
            disable=disable_tqdm or self.rank != 0,
            desc="Running loglikelihood requests",
        )
        for batch in self._batches(list(groups.values())):
            for group, scored in zip(batch, self._score_batch(batch), strict=True):
                for i, answer in zip(group.members, scored, strict=True):
                    answers[i] = answer
                bar.update(len(group.members))
        bar.close()
        assert all(a is not None for a in answers)
        return answers  # type: ignore[return-value]

    def _batches(self, groups: list[Group]) -> Iterator[list[Group]]:
        """Packed rows, longest first, batched while rows x longest fits the token budget."""
        batch: list[Group] = []
        for group in sorted(groups, key=lambda g: -g.length):
            if batch and (len(batch) + 1) * batch[0].length > self.batch_tokens:
                yield batch
                batch = []
            batch.append(group)
        if batch:
            yield batch

    def _mask(self, segment: torch.Tensor, position: torch.Tensor, window: int | None) -> Any:
        """The (batch, 1, P, P) attention mask: a token sees earlier tokens of its own segment
        and of the context (segment 0), within ``window`` positions; padding (segment -1) sees
        only padding, so no row is empty."""
        seg_q, seg_k = segment[:, :, None], segment[:, None, :]
        pos_q, pos_k = position[:, :, None], position[:, None, :]
        allowed = (pos_k <= pos_q) & ((seg_k == 0) | (seg_k == seg_q))
        if window is not None:
            allowed &= pos_q - pos_k < window
        if self.model.config._attn_implementation == "sdpa":  # boolean, as transformers builds
            return allowed[:, None].to(self.device)
        dtype = self.model.dtype  # additive, for eager attention
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
        return mask[:, None].to(self.device)

    def _autocast(self) -> Any:
        return torch.autocast(
            device_type=self.device.type,
            dtype=self.mixed_precision_dtype,
            enabled=self.mixed_precision_dtype is not None,
        )

    @torch.no_grad()
    def _score_batch(self, batch: list[Group]) -> list[list[tuple[float, bool]]]:
        """Log-likelihood and greedy flag of every continuation of every group in ``batch``."""
        width = batch[0].length
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        segment = torch.full((len(batch), width), -1, dtype=torch.long)
        position = torch.zeros(len(batch), width, dtype=torch.long)
        scored: list[tuple[int, int, int]] = []  # (row, index predicting it, target token)
        owners: list[int] = []  # which continuation (numbered over the batch) each one is
        conts = 0
        for row, g in enumerate(batch):
            n = len(g.context)
            ids[row, :n] = torch.tensor(g.context)
            segment[row, :n] = 0
            position[row, :n] = torch.arange(n)
            start = n
            for c in g.continuations:
                k = len(c) - 1
                ids[row, start : start + k] = torch.tensor(c[:-1], dtype=torch.long)
                segment[row, start : start + k] = conts + 1  # its own segment
                position[row, start : start + k] = n + torch.arange(k)
                predicted_at = [n - 1, *range(start, start + k)]  # one index per token of c
                scored += [(row, i, t) for i, t in zip(predicted_at, c, strict=True)]
                owners += [conts] * len(c)
                conts += 1
                start += k
        masks = {kind: self._mask(segment, position, w) for kind, w in self.windows.items()}
        with self._autocast():
            states = final_states(
                self.model,
                ids.to(self.device),
                attention_mask=masks if len(masks) > 1 else next(iter(masks.values())),
                position_ids=position.to(self.device),
            )
        rows, index, targets = (torch.tensor(x) for x in zip(*scored, strict=True))
        with self._autocast():
            logp, greedy = token_logprobs(
                self.model, states[rows, index], targets.to(self.device), self.softmax_dtype
            )
        which = torch.tensor(owners)
        ll = torch.zeros(conts, dtype=torch.float64).index_add_(0, which, logp.double().cpu())
        misses = torch.zeros(conts, dtype=torch.long).index_add_(0, which, (~greedy).long().cpu())
        flat = [(float(a), not bool(m)) for a, m in zip(ll, misses, strict=True)]
        out, first = [], 0
        for g in batch:
            out.append(flat[first : first + len(g.continuations)])
            first += len(g.continuations)
        return out
