"""The shared-context backend gives lm-eval's own answers, request by request."""

from __future__ import annotations

import pytest
import torch
from lm_eval.models.huggingface import HFLM

from layerprune.fastlm import SharedContextLM

from .conftest import load

MODELS = ["tiny_llama", "tiny_qwen2", "tiny_gemma3", "tiny_mistral", "tiny_qwen3", "tiny_opt"]


def requests(vocab: int, seed: int = 0) -> list[tuple[tuple[str, str], list[int], list[int]]]:
    """Shared contexts with 1-token and multi-token options, lone contexts, one too long."""
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
    """Every group is scored once; a batch of several rows pads to at most the budget."""
    from layerprune.fastlm import Group

    loaded = load("tiny_llama")
    lm = SharedContextLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, device="cpu",
                         batch_tokens=40)  # fmt: skip
    groups = [Group([1] * n, [i], [[2] * k]) for i, (n, k) in
              enumerate([(5, 1), (30, 4), (12, 2), (8, 8), (50, 1), (3, 1)])]  # fmt: skip
    batches = list(lm._batches(groups))
    assert sorted(g.members[0] for b in batches for g in b) == list(range(len(groups)))
    lengths = [g.length for b in batches for g in b]
    assert lengths == sorted(lengths, reverse=True)  # longest first: little padding
    for batch in batches:
        assert len(batch) == 1 or len(batch) * batch[0].length <= 40
    assert [len(b) for b in batches] == [1, 1, 2, 2]  # 50 | 33 | 15, 13 | 5, 3
