"""A faster lm-eval backend with the same answers: each shared token runs once.

lm-eval's ``HFLM`` runs every (context, continuation) pair as its own sequence, and computes the
LM head and log-softmax at every position, context included. A multiple-choice question with
four options therefore runs its context four times. :class:`SharedContextLM` changes only
``_loglikelihood_tokens``, where that happens:

* requests are packed as token trees: each request is the path context + continuation (all its
  tokens but the last) from a root, and a token shared by several paths (a context and its
  options; options starting with the same words; Winogrande's two contexts, equal up to the
  blank) is one node. A tree is one row; its mask lets each token see its ancestors only, and
  each token keeps its true position (its depth), so every request is computed exactly as if it
  ran alone;
* requests with the same context always share a row; contexts that share at least half of their
  tokens with the previous one (in sorted order) join its row while it stays within the budget;
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
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

from layerprune.lmhead import final_states, token_logprobs

Request = tuple[tuple[str, str], list[int], list[int]]


@dataclass
class Row:
    """Requests packed as one token tree (a forest: several roots are allowed).

    Nodes are numbered in insertion order, so a parent always comes before its children."""

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)  # -1 for a root
    depths: list[int] = field(default_factory=list)
    # (request index, the node predicting each continuation token, the continuation)
    scored: list[tuple[int, list[int], list[int]]] = field(default_factory=list)
    _children: dict[tuple[int, int], int] = field(default_factory=dict)  # (parent, token) -> node

    @property
    def length(self) -> int:
        return len(self.tokens)

    def new_nodes(self, sequence: list[int]) -> int:
        """How many nodes adding ``sequence`` as a path from a root would create."""
        node = -1
        for depth, token in enumerate(sequence):
            found = self._children.get((node, token))
            if found is None:
                return len(sequence) - depth
            node = found
        return 0

    def add(self, index: int, context: list[int], continuation: list[int]) -> None:
        """Request ``index``: its path, and the nodes whose next token it scores."""
        path, node = [], -1
        for depth, token in enumerate(context + continuation[:-1]):
            found = self._children.get((node, token))
            if found is None:
                found = len(self.tokens)
                self._children[(node, token)] = found
                self.tokens.append(token)
                self.parents.append(node)
                self.depths.append(depth)
            path.append(found)
            node = found
        n = len(context)
        self.scored.append((index, path[n - 1 : n - 1 + len(continuation)], continuation))

    def ancestors(self) -> torch.Tensor:
        """(length, length) boolean: entry [q, k] is whether node k is q or an ancestor of q."""
        seen = np.zeros((self.length, self.length), dtype=bool)
        for node, parent in enumerate(self.parents):
            if parent >= 0:
                seen[node] = seen[parent]
            seen[node, node] = True
        return torch.from_numpy(seen)


def _shared_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


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
        by_context: dict[tuple[int, ...], list[int]] = {}
        too_long = []
        for i, (_, context, continuation) in enumerate(requests):
            if not context or len(context) + len(continuation) > self.max_length + 1:
                too_long.append(i)
                continue
            by_context.setdefault(tuple(context), []).append(i)
        if too_long:
            left = [requests[i] for i in too_long]
            for i, answer in zip(too_long, super()._loglikelihood_tokens(left, True), strict=True):
                answers[i] = answer
        bar = tqdm(
            total=len(requests) - len(too_long),
            disable=disable_tqdm or self.rank != 0,
            desc="Running loglikelihood requests",
        )
        for batch in self._batches(self._rows(requests, by_context)):
            for index, answer in self._score_batch(batch):
                answers[index] = answer
            bar.update(sum(len(row.scored) for row in batch))
        bar.close()
        assert all(a is not None for a in answers)
        return answers  # type: ignore[return-value]

    def _rows(
        self, requests: list[Request], by_context: dict[tuple[int, ...], list[int]]
    ) -> list[Row]:
        """Token trees: the requests of one context together; a context sharing at least half
        of its tokens with the previous one (sorted) joins its row within the budget."""
        rows: list[Row] = []
        previous: list[int] = []
        for context in sorted(by_context):
            members = by_context[context]
            paths = [list(context) + requests[i][2][:-1] for i in members]
            row = rows[-1] if rows else None
            if (
                row is None
                or 2 * _shared_prefix(previous, list(context)) < len(context)
                or (row.length + sum(row.new_nodes(p) for p in paths) > self.batch_tokens)
            ):
                row = Row()
                rows.append(row)
            for i in members:
                row.add(i, list(context), requests[i][2])
            previous = list(context)
        return rows

    def _batches(self, rows: list[Row]) -> Iterator[list[Row]]:
        """Rows, longest first, batched while rows x longest fits the token budget."""
        batch: list[Row] = []
        for row in sorted(rows, key=lambda r: -r.length):
            if batch and (len(batch) + 1) * batch[0].length > self.batch_tokens:
                yield batch
                batch = []
            batch.append(row)
        if batch:
            yield batch

    def _mask(self, seen: torch.Tensor, position: torch.Tensor, window: int | None) -> Any:
        """The (batch, 1, P, P) attention mask from the trees' ancestry ``seen``, within
        ``window`` positions; a padding token sees itself, so no row of the mask is empty."""
        allowed = seen.clone()
        if window is not None:
            allowed &= position[:, :, None] - position[:, None, :] < window
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
    def _score_batch(self, batch: list[Row]) -> list[tuple[int, tuple[float, bool]]]:
        """(request index, (log-likelihood, greedy flag)) of every request in ``batch``."""
        width = batch[0].length
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        position = torch.zeros(len(batch), width, dtype=torch.long)
        seen = torch.eye(width, dtype=torch.bool).repeat(len(batch), 1, 1)  # padding: itself
        rows: list[int] = []  # per scored token: its row, the node predicting it, the target
        index: list[int] = []
        targets: list[int] = []
        owners: list[int] = []  # which request of the batch (numbered as in `members`) it is
        members: list[int] = []  # request indices
        for r, row in enumerate(batch):
            n = row.length
            ids[r, :n] = torch.tensor(row.tokens)
            position[r, :n] = torch.tensor(row.depths)
            seen[r, :n, :n] = row.ancestors()
            for request, nodes, continuation in row.scored:
                rows += [r] * len(nodes)
                index += nodes
                targets += continuation
                owners += [len(members)] * len(nodes)
                members.append(request)
        masks = {kind: self._mask(seen, position, w) for kind, w in self.windows.items()}
        with self._autocast():
            states = final_states(
                self.model,
                ids.to(self.device),
                attention_mask=masks if len(masks) > 1 else next(iter(masks.values())),
                position_ids=position.to(self.device),
            )
        with self._autocast():
            logp, greedy = token_logprobs(
                self.model,
                states[torch.tensor(rows), torch.tensor(index)],
                torch.tensor(targets).to(self.device),
                self.softmax_dtype,
            )
        which = torch.tensor(owners)
        ll = torch.zeros(len(members), dtype=torch.float64)
        ll.index_add_(0, which, logp.double().cpu())
        misses = torch.zeros(len(members), dtype=torch.long)
        misses.index_add_(0, which, (~greedy).long().cpu())
        return [
            (request, (float(a), not bool(m)))
            for request, a, m in zip(members, ll, misses, strict=True)
        ]
