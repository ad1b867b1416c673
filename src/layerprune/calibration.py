"""Calibration text -> a fixed, seeded set of token windows.

Documents are tokenised separately, joined by EOS into one stream and cut into consecutive
non-overlapping windows; ``n`` of them are drawn with a seeded permutation. A BOS token is
prepended to each window when the tokenizer has one (Gemma's perplexity doubles without it).
"""

from __future__ import annotations

import hashlib
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from layerprune.errors import LayerpruneError

_DOC_TAG = re.compile(r"</?doc\b[^>]*>")


def split_documents(text: str) -> list[str]:
    """Strip ``<doc ...>`` wrappers; each wrapped article (or the whole text) is a document."""
    if "<doc" not in text:
        return [text.strip()] if text.strip() else []
    docs = _DOC_TAG.split(text)
    return [d.strip() for d in docs if d.strip()]


def token_stream(
    tokenizer: PreTrainedTokenizerBase,
    docs: Iterable[str],
    limit: int | None = None,
    eos_after_last: bool = False,
) -> list[int]:
    """Token ids of the documents, tokenised one by one and joined by EOS.

    Reading stops once ``limit`` tokens are gathered (the stream can run past it). With
    ``eos_after_last`` every document, the last too, ends with EOS (calibration windows);
    otherwise EOS only separates documents, so a one-document text is tokenised exactly as a
    standard evaluation tokenises it (perplexity).
    """
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for i, doc in enumerate(docs):
        if limit is not None and len(ids) >= limit:
            break
        if i and eos is not None and not eos_after_last:
            ids.append(eos)
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if eos_after_last and eos is not None:
            ids.append(eos)
    return ids


@dataclass
class Calibration(ABC):
    """A source of calibration windows; its fields identify it in cache keys."""

    n: int = 64
    seq_len: int = 512
    seed: int = 0
    add_bos: bool = True

    def __post_init__(self) -> None:
        if self.n < 1 or self.seq_len < 2:
            raise LayerpruneError(
                f"calibration needs n >= 1 and seq_len >= 2; got n={self.n}, seq_len={self.seq_len}"
            )

    @abstractmethod
    def documents(self) -> Iterator[str]: ...

    @abstractmethod
    def describe(self) -> str: ...

    def identity(self) -> dict[str, Any]:
        return {"source": type(self).__name__, **asdict(self)}

    def windows(self, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
        """``(n, seq_len)`` token ids, deterministic for ``seed``."""
        bos = tokenizer.bos_token_id if self.add_bos else None
        body = self.seq_len - (bos is not None)
        # Read a margin beyond n windows so the seeded draw is not just the first n.
        stream = token_stream(tokenizer, self.documents(), 4 * self.n * body, eos_after_last=True)
        available = len(stream) // body
        if available < self.n:
            raise LayerpruneError(
                f"calibration text {self.describe()} gives {len(stream)} tokens = {available} "
                f"windows of {self.seq_len}; need n={self.n} "
                "(use a longer text or smaller n/seq_len)"
            )
        chunks = torch.tensor(stream[: available * body]).view(available, body)
        gen = torch.Generator().manual_seed(self.seed)
        picked = chunks[torch.randperm(available, generator=gen)[: self.n]]
        if bos is not None:
            picked = torch.cat([torch.full((self.n, 1), bos), picked], dim=1)
        return picked


@dataclass
class TextFile(Calibration):
    """A local plain-text file (e.g. the data mirror's ``text/wiki.txt``)."""

    path: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not Path(self.path).is_file():
            raise LayerpruneError(f"calibration file '{self.path}' does not exist")

    def describe(self) -> str:
        return f"'{self.path}'"

    def documents(self) -> Iterator[str]:
        try:
            text = Path(self.path).read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise LayerpruneError(
                f"calibration file '{self.path}' is not UTF-8 text (byte "
                f"{e.object[e.start]:#04x} at offset {e.start}); allowed: a UTF-8 text file"
            ) from None
        yield from split_documents(text)

    def identity(self) -> dict[str, Any]:
        """The file by its content, not its modification time: a data folder copied or
        provisioned again keeps its caches (a few MB hash in milliseconds)."""
        data = Path(self.path).read_bytes()
        return {**super().identity(), "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@dataclass
class HFDataset(Calibration):
    """A Hugging Face dataset read in streaming mode (pg19, c4, SlimPajama; needs the hub)."""

    path: str = ""
    name: str | None = None
    split: str = "train"
    text_field: str = "text"

    def describe(self) -> str:
        return f"'{self.path}' ({self.name or 'default'}, {self.split})"

    def documents(self) -> Iterator[str]:
        import datasets

        try:
            data = datasets.load_dataset(self.path, self.name, split=self.split, streaming=True)
        except Exception as e:
            raise LayerpruneError(
                f"cannot load calibration dataset {self.describe()}: {str(e).splitlines()[0]} "
                "(offline? use calibration=wiki or another text file)"
            ) from e
        for row in data:
            yield row[self.text_field]
