"""Recovery objectives against independent references: token filters, least squares variants,
ReplaceMe's cosine objective, token budgets with accumulation, the activation cache."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from layerprune.calibration import TextFile
from layerprune.errors import LayerpruneError
from layerprune.layers import decoder_stack
from layerprune.models import byte_tokenizer
from layerprune.recovery import (
    ActivationCache,
    LayerReplacement,
    LinearReplacement,
    MLPReplacement,
    TokenFilter,
)
from layerprune.recovery.activations import Streamed, block_batch, in_order
from layerprune.recovery.checkpoint import _module
from layerprune.recovery.modules import build_replacement
from layerprune.recovery.objective import token_loss, token_loss_sum
from layerprune.recovery.training import Training, shuffled

from .conftest import MIRROR, load
from .surgery_checks import logits, skip_reference
from .test_recovery import FAST, naive_mlp_fit, tokens

START, SIZE = 2, 2  # the block [2, 4) of the six-layer tiny models


def wiki(n: int, seq_len: int = 32) -> torch.Tensor:
    return TextFile(n=n, seq_len=seq_len, path=str(MIRROR / "text" / "wiki.txt")).windows(
        byte_tokenizer()
    )


def per_window(flat: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    return flat.reshape(*windows.shape, -1)


# --- which tokens count ---------------------------------------------------------------------


def test_token_filter_by_position_and_by_a_hand_computed_outlier() -> None:
    h_in = torch.zeros(2, 5, 3)
    h_out = torch.ones(2, 5, 3)  # update norm sqrt(3) everywhere...
    h_out[0, 3] = 100.0  # ...but one token of window 0: norm 173 = 100 x the window median
    h_out[1, 1] = 2.0  # norm 3.46 = 2 x the median: no outlier for k = 10
    rule = TokenFilter(exclude_positions=[0], exclude_outliers=10.0)
    expected = torch.tensor([[0, 1, 1, 0, 1], [0, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(rule.fitted(h_in, h_out), expected)
    with pytest.raises(LayerpruneError, match=r"\[0, 7\]; allowed: positions < 5"):
        TokenFilter(exclude_positions=[0, 7]).fitted(h_in, h_out)  # never silently ignored
    for loss in ("nmse", "cosine", "lm"):  # every token weighs alike: none left out by default
        assert TokenFilter(loss=loss).fitted(h_in, h_out).all()
    assert TokenFilter().positions_left_out == [0]  # mse: the sink at position 0
    assert torch.equal(TokenFilter(exclude_outliers=1.5).fitted(h_in, h_out)[1],
                       torch.tensor([0, 0, 1, 1, 1], dtype=torch.bool))  # fmt: skip


def test_token_losses_count_only_the_kept_tokens() -> None:
    gen = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 6, 4, generator=gen), torch.randn(2, 6, 4, generator=gen)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[:, 0] = False
    target_sink = target.clone()
    target_sink[:, 0] = 1e4  # a huge target at the left-out position changes nothing
    p, y = pred[:, 1:].reshape(-1, 4), target[:, 1:].reshape(-1, 4)
    by_hand = {
        "mse": ((p - y) ** 2).mean(),
        "nmse": (((p - y) ** 2).sum(-1) / (y**2).sum(-1)).mean(),
        "cosine": (1 - (p * y).sum(-1) / (p.norm(dim=-1) * y.norm(dim=-1))).mean(),
    }
    for loss, value in by_hand.items():
        torch.testing.assert_close(token_loss(loss, pred, target_sink, mask), value)


# --- the linear fold (ReplaceMe) ------------------------------------------------------------


def kept_rows(
    model: nn.Module, windows: torch.Tensor, keep: torch.Tensor
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """M, Y and h_out of the kept tokens, from one plain forward (numpy float64)."""
    m, h_i, y = naive_mlp_fit(model, START, SIZE, windows)
    h_out = y + h_i - m
    flat = keep.reshape(-1)
    return m[flat].numpy(), y[flat].numpy(), h_out[flat].numpy()


def test_linear_without_position_0_is_lstsq_on_the_kept_rows() -> None:
    model, windows = load("tiny_llama").model, tokens(8)
    keep = torch.ones(windows.shape, dtype=torch.bool)
    keep[:, 0] = False
    m, y, _ = kept_rows(model, windows, keep)
    expected = np.linalg.lstsq(m, y, rcond=None)[0]
    step = LinearReplacement(batch_size=3, exclude_positions=[0])
    got, n_tokens = step.fit(model, START, SIZE, windows)
    assert n_tokens == 8 * 23
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-6, rtol=1e-6)


def test_linear_outlier_rule_is_lstsq_on_the_rows_it_keeps() -> None:
    model, windows = load("tiny_llama").model, tokens(8)
    m, _, y = naive_mlp_fit(model, START, SIZE, windows)
    update = per_window((y - m).norm(dim=-1), windows)[..., 0]  # ||h_out - h_in|| per token
    keep = update <= 1.2 * update.median(dim=1, keepdim=True).values
    assert 0 < int((~keep).sum()) < keep.numel() // 2  # the rule leaves some tokens out
    m, y, _ = kept_rows(model, windows, keep)
    expected = np.linalg.lstsq(m, y, rcond=None)[0]
    rule = LinearReplacement(exclude_positions=[], exclude_outliers=1.2)
    got, n_tokens = rule.fit(model, START, SIZE, windows)
    assert n_tokens == int(keep.sum())
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-6, rtol=1e-6)


def test_linear_nmse_is_least_squares_weighted_by_the_output_norm() -> None:
    model, windows = load("tiny_llama").model, tokens(8)
    m, y, h_out = kept_rows(model, windows, torch.ones(windows.shape, dtype=torch.bool))
    scale = 1 / np.linalg.norm(h_out, axis=1, keepdims=True)
    expected = np.linalg.lstsq(m * scale, y * scale, rcond=None)[0]
    got, _ = LinearReplacement(loss="nmse").fit(model, START, SIZE, windows)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-6, rtol=1e-6)


def test_ridge_pulls_toward_the_identity_which_is_plain_removal() -> None:
    model, windows = load("tiny_llama").model, tokens(8)
    m, y, _ = kept_rows(model, windows, torch.ones(windows.shape, dtype=torch.bool))
    gram, dim = m.T @ m, m.shape[1]
    pull = 0.3 * np.trace(gram) / dim * np.eye(dim)
    expected = np.linalg.solve(gram + pull, m.T @ y + pull)  # closed form of the ridge
    got, _ = LinearReplacement(ridge=0.3, exclude_positions=[]).fit(model, START, SIZE, windows)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-6, rtol=1e-6)
    huge, _ = LinearReplacement(ridge=1e12).fit(model, START, SIZE, windows)
    np.testing.assert_allclose(huge.numpy(), np.eye(dim), atol=1e-8)
    # folded with the huge ridge, the model is the plainly pruned one
    plain = skip_reference(model, [START, START + 1])
    LinearReplacement(ridge=1e12)(model, [START, START + 1], windows, heldout=tokens(2, seed=3))
    ids = tokens(2, seed=5)
    torch.testing.assert_close(logits(model, ids), logits(plain, ids), atol=1e-4, rtol=0)


def mean_cosine_distance(x: np.ndarray, y: np.ndarray) -> float:
    cos = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
    return float((1 - cos).mean())


def test_replaceme_cosine_objective_lowers_the_cosine_distance() -> None:
    model, windows = load("tiny_llama").model, tokens(16)
    m, y, _ = kept_rows(model, windows, torch.ones(windows.shape, dtype=torch.bool))
    step = LinearReplacement(loss="cosine", epochs=30, lr=1e-2, token_batch=64, progress=False)
    got, n_tokens = step.fit(model, START, SIZE, windows)
    assert n_tokens == windows.numel()
    before, after = mean_cosine_distance(m, y), mean_cosine_distance(m @ got.numpy(), y)
    assert after < 0.5 * before
    lstsq = np.linalg.lstsq(m, y, rcond=None)[0]  # the least squares fit is no better at it
    assert after < mean_cosine_distance(m @ lstsq, y)


def test_linear_reports_heldout_figures_against_plain_removal() -> None:
    model, train, heldout = load("tiny_llama").model, tokens(10), tokens(3, seed=7)
    m, h_i, y = naive_mlp_fit(model, START, SIZE, heldout)
    h_out = y + h_i - m
    step = LinearReplacement(exclude_positions=[0])
    transform, _ = step.fit(model, START, SIZE, train)
    report = step(model, [START, START + 1], train, heldout=heldout)
    after = h_i - m + m @ transform
    keep = torch.ones(heldout.shape, dtype=torch.bool)
    keep[:, 0] = False
    flat = keep.reshape(-1)

    def mse(pred: torch.Tensor, rows: torch.Tensor) -> float:
        return float(((pred[rows] - h_out[rows]) ** 2).mean())

    def cos(pred: torch.Tensor, rows: torch.Tensor) -> float:
        return float(F.cosine_similarity(pred[rows], h_out[rows], dim=-1).mean())

    every = torch.ones_like(flat)
    close = {"rel": 1e-5, "abs": 1e-9}
    assert report.heldout_mse_identity == pytest.approx(mse(h_i, every), **close)
    assert report.heldout_mse_after == pytest.approx(mse(after, every), **close)
    assert report.heldout_mse_identity_fitted == pytest.approx(mse(h_i, flat), **close)
    assert report.heldout_mse_after_fitted == pytest.approx(mse(after, flat), **close)
    assert report.heldout_cosine_after_fitted == pytest.approx(cos(after, flat), **close)
    assert report.heldout_mse_before == report.heldout_mse_identity  # T = I is plain removal
    assert (report.heldout_tokens, report.heldout_fitted_tokens) == (3 * 24, 3 * 23)
    assert (report.train_windows, report.train_tokens) == (10, 10 * 23)  # fitted tokens
    assert report.settings["tokens"] == 10 * 23


def test_linear_after_figures_are_those_of_the_folded_model_in_its_dtype() -> None:
    model, train, heldout = load("tiny_llama").model, tokens(10), tokens(3, seed=7)
    model.to(torch.bfloat16)
    h_out = block_batch(model, START, SIZE, heldout).h_out.double()
    step = LinearReplacement(exclude_positions=[0], progress=False)
    transform, _ = step.fit(model, START, SIZE, train)
    batch = block_batch(
        model, START, SIZE, heldout, {"m": decoder_stack(model).mlp_out(START - 1, "linear")}
    )
    m = batch.taps["m"].double()  # the float64 map would give:
    exact = float(((batch.h_in.double() - m + m @ transform - h_out) ** 2).mean())
    report = step(model, [START, START + 1], train, heldout=heldout)
    pruned = block_batch(model, START, 1, heldout).h_in.double()  # what the model now computes
    assert report.heldout_mse_after == pytest.approx(
        float(((pruned - h_out) ** 2).mean()), rel=1e-9
    )
    assert report.heldout_mse_after != pytest.approx(exact, rel=1e-5)  # the fold's rounding


# --- budgets in tokens ----------------------------------------------------------------------


def test_budget_in_tokens_gives_the_stated_steps_and_accumulation() -> None:
    step = LayerReplacement(batch_size=2, batch_tokens=96, tokens=500, **{"progress": False})
    budget = step.budget(n_windows=10, seq_len=24)
    assert (budget.accumulation, budget.step_tokens, budget.steps) == (2, 96, 6)
    assert budget.tokens == 576 and budget.micro_batches == 12
    assert LayerReplacement(batch_size=4, epochs=3).budget(10, 24).steps == 8  # ceil(30 / 4)
    with pytest.raises(LayerpruneError, match=r"batch_tokens 100; allowed: a multiple of .* = 48"):
        LayerReplacement(batch_size=2, batch_tokens=100).budget(10, 24)


def test_training_runs_the_budget_it_states(monkeypatch: pytest.MonkeyPatch) -> None:
    steps, calls = [], []
    original = torch.optim.AdamW.step

    def counted(self: torch.optim.Optimizer, *args: object, **kwargs: object) -> object:
        steps.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", counted)
    model = load("tiny_llama").model
    step = LayerReplacement(kind="ffn_residual", batch_size=2, batch_tokens=96, tokens=500,
                            progress=False)  # fmt: skip
    original_build = build_replacement

    def counting_build(kind: str, stack: object, index: int) -> nn.Module:
        module = original_build(kind, stack, index)  # type: ignore[arg-type]
        module.register_forward_hook(lambda *_: calls.append(1))
        return module

    monkeypatch.setattr("layerprune.recovery.replace.build_replacement", counting_build)
    report = step(model, [1, 2], tokens(10), heldout=tokens(2, seed=4))
    assert (len(steps), report.steps, report.train_tokens, report.tokens_per_step) == (
        6,
        6,
        576,
        96,
    )
    # 12 micro-batches; the held-out fit and the held-out LM loss, each before and after
    # training (one batch each)
    assert len(calls) == 12 + 2 * 1 + 2 * 1
    assert report.settings["accumulation"] == 2


def test_accumulating_two_half_batches_is_one_full_batch() -> None:
    windows, heldout = tokens(8), tokens(2, seed=4)
    modules = []
    for batch_size, batch_tokens in ((4, None), (2, 4 * 24)):
        model = load("tiny_llama").model
        step = LayerReplacement(kind="ffn_residual", batch_size=batch_size,
                                batch_tokens=batch_tokens, tokens=96, lr=1e-2, warmup_ratio=0.0,
                                progress=False)  # fmt: skip
        step(model, [1, 2], windows, heldout=heldout)
        modules.append(decoder_stack(model).layers[1].state_dict())
    for name, value in modules[0].items():
        torch.testing.assert_close(modules[1][name], value, atol=1e-6, rtol=1e-5)
    assert [len(b) for b in (next(shuffled(8, 4, 0)), next(shuffled(8, 2, 0)))] == [4, 2]


def test_accumulating_micro_batches_of_unequal_fitted_counts_is_one_full_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the outlier rule leaves out a different number of tokens in each window: the step's loss
    # is the mean over all its fitted tokens, not the mean of the micro-batches' means
    windows, heldout = tokens(8), tokens(2, seed=4)
    counts: list[int] = []

    def counted(*args: object) -> tuple[torch.Tensor, int]:
        total, n = token_loss_sum(*args)  # type: ignore[arg-type]
        counts.append(n)
        return total, n

    monkeypatch.setattr("layerprune.recovery.replace.token_loss_sum", counted)
    modules, losses = [], []
    for batch_size, batch_tokens in ((4, None), (1, 4 * 24)):
        model = load("tiny_llama").model
        step = LayerReplacement(kind="ffn_residual", batch_size=batch_size,
                                batch_tokens=batch_tokens, tokens=2 * 96, lr=1e-2,
                                warmup_ratio=0.0, exclude_positions=[], exclude_outliers=1.3,
                                progress=False)  # fmt: skip
        report = step(model, [1, 2], windows, heldout=heldout)
        modules.append(decoder_stack(model).layers[1].state_dict())
        losses.append(report.final_loss)
    full, micro = counts[:2], counts[2:]
    assert len(set(micro)) > 1 and sum(micro[:4]) == full[0] and sum(micro[4:]) == full[1]
    for name, value in modules[0].items():  # Adam's 1 / sqrt(v) magnifies float32 rounding
        torch.testing.assert_close(modules[1][name], value, atol=1e-5, rtol=1e-4)
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


def test_shuffled_batches_cover_every_window_once_per_pass() -> None:
    batches = shuffled(6, 4, seed=1)
    first = torch.cat([next(batches) for _ in range(3)])  # 12 indices: two passes
    assert sorted(first[:6].tolist()) == sorted(first[6:].tolist()) == list(range(6))
    assert Training.__dataclass_fields__["tokens"].default is None


def test_position_0_is_left_out_of_the_trained_loss_and_reported_apart() -> None:
    model = load("tiny_llama").model
    step = LayerReplacement(kind="ffn_residual", exclude_positions=[0], lr=3e-3, epochs=4, **FAST)
    windows = wiki(40)
    report = step(model, [1, 2], windows[:32], heldout=windows[36:])
    assert (report.heldout_tokens, report.heldout_fitted_tokens) == (4 * 32, 4 * 31)
    assert report.heldout_mse_after_fitted != report.heldout_mse_after
    assert report.settings["exclude_positions"] == [0]
    assert report.heldout_mse_after_fitted < report.heldout_mse_identity_fitted


# --- the modules ----------------------------------------------------------------------------


def test_mlp_replacements_compute_what_they_say() -> None:
    stack = decoder_stack(load("tiny_llama").model)
    h = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0))
    ffn = build_replacement("ffn", stack, 1)
    assert isinstance(ffn, MLPReplacement) and ffn.norm is None and ffn.gate is None
    by_hand = F.relu(h @ ffn.up.weight.T + ffn.up.bias) @ ffn.down.weight.T + ffn.down.bias
    torch.testing.assert_close(ffn(h), by_hand)
    assert float(ffn.up.weight.detach().std()) == pytest.approx(0.02, rel=0.05)  # initializer_range
    assert not ffn.up.bias.any() and not ffn.down.bias.any()
    swiglu = build_replacement("swiglu", stack, 1)
    assert isinstance(swiglu, MLPReplacement) and swiglu.gate is not None
    assert swiglu.up.weight.shape == (128, 64) and swiglu.up.bias is None  # intermediate_size
    by_hand = (F.silu(h @ swiglu.gate.weight.T) * (h @ swiglu.up.weight.T)) @ swiglu.down.weight.T
    torch.testing.assert_close(swiglu(h), by_hand)
    residual = build_replacement("ffn_residual", stack, 1)
    torch.testing.assert_close(residual(h), h)  # W2 = 0: plain removal
    legacy = {"hidden_size": 64, "expansion": 4, "eps": 1e-6}  # a checkpoint entry of before
    assert _module(legacy).spec == {**residual.spec, "norm_eps": 1e-6}


# --- the activation cache -------------------------------------------------------------------


def train_ffn(cache: bool, cache_dir: Path, dtype: str = "float32") -> tuple[dict, dict]:
    model = load("tiny_llama").model
    windows = wiki(12)
    step = LayerReplacement(kind="ffn_residual", lr=1e-2, epochs=2, activation_cache=cache,
                            cache_dtype=dtype, exclude_positions=[0], **FAST)  # fmt: skip
    report = step(model, [1, 2], windows[:10], heldout=windows[10:], cache_dir=str(cache_dir))
    module = decoder_stack(model).layers[1].state_dict()
    return module, dataclasses.asdict(report)


def test_training_from_the_cache_equals_training_on_streamed_states(tmp_path: Path) -> None:
    streamed, report = train_ffn(False, tmp_path)
    cached, cached_report = train_ffn(True, tmp_path)
    assert len(list((tmp_path / "activations").iterdir())) == 2  # training and held-out windows
    for name, value in streamed.items():
        torch.testing.assert_close(cached[name], value, atol=1e-6, rtol=1e-5)
    for key in ("final_loss", "heldout_mse_after", "heldout_cosine_after_fitted"):
        assert cached_report[key] == pytest.approx(report[key], rel=1e-5)
    _, half_report = train_ffn(True, tmp_path, "float16")  # rounded states: close, not equal
    assert half_report["heldout_mse_after"] == pytest.approx(report["heldout_mse_after"], rel=1e-2)


def test_the_cache_is_written_once_and_checked_when_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model, windows = load("tiny_llama").model, tokens(6)
    cache = ActivationCache(tmp_path, "float32")
    streamed = Streamed(model, START, SIZE, windows)
    expected = torch.cat([b.h_out for b in in_order(streamed, 4)])
    index = torch.tensor([4, 1])
    expected_index = streamed.batch(index).h_out
    forwards: list[int] = []
    decoder_stack(model).layers[0].register_forward_hook(lambda *_: forwards.append(1))
    first = cache.states(model, START, SIZE, windows, batch_size=4)
    assert len(forwards) == 2 + 1  # two batches, then one window for the layer's arguments
    states = cache.states(model, START, SIZE, windows, batch_size=4)
    assert len(forwards) == 3  # read, not recomputed
    torch.testing.assert_close(torch.cat([b.h_out for b in in_order(first, 4)]), expected)
    got = states.batch(index)
    torch.testing.assert_close(got.h_out, expected_index)
    assert torch.equal(got.input_ids, windows[index])
    (entry,) = list(tmp_path.iterdir())
    data = bytearray((entry / "h_out.bin").read_bytes())
    data[100] ^= 0xFF
    (entry / "h_out.bin").write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        cache.states(model, START, SIZE, windows, batch_size=4)
    assert "is damaged (h_out.bin does not match its digest); rebuilding it" in caplog.text
    assert len(forwards) == 6
    with torch.no_grad():
        decoder_stack(model).layers[0].mlp.down_proj.weight.mul_(2)  # other weights: a new entry
    cache.states(model, START, SIZE, windows, batch_size=4)
    assert len(list(tmp_path.iterdir())) == 2


def test_a_weight_changed_through_data_gives_a_new_cache_key(tmp_path: Path) -> None:
    # peft's LoRA merge writes ``weight.data += delta``: the tensor's version does not move
    model, windows = load("tiny_llama").model, tokens(4)
    cache = ActivationCache(tmp_path, "float32")
    before = cache.key(model, START, SIZE, windows, {})
    weight = decoder_stack(model).layers[0].mlp.down_proj.weight
    version = weight._version
    weight.data += 1e-3
    assert weight._version == version
    assert cache.key(model, START, SIZE, windows, {}) != before
    cache.states(model, START, SIZE, windows, batch_size=4)
    weight.data -= 1e-3
    cache.states(model, START, SIZE, windows, batch_size=4)
    assert len(list(tmp_path.iterdir())) == 2
