"""Loss-based criteria against independent references: every value is recomputed by pruning a
copy of the model and running its own forward (or by plain autograd), never by the engine."""

from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path

import pytest
import torch

import layerprune as lp
from layerprune.app import run
from layerprune.criteria import SLEB, CriterionScores, PPLCriterion, TaylorPlus
from layerprune.engine import SkipEngine, UnsupportedLayers
from layerprune.errors import LayerpruneError
from layerprune.layers import decoder_stack
from layerprune.pipeline import StepsCache
from layerprune.selection import Sparsity, make_plan
from layerprune.surgery import remove_layers

from .conftest import TINY_MODELS, compose_config, load
from .test_app import TINY

ARCHITECTURES = [*TINY_MODELS, "tiny_opt", "tiny_mistral", "tiny_qwen3"]


def tokens(n: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 250, (n, seq_len), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def nll_by_hand(model: torch.nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """(n,) summed -log p(x_t | x_<t), t >= 1, from the model's own logits."""
    logits = model(input_ids=windows, use_cache=False).logits[:, :-1].float()
    logp = torch.log_softmax(logits, dim=-1)
    return -logp.gather(-1, windows[:, 1:].unsqueeze(-1)).squeeze(-1).double().sum(1)


def without(model: torch.nn.Module, removed: list[int]) -> torch.nn.Module:
    """A pruned copy: the dense model with the original layers ``removed`` taken out."""
    pruned = copy.deepcopy(model)
    remove_layers(pruned, removed)
    return pruned


def ppl(nll: torch.Tensor, windows: torch.Tensor) -> float:
    return math.exp(float(nll.sum()) / (windows.numel() - windows.shape[0]))


def sleb_reference(
    model: torch.nn.Module, windows: torch.Tensor, k: int, early: int = 1, latter: int = 1
) -> tuple[list[int], list[dict[int, float]]]:
    """The official loop, brute force: each step prunes a copy per candidate."""
    num = decoder_stack(model).num_layers
    removed: list[int] = []
    steps = []
    for _ in range(k):
        alive = [i for i in range(num) if i not in removed]
        losses = {alive[j]: nll_by_hand(without(model, [*removed, alive[j]]), windows)
                  for j in range(early, len(alive) - latter)}  # fmt: skip
        best = min(losses, key=lambda i: float(losses[i].sum()))
        removed.append(best)
        steps.append({i: ppl(v, windows) for i, v in losses.items()})
    return removed, steps


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_engine_equals_pruned_copies(name: str) -> None:
    """Without-layer NLL from cached boundary states, candidates batched across calls (3
    windows, 2 rows a call), before and after removals, equals each pruned model's own."""
    model = load(name).model
    windows = tokens(3, 24)  # longer than the tiny models' sliding window of 8
    engine = SkipEngine(model, windows, batch_size=2)
    torch.testing.assert_close(engine.nll(), nll_by_hand(model, windows), rtol=1e-5, atol=1e-4)
    removed: list[int] = []
    for position in (2, 0):
        got = engine.nll_without(range(len(engine.kept)))
        for p, original in enumerate(engine.kept):
            want = nll_by_hand(without(model, [*removed, original]), windows)
            torch.testing.assert_close(got[p], want, rtol=1e-5, atol=1e-4)
        removed.append(engine.kept[position])
        engine.remove(position)
        assert engine.kept == [i for i in range(6) if i not in removed]
        want = nll_by_hand(without(model, removed), windows)
        torch.testing.assert_close(engine.nll(), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_sleb_choices_equal_the_brute_force_loop(name: str) -> None:
    model = load(name).model
    windows = tokens(3, 24, seed=1)
    scores = SLEB().measure(model, windows, k=3, batch_size=2)
    order, steps = sleb_reference(model, windows, 3)
    assert scores.order == order
    assert len(scores.steps) == 3
    for got, want in zip(scores.steps, steps, strict=True):
        assert {int(i): v for i, v in got["candidates"].items()} == pytest.approx(want, rel=1e-5)
    assert scores.protected == [0, 5]
    assert make_plan(SLEB(), scores, Sparsity(3, "layers"), [1] * 6, 10).removed_layers == sorted(
        order
    )


def test_sleb_barriers_and_a_larger_step_count_extend_the_order() -> None:
    model = load("tiny_llama").model
    windows = tokens(2, 16, seed=2)
    short = SLEB(early_barrier=0, latter_barrier=0).measure(model, windows, k=2)
    longer = SLEB(early_barrier=0, latter_barrier=0).measure(model, windows, k=4)
    assert longer.order[:2] == short.order
    assert longer.order == sleb_reference(model, windows, 4, early=0, latter=0)[0]


class Stop(Exception):
    """Stands for the process being ended part-way through a measurement."""


def test_a_stopped_sleb_measurement_resumes_to_the_unbroken_choices() -> None:
    model = load("tiny_llama").model
    windows = tokens(3, 24, seed=4)
    saved: list[dict] = []

    def stop_after_two(steps: list[dict]) -> None:
        saved[:] = json.loads(json.dumps(steps))  # as the steps cache stores them
        if len(steps) == 2:
            raise Stop

    with pytest.raises(Stop):
        SLEB().measure(model, windows, k=4, batch_size=2, on_step=stop_after_two)
    assert len(saved) == 2
    taken: list[int] = []
    resumed = SLEB().measure(
        model, windows, k=4, batch_size=2, resume=saved, on_step=lambda s: taken.append(len(s))
    )
    assert taken == [3, 4]  # only the steps after the saved ones are measured
    assert resumed.order == sleb_reference(model, windows, 4)[0]
    whole = SLEB().measure(model, windows, k=4, batch_size=2)
    assert resumed.order == whole.order and resumed.steps[:2] == saved
    assert resumed.values == pytest.approx(whole.values, rel=1e-6)
    # fewer steps than were measured: the first ones, and nothing measured again
    fewer = SLEB().measure(model, windows, k=1, batch_size=2, resume=saved, on_step=taken.append)
    assert fewer.order == whole.order[:1] and fewer.steps == saved[:1] and taken == [3, 4]
    # steps of another model are refused, not replayed
    with pytest.raises(LayerpruneError, match="cannot resume from its cached steps: 0 is not"):
        SLEB().measure(model, windows, k=2, resume=[{**saved[0], "removed": 0}])


@pytest.mark.parametrize("name", TINY_MODELS)
def test_ppl_criterion_equals_pruning_each_layer_by_hand(name: str) -> None:
    model = load(name).model
    windows = tokens(4, 20, seed=3)
    scores = PPLCriterion(keep_first=1, keep_last=1).measure(model, windows, k=2, batch_size=3)
    by_hand = [ppl(nll_by_hand(without(model, [i]), windows), windows) for i in range(6)]
    assert scores.values == pytest.approx(by_hand, rel=1e-5)
    ranked = sorted(range(1, 5), key=lambda i: by_hand[i])
    assert scores.order == ranked
    assert scores.dense_ppl == pytest.approx(ppl(nll_by_hand(model, windows), windows), rel=1e-5)
    plan = make_plan(PPLCriterion(1, 1), scores, Sparsity(2, "layers"), [1] * 6, 10)
    assert plan.removed_layers == sorted(ranked[:2])


def naive_taylor(model: torch.nn.Module, windows: torch.Tensor, batch_size: int) -> list[float]:
    """The official loop: per batch, HF's own loss (labels=input), backward, and the signed
    saliency w * grad of every '*weight*' of every layer accumulated; then |.| summed."""
    model = copy.deepcopy(model)
    saliency: dict[str, torch.Tensor] = {}
    for batch in windows.split(batch_size):
        model.zero_grad()
        model(input_ids=batch, labels=batch).loss.backward()
        for name, p in model.named_parameters():
            if "layers." in name and "weight" in name:
                s = (p * p.grad).detach().float()
                saliency[name] = saliency[name] + s if name in saliency else s
    layers = decoder_stack(model).layers
    prefix = {id(p): i for i, layer in enumerate(layers) for p in layer.parameters()}
    named = dict(model.named_parameters())
    scores = [0.0] * len(layers)
    for name, s in saliency.items():
        scores[prefix[id(named[name])]] += float(s.abs().sum())
    return scores


@pytest.mark.parametrize("name", TINY_MODELS)
def test_taylor_equals_a_naive_autograd_computation(name: str) -> None:
    model = load(name).model
    windows = tokens(5, 16, seed=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores = TaylorPlus(keep_first=1, keep_last=2, batch_size=2).measure(model, windows, k=1)
    want = naive_taylor(model, windows, batch_size=2)  # 3 batches: 2 + 2 + 1
    assert scores.values == pytest.approx(want, rel=1e-4)
    assert scores.order == sorted(range(1, 4), key=lambda i: want[i])
    assert scores.protected == [0, 4, 5]
    # the model is left as it was: same weights, no gradients, gradients enabled as before
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def test_budgets_beyond_the_protected_layers_are_refused() -> None:
    model = load("tiny_llama").model
    windows = tokens(2, 8)
    with pytest.raises(LayerpruneError, match=r"sleb removes at most 4 of 6 layers"):
        SLEB().measure(model, windows, k=5)
    with pytest.raises(LayerpruneError, match=r"taylor removes at most 0 of 6 layers"):
        TaylorPlus().measure(model, windows, k=1)
    with pytest.raises(LayerpruneError, match="selection 'contiguous' is not supported"):
        PPLCriterion(selection="contiguous")


def test_layers_fed_per_window_inputs_are_refused() -> None:
    """A layer input that differs between windows (per-layer token embeddings) would be
    expanded from the first window: the engine refuses it instead."""
    model = load("tiny_llama").model
    stack = decoder_stack(model)

    def extra(_m: torch.nn.Module, args: tuple, kwargs: dict) -> tuple:
        kwargs["position_ids"] = torch.arange(args[0].shape[0])[:, None].expand(-1, 4)
        return args, kwargs

    handle = stack.layers[1].register_forward_pre_hook(extra, with_kwargs=True)
    try:
        with pytest.raises(UnsupportedLayers, match="differs between windows"):
            SkipEngine(model, tokens(2, 4))
        # one row a call: the calls are still captured from two windows
        with pytest.raises(UnsupportedLayers, match="differs between windows"):
            SkipEngine(model, tokens(3, 4), batch_size=1)
    finally:
        handle.remove()


def test_layers_fed_one_value_per_window_are_refused() -> None:
    """A (rows,) input that differs between windows is refused too; a (tokens,) one is kept."""
    model = load("tiny_llama").model
    stack = decoder_stack(model)

    def extra(_m: torch.nn.Module, args: tuple, kwargs: dict) -> tuple:
        kwargs["window_scale"] = args[0][:, 0, 0].clone()  # one value per window
        return args, kwargs

    def forward(hidden: torch.Tensor, *args: object, **kwargs: object) -> object:
        kwargs.pop("window_scale", None)
        return original(hidden, *args, **kwargs)

    layer = stack.layers[1]
    original = layer.forward
    layer.forward = forward  # type: ignore[method-assign]
    handle = layer.register_forward_pre_hook(extra, with_kwargs=True)
    try:
        with pytest.raises(UnsupportedLayers, match=r"kwargs.window_scale\) that differs"):
            SkipEngine(model, tokens(3, 4), batch_size=1)
    finally:
        handle.remove()
        del layer.forward


def test_the_kl_of_tokens_of_probability_zero_is_finite() -> None:
    """A token the dense model gives probability 0 (a -inf log-probability) adds nothing to
    KL(dense || pruned), even where the pruned model gives it -inf as well."""
    model = load("tiny_llama").model
    windows = tokens(2, 8)
    engine = SkipEngine(model, windows)
    head = model.get_output_embeddings()
    masked = torch.zeros(head.weight.shape[0])
    masked[-10:] = -math.inf  # no window holds these tokens

    def hook(_m: torch.nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
        return out + masked.to(out.dtype)

    handle = head.register_forward_hook(hook)
    try:
        kl, nll = engine.divergence(engine.final_without([2]))
        same, _ = engine.divergence(engine.states[-1])
    finally:
        handle.remove()
    assert torch.isfinite(kl).all() and torch.isfinite(nll).all() and (kl > 0).all()
    assert torch.equal(same, torch.zeros_like(same))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: SLEB(early_barrier=-1), "sleb early_barrier: -1; allowed: an integer >= 0"),
        (lambda: SLEB(latter_barrier=1.5), "sleb latter_barrier: 1.5; allowed: an integer >= 0"),
        (lambda: PPLCriterion(keep_first="x"), "ppl keep_first: x; allowed: an integer >= 0"),
        (lambda: TaylorPlus(keep_last=True), "taylor keep_last: True; allowed: an integer >= 0"),
        (lambda: TaylorPlus(batch_size=0), "taylor batch_size: 0; allowed: an integer >= 1"),
    ],
)
def test_bad_criterion_settings_name_the_value_and_what_is_allowed(make, message: str) -> None:
    with pytest.raises(LayerpruneError) as err:
        make()
    assert str(err.value) == message


def test_criterion_scores_round_trip_and_choose() -> None:
    scores = CriterionScores("ppl", "k", "l", [3.0, 1.0, 2.0, 5.0], order=[1, 2], protected=[0, 3])
    assert CriterionScores.from_dict(scores.to_dict()) == scores
    assert scores.choose(2) == ([1, 2], [3.0, 1.0, 2.0, 5.0])
    with pytest.raises(LayerpruneError, match="ranked 2 layers; cannot remove 3"):
        scores.choose(3)


def criterion_run(tmp_path: Path, name: str, *extra: str) -> tuple[dict, dict, dict]:
    """A tiny run of a preset: metrics.json, scores.json and plan.json."""
    out = tmp_path / f"run-{len(list(tmp_path.glob('run-*')))}"
    cfg = compose_config([
        *TINY, f"experiment={name}", "calibration.n=3", "calibration.seq_len=24",
        "recovery=none", f"paths.cache={tmp_path / 'cache'}", *extra,
    ])  # fmt: skip
    record = run(cfg, out)
    assert (out / "importance.png").stat().st_size > 0
    return record, read(out / "scores.json"), read(out / "plan.json")


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def test_a_sleb_run_records_its_scores_order_and_plot(tmp_path: Path) -> None:
    record, scores, planned = criterion_run(tmp_path, "sleb", "sparsity=2", "sparsity_unit=layers")
    criterion = scores["criterion"]
    assert criterion["criterion"] == "sleb" and len(criterion["order"]) == 2
    assert planned["plan"]["removed_layers"] == sorted(criterion["order"])
    assert record["plan"]["removed_layers"] == sorted(criterion["order"])
    assert scores["layer_metrics"]["sleb_ppl"] == criterion["values"]
    assert [s["removed"] for s in criterion["steps"]] == criterion["order"]
    assert criterion["n_windows"] == 3 and criterion["n_tokens"] == 3 * 23
    # the statistics are recorded as for every scorer
    assert len(scores["layer_metrics"]["block_influence"]) == 6
    assert not record["scores_from_cache"]


def test_the_scores_cache_key_holds_what_the_criteria_depend_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    layers = ("sparsity_unit=layers", "force=true")
    first = criterion_run(tmp_path, "sleb", "sparsity=2", *layers)[1]["criterion"]
    again = criterion_run(tmp_path, "sleb", "sparsity=2", *layers)
    assert again[0]["scores_from_cache"] and again[1]["criterion"] == first
    # SLEB's measurement depends on how many layers it removes (one for more layers starts
    # after the steps measured for fewer), and on its barriers
    with caplog.at_level(logging.INFO, logger="layerprune"):
        more = criterion_run(tmp_path, "sleb", "sparsity=3", *layers)
    assert not more[0]["scores_from_cache"] and "sleb: resuming after 2 measured step(s)" in (
        caplog.text
    )
    uncached = criterion_run(tmp_path, "sleb", "sparsity=3", "scoring.cache=false", *layers)
    assert more[1]["criterion"]["order"] == uncached[1]["criterion"]["order"]
    barrier = criterion_run(tmp_path, "sleb", "sparsity=2", "scorer.early_barrier=0", *layers)
    assert not barrier[0]["scores_from_cache"]
    # a one-shot criterion's does not depend on the number removed, but on its data
    ends = ("scorer.keep_first=1", "scorer.keep_last=1", *layers)
    ppl1 = criterion_run(tmp_path, "ppl", "sparsity=1", *ends)
    ppl2 = criterion_run(tmp_path, "ppl", "sparsity=2", *ends)
    assert not ppl1[0]["scores_from_cache"] and ppl2[0]["scores_from_cache"]
    assert ppl2[2]["plan"]["removed_layers"] == sorted(ppl1[1]["criterion"]["order"][:2])
    other = criterion_run(tmp_path, "ppl", "sparsity=2", "calibration.seed=5", *ends)
    assert not other[0]["scores_from_cache"]
    taylor = criterion_run(tmp_path, "taylor", "sparsity=2", *ends)
    assert not taylor[0]["scores_from_cache"]
    assert taylor[1]["criterion"]["key"] == "taylor_saliency"


def test_the_api_measures_and_plans() -> None:
    loaded = load("tiny_llama")
    windows = tokens(3, 24, seed=1)
    scores = lp.measure(loaded, windows, lp.SLEB(), sparsity=2, unit="layers")
    plan = lp.plan(loaded, scores, lp.SLEB(), sparsity=2, unit="layers")
    assert plan.removed_layers == sorted(sleb_reference(loaded.model, windows, 2)[0])
    with pytest.raises(LayerpruneError, match="scorer 'sleb' reads CriterionScores"):
        lp.plan(loaded, lp.score(loaded, windows), lp.SLEB(), sparsity=2, unit="layers")


def test_the_steps_cache_keeps_the_longest_run_of_the_same_steps(tmp_path: Path) -> None:
    steps = StepsCache({"model": "m"}, SLEB(), str(tmp_path))
    one, two, three = ({"removed": i, "ppl": float(i), "candidates": {}} for i in (3, 1, 4))
    steps.save([one, two])
    steps.save([one])  # a job of fewer layers does not shorten it
    steps.save([two, one, three])  # nor does a different run of steps replace it
    assert steps.load() == [one, two]
    steps.save([one, two, three])
    assert StepsCache({"model": "m"}, SLEB(), str(tmp_path)).load() == [one, two, three]
    assert StepsCache({"model": "other"}, SLEB(), str(tmp_path)).load() == []
