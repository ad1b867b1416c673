"""The shared-context backend gives lm-eval's own answers, request by request."""

from __future__ import annotations

import pytest
import torch
from lm_eval.models.huggingface import HFLM

from layerprune.fastlm import SharedContextLM

from .conftest import load

MODELS = ["tiny_llama", "tiny_qwen2", "tiny_gemma3", "tiny_mistral", "tiny_qwen3", "tiny_opt"]


def requests(vocab: int, seed: int = 0) -> list[tuple[tuple[str, str], list[int], list[int]]]:
    """Shared contexts with 1-token and multi-token options, lone contexts, options that start
    alike, two contexts equal up to a point (as Winogrande's), one too long."""
    gen = torch.Generator().manual_seed(seed)

    def toks(n: int) -> list[int]:
        return torch.randint(3, vocab - 3, (n,), generator=gen).tolist()

    out = []
    for n_ctx, options in [
        (5, [1, 1, 1, 1]),
        (23, [3, 1, 7, 2]),
        (40, [4, 4]),
        (2, [9]),
        (17, [1]),
    ]:
        context = toks(n_ctx)
        out += [(("c", "x"), context, toks(n)) for n in options]
    context, start = toks(9), toks(3)
    out += [(("c", "x"), context, start + toks(n)) for n in (2, 4, 0)]
    context, rest = toks(20), toks(4)
    out += [(("c", "x"), context, rest), (("c", "x"), context[:15] + toks(5), rest)]
    out.append((("c", "x"), toks(70), toks(5)))  # longer than max_length=64: HFLM truncates
    return out


@pytest.mark.parametrize("batch_tokens", [2048, 24])  # every group in one batch; a few per batch
@pytest.mark.parametrize("name", MODELS)
def test_same_loglikelihoods_and_greedy_flags_as_hflm(name: str, batch_tokens: int) -> None:
    loaded = load(name)
    args = {"pretrained": loaded.model, "tokenizer": loaded.tokenizer, "max_length": 64,
            "device": "cpu", "batch_size": 4}  # fmt: skip
    reqs = requests(len(loaded.tokenizer))
    reference = HFLM(**args)._loglikelihood_tokens(reqs, disable_tqdm=True)
    fast = SharedContextLM(**args, batch_tokens=batch_tokens)
    got = fast._loglikelihood_tokens(reqs, disable_tqdm=True)
    assert len(got) == len(reference) == len(reqs)
    for (ll, greedy), (ll_ref, greedy_ref) in zip(got, reference, strict=True):
        assert abs(ll - ll_ref) <= 1e-4
        assert greedy == greedy_ref


def test_a_greedy_continuation_is_flagged() -> None:
    loaded = load("tiny_llama")
    lm = SharedContextLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, device="cpu")
    context = [5, 6, 7, 8]
    ids = torch.tensor([context])
    greedy = []
    with torch.no_grad():
        for _ in range(3):
            nxt = int(loaded.model(input_ids=ids).logits[0, -1].argmax())
            greedy.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    other = [(greedy[0] + 1) % 200 + 3, *greedy[1:]]
    reqs = [(("c", "x"), context, greedy), (("c", "x"), context, other)]
    (_, is_greedy), (_, not_greedy) = lm._loglikelihood_tokens(reqs, disable_tqdm=True)
    assert is_greedy and not not_greedy


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gemma3"])
def test_the_fast_backend_gives_the_same_evaluation(name: str, tmp_path) -> None:
    from layerprune.evaluation import EvalSuite, evaluate, prepare

    from .conftest import MIRROR

    loaded = load(name)
    results = {}
    for backend in ("hf", "fast"):
        suite = EvalSuite(tasks=["piqa", "arc_easy", "hellaswag"], limit=6, backend=backend)
        results[backend] = evaluate(loaded, suite, prepare(suite, MIRROR, tmp_path / backend))
    hf, fast = results["hf"], results["fast"]
    assert fast.metrics == hf.metrics
    for task, samples in hf.samples.items():
        for ours, theirs in zip(fast.samples[task], samples, strict=True):
            assert (ours.doc_id, ours.pred_acc, ours.pred_norm) == (
                theirs.doc_id, theirs.pred_acc, theirs.pred_norm,
            )  # fmt: skip
            # byte-level continuations of hundreds of tokens: fp32 sums agree to 1e-7 relative
            assert ours.loglikelihoods == pytest.approx(theirs.loglikelihoods, rel=1e-6, abs=1e-4)


def test_rows_are_batched_within_the_token_budget() -> None:
    """Every row is scored once; a batch of several rows pads to at most the budget."""
    from layerprune.fastlm import Row

    loaded = load("tiny_llama")
    lm = SharedContextLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, device="cpu",
                         batch_tokens=40)  # fmt: skip
    rows = []
    for i, (n, k) in enumerate([(5, 1), (30, 4), (12, 2), (8, 8), (50, 1), (3, 1)]):
        rows.append(Row())
        rows[-1].add(i, [1] * n, [2] * k)
    batches = list(lm._batches(rows))
    assert sorted(r.scored[0][0] for b in batches for r in b) == list(range(len(rows)))
    lengths = [r.length for b in batches for r in b]
    assert lengths == sorted(lengths, reverse=True)  # longest first: little padding
    for batch in batches:
        assert len(batch) == 1 or len(batch) * batch[0].length <= 40
    assert [len(b) for b in batches] == [1, 1, 2, 2]  # 50 | 33 | 15, 13 | 5, 3


def test_shared_tokens_run_once() -> None:
    """A hand example: the rows hold each distinct prefix once, and only what shares enough."""
    loaded = load("tiny_llama")
    lm = SharedContextLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, device="cpu")
    x = (("c", "x"),)
    reqs = [
        (*x, [5, 6, 7, 8], [9, 10]),  # paths 5 6 7 8 9 | 5 6 7 8 9 11 | 5 6 7 8 (12)
        (*x, [5, 6, 7, 8], [9, 11, 4]),
        (*x, [5, 6, 7, 8], [12]),
        (*x, [5, 6, 7, 3], [9, 10]),  # shares 3 of 4 context tokens: same row, 2 more nodes
        (*x, [5, 20, 21, 22], [9]),  # shares 1 of 4: a row of its own
    ]
    contexts: dict[tuple[int, ...], list[int]] = {}
    for i, (_, context, _c) in enumerate(reqs):
        contexts.setdefault(tuple(context), []).append(i)
    rows = lm._rows(reqs, contexts)
    assert sorted(r.length for r in rows) == [4, 8]
    big = max(rows, key=lambda r: r.length)
    assert big.tokens == [5, 6, 7, 3, 9, 8, 9, 11]  # contexts sorted: 5 6 7 3 comes first
    assert big.parents == [-1, 0, 1, 2, 3, 2, 5, 6]
    assert big.depths == [0, 1, 2, 3, 4, 3, 4, 5]
    ancestry = big.ancestors()
    assert ancestry[7].nonzero().flatten().tolist() == [0, 1, 2, 5, 6, 7]
    scored = {i: nodes for i, nodes, _ in big.scored}
    assert scored == {3: [3, 4], 0: [5, 6], 1: [5, 6, 7], 2: [5]}
