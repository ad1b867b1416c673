"""A faster lm-eval backend with the same answers: each distinct context runs once.

lm-eval's ``HFLM`` runs every (context, continuation) pair as its own sequence, and computes the
LM head and log-softmax at every position, context included. A multiple-choice question with
four options therefore runs its context four times. :class:`SharedContextLM` changes only
``_loglikelihood_tokens``, where that happens:

* requests are grouped by context; a context runs once, keeping its KV cache, and the LM head
  is applied only at its last position (which predicts each continuation's first token);
* the group's continuations (all but their last token) then run together as one batch on top
  of that cache, right-padded, and the LM head is applied only at their positions;
* a request longer than the model's window, which ``HFLM`` truncates from the left, is left to
  ``HFLM`` itself, so truncation stays exactly lm-eval's.

Everything else (prompts, filters, metrics, ``loglikelihood_rolling``, ``generate_until``) is
``HFLM``'s. The per-request log-likelihoods equal ``HFLM``'s to float rounding (the tests hold
them to 1e-4 in fp32, with identical greedy flags).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

Request = tuple[tuple[str, str], list[int], list[int]]


class SharedContextLM(HFLM):
    """``HFLM`` whose log-likelihoods run each distinct context once (see the module)."""

    def _loglikelihood_tokens(
        self,
        requests: list[Request],
        disable_tqdm: bool = False,
        override_bs: int | None = None,
    ) -> list[tuple[float, bool]]:
        answers: list[tuple[float, bool] | None] = [None] * len(requests)
        groups: dict[tuple[int, ...], list[int]] = {}
        too_long = []
        for i, (_, context, continuation) in enumerate(requests):
            if not context or len(context) + len(continuation) > self.max_length + 1:
                too_long.append(i)
            else:
                groups.setdefault(tuple(context), []).append(i)
        if too_long:
            left = [requests[i] for i in too_long]
            for i, answer in zip(too_long, super()._loglikelihood_tokens(left, True), strict=True):
                answers[i] = answer
        bar = tqdm(
            total=len(requests) - len(too_long),
            disable=disable_tqdm or self.rank != 0,
            desc="Running loglikelihood requests",
        )
        for shared, members in sorted(groups.items(), key=lambda item: -len(item[0])):
            continuations = [requests[i][2] for i in members]
            for i, answer in zip(members, self._score(list(shared), continuations), strict=True):
                answers[i] = answer
            bar.update(len(members))
        bar.close()
        assert all(a is not None for a in answers)
        return answers  # type: ignore[return-value]

    def _forward(self, **kwargs: Any) -> Any:
        with torch.autocast(
            device_type=self.device.type,
            dtype=self.mixed_precision_dtype,
            enabled=self.mixed_precision_dtype is not None,
        ):
            return self.model(**kwargs)

    @torch.no_grad()
    def _score(
        self, context: list[int], continuations: list[list[int]]
    ) -> list[tuple[float, bool]]:
        """Log-likelihood and greedy flag of each continuation after ``context``."""
        out = self._forward(
            input_ids=torch.tensor([context], device=self.device), use_cache=True, logits_to_keep=1
        )
        first = F.log_softmax(out.logits[0, -1], dim=-1, dtype=self.softmax_dtype)  # (V,)
        longest = max(len(c) for c in continuations)
        rest = None
        if longest > 1:  # the continuations' own tokens, all but the last, on the shared cache
            cache = out.past_key_values
            cache.batch_repeat_interleave(len(continuations))
            width = longest - 1
            body = torch.tensor(
                [c[:-1] + [c[0]] * (width - len(c) + 1) for c in continuations], device=self.device
            )
            mask = torch.zeros(len(continuations), len(context) + width, dtype=torch.long)
            mask[:, : len(context)] = 1
            for row, c in enumerate(continuations):
                mask[row, len(context) : len(context) + len(c) - 1] = 1
            logits = self._forward(
                input_ids=body,
                attention_mask=mask.to(self.device),
                past_key_values=cache,
                use_cache=True,
            ).logits
            rest = F.log_softmax(logits, dim=-1, dtype=self.softmax_dtype)  # (k, width, V)
        answers = []
        for row, c in enumerate(continuations):
            steps = [first] + (
                [rest[row, t] for t in range(len(c) - 1)] if rest is not None else []
            )
            logp = torch.stack(steps[: len(c)])  # (len(c), V): row t predicts c[t]
            target = torch.tensor(c, device=logp.device)
            ll = float(logp.gather(1, target[:, None]).sum())
            answers.append((ll, bool((logp.argmax(-1) == target).all())))
        return answers
