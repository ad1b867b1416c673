"""Perplexity of a text, every token scored exactly once.

The text is read as calibration reads it: ``<doc>`` wrappers are stripped and the documents,
tokenised separately, are joined by EOS (between documents, not after the last), so a plain
file such as wikitext is one token stream exactly as the standard evaluation tokenises it.

The stream is cut into windows of ``seq_len`` tokens. Without ``stride`` they do not overlap
and each window's first token is context only. With ``stride`` they slide as in the Hugging
Face guide: each starts ``stride`` tokens after the previous one and, after the first, scores
only the tokens no earlier window scored, each with at least ``seq_len - stride`` of context.
When ``add_bos`` and the tokenizer has a BOS, every window is BOS + ``seq_len - 1`` stream
tokens and its first token is scored given BOS (Gemma's perplexity doubles without BOS).

Each window's summed NLL and token count are kept, so that the uncertainty of the perplexity can
be estimated by resampling windows (:func:`perplexity_ci`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from layerprune.calibration import split_documents, token_stream
from layerprune.errors import LayerpruneError
from layerprune.lmhead import final_states, token_logprobs
from layerprune.stats import ITERS, percentile_ci, resample_means


@dataclass
class PerplexityResult:
    ppl: float  # exp(nll)
    nll: float  # mean negative log-likelihood per scored token, in nats
    n_tokens: int  # tokens scored
    n_windows: int
    seq_len: int
    stride: int | None
    window_nll: list[float] = field(default_factory=list)  # summed NLL of each window's tokens
    window_tokens: list[int] = field(default_factory=list)  # tokens each window scored


def _windows(n: int, body: int, stride: int | None, bos: bool) -> Iterator[tuple[int, int, int]]:
    """``(start, end, first)``: stream tokens start..end-1 go in, first..end-1 are scored."""
    step = stride or body
    start, done = 0, 0
    while done < n:
        end = min(start + body, n)
        first = max(done, start + (not bos))
        if first < end:
            yield start, end, first
        start, done = start + step, end


@torch.no_grad()
def _nll(model: PreTrainedModel, ids: torch.Tensor, first: int) -> list[float]:
    """Per row, the sum of -log p(ids[:, t] | ids[:, :t]) for t >= ``first``; the LM head runs
    only at the scored positions, in chunks (:mod:`layerprune.lmhead`)."""
    states = final_states(model, ids)[:, first - 1 : -1]  # position t - 1 predicts token t
    rows, length = states.shape[:2]
    logp, _ = token_logprobs(model, states.reshape(rows * length, -1), ids[:, first:].reshape(-1))
    return (-logp.double().reshape(rows, length).sum(dim=1)).tolist()


def perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    text_or_docs: str | Iterable[str],
    seq_len: int = 2048,
    stride: int | None = None,
    batch_size: int = 4,
    add_bos: bool = True,
    max_tokens: int | None = None,
) -> PerplexityResult:
    """Perplexity of a text (``<doc>`` wrappers allowed) or of documents given one by one.

    ``max_tokens`` keeps only the start of the token stream, for quick estimates.
    """
    bos = tokenizer.bos_token_id if add_bos else None
    body = seq_len - (bos is not None)
    if seq_len < 2 or batch_size < 1 or (max_tokens is not None and max_tokens < 1):
        raise LayerpruneError(
            f"perplexity needs seq_len >= 2, batch_size >= 1 and max_tokens >= 1; got "
            f"seq_len={seq_len}, batch_size={batch_size}, max_tokens={max_tokens}"
        )
    if stride is not None and not 1 <= stride <= body:
        raise LayerpruneError(
            f"perplexity stride={stride} must be between 1 and the window's {body} text tokens"
        )
    docs = split_documents(text_or_docs) if isinstance(text_or_docs, str) else text_or_docs
    stream = token_stream(tokenizer, docs, max_tokens)[:max_tokens]
    if len(stream) < body:
        raise LayerpruneError(
            f"perplexity text gives {len(stream)} tokens, fewer than one window of "
            f"seq_len={seq_len} ({body} text tokens); use a longer text or a smaller seq_len"
        )
    # Windows scoring the same positions batch together; only the first and last can differ.
    prefix = [] if bos is None else [bos]
    groups: dict[tuple[int, int], list[list[int]]] = {}
    for start, end, first in _windows(len(stream), body, stride, bos is not None):
        row = prefix + stream[start:end]
        groups.setdefault((len(row), first - start + len(prefix)), []).append(row)
    window_nll: list[float] = []
    window_tokens: list[int] = []
    for (length, offset), rows in groups.items():
        for i in range(0, len(rows), batch_size):
            batch = torch.tensor(rows[i : i + batch_size], device=model.device)
            window_nll += _nll(model, batch, offset)
        window_tokens += [length - offset] * len(rows)
    n_tokens = sum(window_tokens)
    nll = math.fsum(window_nll) / n_tokens
    return PerplexityResult(
        math.exp(nll), nll, n_tokens, len(window_nll), seq_len, stride, window_nll, window_tokens
    )


def perplexity_of_file(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: str | Path, **options: Any
) -> PerplexityResult:
    """:func:`perplexity` of a UTF-8 text file such as the data mirror's ``text/wiki.txt``;
    ``options`` are :func:`perplexity`'s (``seq_len``, ``stride``, ``batch_size``, ...)."""
    path = Path(path)
    if not path.is_file():
        raise LayerpruneError(f"perplexity file '{path}' does not exist")
    return perplexity(model, tokenizer, path.read_text(encoding="utf-8"), **options)


def perplexity_ci(
    window_nll: Sequence[float], window_tokens: Sequence[int], seed: int = 0, iters: int = ITERS
) -> tuple[float, float]:
    """95% percentile bootstrap interval of exp(sum NLL / sum tokens), windows resampled with
    replacement (the ratio is recomputed on each resample, so uneven windows weigh right)."""
    columns = np.stack([np.asarray(window_nll, float), np.asarray(window_tokens, float)], axis=1)
    draws = resample_means({"windows": columns}, iters, seed)["windows"]
    return percentile_ci(np.exp(draws[:, 0] / draws[:, 1]))
