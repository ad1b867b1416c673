from __future__ import annotations

import math
from functools import cache
from pathlib import Path

import pytest
import torch

from layerprune.errors import LayerpruneError
from layerprune.models import LoadedModel
from layerprune.perplexity import perplexity, perplexity_ci, perplexity_of_file
from tests.conftest import load

# 100 ASCII bytes = 100 tokens of the byte tokenizer
TEXT = ("The quick brown fox jumps over the lazy dog; layer pruning keeps the rest. " * 2)[:100]


@cache
def tiny() -> LoadedModel:
    return load("tiny_llama")


def reference_nll(
    loaded: LoadedModel, ids: list[int], seq_len: int, stride: int | None, bos: bool
) -> tuple[float, int]:
    """Token by token: -log p(token | the context its window gives it), one plain call each."""
    body = seq_len - bos
    step = stride or body
    total, count = 0.0, 0
    for p in range(len(ids)):
        # the first window reaching p scores it (non-overlapping: the window holding p)
        k = p // body if stride is None else max(0, (p - body) // step + 1)
        context = [loaded.tokenizer.bos_token_id] * bos + ids[k * step : p]
        if not context:
            continue  # a window's first token without BOS is context only
        with torch.no_grad():
            logits = loaded.model(torch.tensor([context])).logits[0, -1]
        total -= float(torch.log_softmax(logits.double(), -1)[ids[p]])
        count += 1
    return total, count


@pytest.mark.parametrize(
    ("seq_len", "stride", "bos", "n_tokens", "n_windows"),
    [
        # body 32: windows 32,32,32,4 each lose their first token: 31*3 + 3
        (32, None, False, 96, 4),
        # BOS + body 31: 31*3 + 7 tokens, all scored
        (32, None, True, 100, 4),
        # windows start 0,8,..,72 (end 104 clipped to 100): 31 + 8*8 + 4 = N - 1
        (32, 8, False, 99, 10),
        # BOS + body 31, starts 0..72 (72+31 >= 100): 31 + 8*8 + 5 = N
        (32, 8, True, 100, 10),
    ],
)
def test_matches_token_by_token_reference(
    seq_len: int, stride: int | None, bos: bool, n_tokens: int, n_windows: int
) -> None:
    m = tiny()
    ids = m.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) == 100
    got = perplexity(m.model, m.tokenizer, TEXT, seq_len=seq_len, stride=stride, add_bos=bos)
    total, count = reference_nll(m, ids, seq_len, stride, bos)
    assert (got.n_tokens, got.n_windows, got.stride) == (n_tokens, n_windows, stride)
    assert count == n_tokens
    assert got.nll == pytest.approx(total / count, abs=1e-5)
    assert got.ppl == pytest.approx(math.exp(total / count), rel=1e-5)


def test_one_window_equals_the_model_loss() -> None:
    m = tiny()
    ids = torch.tensor([m.tokenizer(TEXT[:39], add_special_tokens=False)["input_ids"]])
    got = perplexity(m.model, m.tokenizer, TEXT[:39], seq_len=39, add_bos=False)
    with torch.no_grad():
        loss = float(m.model(ids, labels=ids).loss)
    assert (got.n_tokens, got.n_windows) == (38, 1)
    assert got.nll == pytest.approx(loss, abs=1e-6)


@pytest.mark.parametrize("stride", [None, 5])
def test_batch_size_does_not_change_the_result(stride: int | None) -> None:
    m = tiny()
    runs = [
        perplexity(m.model, m.tokenizer, TEXT, seq_len=16, stride=stride, batch_size=b)
        for b in (1, 3, 64)
    ]
    assert len({(r.n_tokens, r.n_windows) for r in runs}) == 1
    for r in runs[1:]:
        assert r.nll == pytest.approx(runs[0].nll, abs=1e-6)


def test_documents_are_joined_by_eos(tmp_path: Path) -> None:
    m = tiny()
    a, b = TEXT[:30], TEXT[31:71]  # no edge spaces: documents are stripped
    path = tmp_path / "docs.txt"
    path.write_text(f'<doc id="1">\n{a}\n</doc>\n<doc id="2">\n{b}\n</doc>\n')
    got = perplexity_of_file(m.model, m.tokenizer, path, seq_len=8)
    # 30 + EOS + 40 = 71 tokens, all scored behind BOS; ceil(71 / 7) = 11 windows
    assert (got.n_tokens, got.n_windows) == (71, 11)
    direct = perplexity(m.model, m.tokenizer, [a, b], seq_len=8)
    assert direct.nll == pytest.approx(got.nll, abs=1e-9)
    eos = m.tokenizer.eos_token_id
    ids = m.tokenizer(a)["input_ids"] + [eos] + m.tokenizer(b)["input_ids"]
    total, count = reference_nll(m, ids, 8, None, True)
    assert count == 71 and got.nll == pytest.approx(total / count, abs=1e-5)


def test_max_tokens_keeps_the_start() -> None:
    m = tiny()
    got = perplexity(m.model, m.tokenizer, TEXT, seq_len=16, max_tokens=43)
    same = perplexity(m.model, m.tokenizer, TEXT[:43], seq_len=16)
    assert (got.n_tokens, got.n_windows) == (43, 3)
    assert got.nll == pytest.approx(same.nll, abs=1e-9)


def test_clear_errors(tmp_path: Path) -> None:
    m = tiny()
    with pytest.raises(
        LayerpruneError, match=r"gives 9 tokens, fewer than one window of seq_len=16"
    ):
        perplexity(m.model, m.tokenizer, "too short", seq_len=16)
    with pytest.raises(LayerpruneError, match=r"stride=16 must be between 1 and the window's 15"):
        perplexity(m.model, m.tokenizer, TEXT, seq_len=16, stride=16)
    with pytest.raises(LayerpruneError, match=r"got seq_len=1, batch_size=4"):
        perplexity(m.model, m.tokenizer, TEXT, seq_len=1)
    with pytest.raises(LayerpruneError, match=r"perplexity file '.*missing.txt' does not exist"):
        perplexity_of_file(m.model, m.tokenizer, tmp_path / "missing.txt", seq_len=16)


def test_windows_are_kept_for_the_interval() -> None:
    m = tiny()
    got = perplexity(m.model, m.tokenizer, TEXT, seq_len=16, stride=5)
    assert len(got.window_nll) == len(got.window_tokens) == got.n_windows
    assert sum(got.window_tokens) == got.n_tokens
    assert math.fsum(got.window_nll) / got.n_tokens == pytest.approx(got.nll, abs=1e-12)
    lo, hi = perplexity_ci(got.window_nll, got.window_tokens, seed=0, iters=500)
    assert lo < got.ppl < hi
    assert perplexity_ci(got.window_nll, got.window_tokens, seed=0, iters=500) == (lo, hi)


def test_interval_by_hand() -> None:
    # two windows of equal NLL per token: every resample gives exp(2), so does the interval
    assert perplexity_ci([4.0, 6.0], [2, 3]) == pytest.approx((math.exp(2), math.exp(2)))


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_token_logprobs_equal_the_full_forwards_log_softmax(softcap: float | None) -> None:
    """The chunked head at chosen positions gives what the model's own logits give."""
    from layerprune.lmhead import CHUNK, final_states, token_logprobs

    loaded = load("tiny_gemma3")
    loaded.model.config.final_logit_softcapping = softcap
    ids = torch.randint(3, 200, (3, 200), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = torch.log_softmax(loaded.model(input_ids=ids).logits[:, :-1], dim=-1)
        states = final_states(loaded.model, ids)[:, :-1].reshape(-1, 64)
        targets = ids[:, 1:].reshape(-1)
        assert len(targets) > CHUNK  # several chunks
        logp, greedy = token_logprobs(loaded.model, states, targets)
    ref = reference.reshape(len(targets), -1)
    torch.testing.assert_close(logp, ref.gather(1, targets[:, None])[:, 0], rtol=0, atol=1e-5)
    assert torch.equal(greedy, ref.argmax(-1) == targets)
