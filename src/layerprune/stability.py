"""How far a pruned model's multiple-choice answers stay those of the dense model.

Accuracy alone hides churn: a pruned model can keep its score while flipping many answers.
``agreement`` counts identical answers; ``stability`` is LLM-Streamline's metric, which weights
each question by how much the dense model's perplexities of its options spread.
"""

from __future__ import annotations

import gzip
import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from layerprune.errors import LayerpruneError
from layerprune.files import atomic_write


@dataclass
class Sample:
    """One multiple-choice question as scored by a model, with its lm-eval predictions.

    ``chars`` is each continuation's length in characters: acc_norm divides by it, as lm-eval
    does. ``prompt_hash`` identifies the prompt, so dense and pruned runs can be checked to
    have asked the same question.
    """

    doc_id: int
    loglikelihoods: list[float]
    tokens: list[int]
    chars: list[int]
    gold: int
    pred_acc: int
    pred_norm: int
    prompt_hash: str

    def __post_init__(self) -> None:
        k = len(self.loglikelihoods)
        if k == 0 or len(self.tokens) != k or len(self.chars) != k:
            raise LayerpruneError(
                f"doc {self.doc_id}: needs one loglikelihood, token count and char count per "
                f"option; got {k}, {len(self.tokens)} and {len(self.chars)}"
            )
        if min(self.tokens) < 1:
            raise LayerpruneError(
                f"doc {self.doc_id}: token counts must be >= 1; got {self.tokens}"
            )
        for name in ("gold", "pred_acc", "pred_norm"):
            if not 0 <= getattr(self, name) < k:
                raise LayerpruneError(
                    f"doc {self.doc_id}: {name}={getattr(self, name)} is not an option index "
                    f"0..{k - 1}"
                )

    @classmethod
    def from_scores(
        cls,
        doc_id: int,
        loglikelihoods: list[float],
        tokens: list[int],
        chars: list[int],
        gold: int,
        prompt_hash: str,
    ) -> Sample:
        """Predictions as lm-eval makes them: argmax of ll (acc) and of ll / chars (acc_norm)."""
        ll = np.asarray(loglikelihoods, dtype=np.float64)
        return cls(
            doc_id=doc_id,
            loglikelihoods=list(loglikelihoods),
            tokens=list(tokens),
            chars=list(chars),
            gold=gold,
            pred_acc=int(np.argmax(ll)),
            pred_norm=int(np.argmax(ll / np.asarray(chars, dtype=np.float64))),
            prompt_hash=prompt_hash,
        )

    def pred(self, norm: bool = False) -> int:
        return self.pred_norm if norm else self.pred_acc

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Sample:
        names = {f.name for f in fields(cls)}
        if set(data) != names:
            raise LayerpruneError(
                f"sample has fields {sorted(data)}; expected exactly {sorted(names)}"
            )
        return cls(**data)


def _paired(dense: Sequence[Sample], pruned: Sequence[Sample]) -> list[tuple[Sample, Sample]]:
    """Dense and pruned samples matched by doc_id, in doc_id order, after checking they agree."""
    by_id: list[dict[int, Sample]] = []
    for name, samples in (("dense", dense), ("pruned", pruned)):
        counts = Counter(s.doc_id for s in samples)
        dup = [i for i, c in counts.items() if c > 1]
        if dup:
            raise LayerpruneError(f"{name} samples list doc {min(dup)} more than once")
        by_id.append({s.doc_id: s for s in samples})
    d, p = by_id
    if not d and not p:
        raise LayerpruneError("no samples to compare; need at least one doc")
    if d.keys() != p.keys():
        first = min(d.keys() ^ p.keys())
        missing = "pruned" if first in d else "dense"
        raise LayerpruneError(
            f"doc {first} is missing from the {missing} samples; both runs must score the same docs"
        )
    pairs = [(d[i], p[i]) for i in sorted(d)]
    for a, b in pairs:
        if len(a.loglikelihoods) != len(b.loglikelihoods):
            raise LayerpruneError(
                f"doc {a.doc_id} has {len(a.loglikelihoods)} options in the dense samples but "
                f"{len(b.loglikelihoods)} in the pruned; both runs must score the same options"
            )
        if a.prompt_hash != b.prompt_hash or a.gold != b.gold:
            raise LayerpruneError(
                f"doc {a.doc_id} differs between runs (prompt hash {a.prompt_hash} vs "
                f"{b.prompt_hash}, gold {a.gold} vs {b.gold}); both must ask the same question"
            )
    return pairs


def _weights(pairs: list[tuple[Sample, Sample]], legacy: bool) -> np.ndarray:
    """softmax over docs of the std over options of the dense model's per-token PPL.

    ``legacy`` takes the per-token NLL instead of its exp: OpenCompass, whose outputs the
    authors' script reads, stores the mean token loss under the name "PPL".
    """
    nll = [-np.asarray(a.loglikelihoods, np.float64) / np.asarray(a.tokens) for a, _ in pairs]
    spread = np.array([np.std(x if legacy else np.exp(x)) for x in nll])
    w = np.exp(spread - spread.max())
    return w / w.sum()


def _compare(
    dense: Sequence[Sample], pruned: Sequence[Sample], norm: bool
) -> tuple[list[tuple[Sample, Sample]], np.ndarray, np.ndarray]:
    """Per doc, in doc_id order: the pair, both right or both wrong, same answer."""
    pairs = _paired(dense, pruned)
    matches = np.array([(a.pred(norm) == a.gold) == (b.pred(norm) == b.gold) for a, b in pairs])
    same = np.array([a.pred(norm) == b.pred(norm) for a, b in pairs])
    return pairs, matches, same


def _stability(pairs: list[tuple[Sample, Sample]], m: np.ndarray, legacy: bool) -> float:
    w = _weights(pairs, legacy)
    return float(w[: int(m.sum())].sum() if legacy else w[m].sum())


def agreement(dense: Sequence[Sample], pruned: Sequence[Sample], norm: bool = False) -> float:
    """Fraction of docs where both models pick the same option (acc_norm's pick if ``norm``)."""
    return float(_compare(dense, pruned, norm)[2].mean())


def stability(
    dense: Sequence[Sample], pruned: Sequence[Sample], norm: bool = False, legacy: bool = False
) -> float:
    """LLM-Streamline's stability: agreement on correctness, weighted toward hard-to-call docs.

    With PPL_ij = exp(-ll_ij / tokens_ij) the dense model's per-token perplexity of option j
    of doc i, s_i = std_j PPL_ij is the population std (ddof=0, numpy's default, as in the
    authors' script), w = softmax_i(s_i), and m_i = 1 when both models are right or both wrong
    (acc_norm's picks if ``norm``). The result is sum_i w_i m_i, docs in doc_id order.

    ``legacy`` reproduces the authors' released script on OpenCompass outputs: it sums the
    first sum_i m_i weights in doc order, whichever docs matched, and its weights come from
    the per-token NLL that OpenCompass stores as "PPL" rather than from exp of it. It is kept
    only to compare with published numbers. (With exp, a few docs whose options the model
    finds very unlikely take nearly all the weight on small models.)
    """
    pairs, m, _ = _compare(dense, pruned, norm)
    return _stability(pairs, m, legacy)


def task_stability(
    dense: Sequence[Sample], pruned: Sequence[Sample], norm: bool = False
) -> dict[str, float | int]:
    """Every comparison for one task: agreement, stability (correct and legacy), doc count."""
    pairs, m, same = _compare(dense, pruned, norm)
    return {
        "agreement": float(same.mean()),
        "stability": _stability(pairs, m, legacy=False),
        "stability_legacy": _stability(pairs, m, legacy=True),
        "n": len(m),
    }


def average_over_tasks(per_task: Mapping[str, Mapping[str, float | int]]) -> dict[str, float]:
    """Plain mean over tasks, each task counting once whatever its size (as papers report).

    ``n`` is the total number of docs rather than a mean.
    """
    if not per_task:
        raise LayerpruneError("no tasks to average; need at least one task's results")
    rows = list(per_task.values())
    keys = ("agreement", "stability", "stability_legacy")
    means = {k: math.fsum(float(r[k]) for r in rows) / len(rows) for k in keys}
    return {**means, "n": sum(int(r["n"]) for r in rows)}


def write_samples(path: str | Path, samples: Iterable[Sample]) -> Path:
    """One task's samples as gzip JSON Lines; no timestamp in the header, so reruns match bytes."""
    body = "".join(json.dumps(s.to_dict()) + "\n" for s in samples).encode()

    def write(tmp: Path) -> None:
        with (
            tmp.open("wb") as raw,
            gzip.GzipFile(fileobj=raw, mode="wb", filename="", mtime=0) as f,
        ):
            f.write(body)

    return atomic_write(path, write)


def read_samples(path: str | Path) -> list[Sample]:
    path = Path(path)
    if not path.is_file():
        raise LayerpruneError(f"samples file '{path}' does not exist")
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.readlines()
    except (OSError, EOFError) as e:
        raise LayerpruneError(f"samples file '{path}' is not complete gzip: {e}") from e
    samples = []
    for n, line in enumerate(lines, start=1):
        try:
            samples.append(Sample.from_dict(json.loads(line)))
        except (ValueError, TypeError, LayerpruneError) as e:
            raise LayerpruneError(f"samples file '{path}' line {n} is not a sample: {e}") from e
    return samples
