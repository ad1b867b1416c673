from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from transformers import AutoModelForCausalLM, PreTrainedModel

from layerprune.app import build
from layerprune.calibration import TextFile
from layerprune.errors import LayerpruneError
from layerprune.layers import decoder_stack
from layerprune.models import byte_tokenizer
from layerprune.recovery import (
    LayerReplacement,
    LinearReplacement,
    LoraHealing,
    Recovery,
    RecoveryStep,
    contiguous_block,
    load_recovered,
    save_recovered,
    stream_block,
)

from .conftest import MIRROR, compose_config, load
from .surgery_checks import logits, skip_reference
from .test_scoring import naive_states

FAST = {"batch_size": 4, "progress": False}


@dataclasses.dataclass
class TinyWindows:
    """Stands in for a calibration source: fixed token windows."""

    ids: torch.Tensor

    def windows(self, tokenizer: object) -> torch.Tensor:
        return self.ids


def tokens(n: int, seq_len: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 250, (n, seq_len), generator=torch.Generator().manual_seed(seed))


def weights(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: PreTrainedModel, before: dict[str, torch.Tensor], num: int) -> None:
    assert decoder_stack(model).num_layers == model.config.num_hidden_layers == num
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert all(p.requires_grad for p in model.parameters())  # the caller's flags restored


def assert_round_trip(model: PreTrainedModel, ids: torch.Tensor, tmp: Path) -> None:
    model.save_pretrained(tmp)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=model.dtype).eval()
    assert reloaded.config.num_hidden_layers == model.config.num_hidden_layers
    assert decoder_stack(reloaded).num_layers == decoder_stack(model).num_layers
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gemma3"])
@pytest.mark.parametrize(("start", "size"), [(1, 2), (3, 3)])
def test_streamed_states_equal_hidden_states(name: str, start: int, size: int) -> None:
    model = load(name).model
    windows = tokens(5)
    states = naive_states(model, windows, post_norm_last=False)  # pre-norm last state
    batches = list(stream_block(model, start, size, windows, batch_size=2))
    assert [len(b.h_in) for b in batches] == [2, 2, 1]
    h_in = torch.cat([b.h_in for b in batches]).double()
    h_out = torch.cat([b.h_out for b in batches]).double()
    torch.testing.assert_close(h_in, states[start], atol=1e-5, rtol=0)
    torch.testing.assert_close(h_out, states[start + size], atol=1e-5, rtol=0)
    assert "position_embeddings" in batches[0].layer_kwargs


def naive_mlp_fit(
    model: PreTrainedModel, start: int, size: int, windows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """M (the MLP output of layer start-1), h_i and the target Y, from one plain forward."""
    grabbed: list[torch.Tensor] = []
    mlp = decoder_stack(model).layers[start - 1].mlp
    handle = mlp.register_forward_hook(lambda _m, _a, out: grabbed.append(out))
    states = naive_states(model, windows, post_norm_last=False)
    handle.remove()
    dim = model.config.hidden_size
    m = grabbed[0].double().reshape(-1, dim)
    h_i = states[start].reshape(-1, dim)
    y = states[start + size].reshape(-1, dim) - (h_i - m)
    return m, h_i, y


@pytest.mark.parametrize("mlp_bias", [False, True])
def test_linear_fit_is_least_squares_and_folds_exactly(mlp_bias: bool) -> None:
    cfg = compose_config(["model=tiny_llama", f"+model.config.mlp_bias={mlp_bias}"])
    model = instantiate(cfg.model, _convert_="all").model
    start, size, windows = 2, 2, tokens(8)
    m, h_i, y = naive_mlp_fit(model, start, size, windows)
    expected = torch.linalg.lstsq(m, y).solution
    every = LinearReplacement(batch_size=3, exclude_positions=[])  # the official fit: all tokens
    got, n_tokens = every.fit(model, start, size, windows)
    assert n_tokens == windows.numel()
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)

    every(model, [2, 3], windows, heldout=tokens(2, seed=9))
    assert model.config.num_hidden_layers == 4
    folded = model(input_ids=windows, output_hidden_states=True).hidden_states[start]
    by_hand = m @ expected + (h_i - m)
    torch.testing.assert_close(
        folded.double().reshape(by_hand.shape), by_hand, atol=1e-4, rtol=1e-4
    )


def test_linear_errors() -> None:
    with pytest.raises(LayerpruneError, match=r"Gemma3DecoderLayer.*post_feedforward_layernorm"):
        LinearReplacement()(load("tiny_gemma3").model, [2, 3], tokens(4))
    with pytest.raises(LayerpruneError, match="block start 0 has none"):
        LinearReplacement()(load("tiny_llama").model, [0, 1], tokens(4))


@pytest.mark.parametrize("kind", ["layer", "swiglu", "ffn", "ffn_residual"])
def test_training_reduces_heldout_mse(kind: str) -> None:
    # Byte-level text, not random tokens: a module fitted on random tokens only memorises them.
    wiki = TextFile(n=40, seq_len=32, path=str(MIRROR / "text" / "wiki.txt"))
    windows = wiki.windows(byte_tokenizer())
    model = load("tiny_llama").model
    lr = {"layer": 3e-3, "ffn_residual": 3e-3, "ffn": 1e-2, "swiglu": 3e-2}[kind]
    step = LayerReplacement(kind=kind, epochs=4, lr=lr, **FAST)
    report = step(model, [1, 2, 3], windows[:32], heldout=windows[32:])
    assert report.heldout_mse_after < 0.7 * report.heldout_mse_before
    assert report.heldout_cosine_after > report.heldout_cosine_before
    assert (report.steps, report.train_windows, report.heldout_windows) == (32, 32, 8)
    assert (report.train_tokens, report.tokens_per_step) == (32 * 4 * 32, 4 * 32)
    assert report.block_size == 3 and report.layers_added == 1
    assert model.config.num_hidden_layers == decoder_stack(model).num_layers == 4
    # position 0 left out by default (mse): the fitted tokens are the rest
    assert (report.heldout_tokens, report.heldout_fitted_tokens) == (8 * 32, 8 * 31)
    assert report.settings["exclude_positions"] == [0]
    if kind == "ffn_residual":  # zero output projection: the untrained module is plain pruning
        assert report.heldout_mse_before == pytest.approx(report.heldout_mse_identity)
        assert report.params_added == 64 * 256 * 2 + 256 + 64 + 64
    if kind == "ffn":  # the authors' W2 ReLU(W1 h + b1) + b2, no norm
        assert report.params_added == 64 * 256 * 2 + 256 + 64
    if kind == "swiglu":  # gate, up, down of the model's intermediate size 128, no bias
        assert report.params_added == 3 * 64 * 128
    d = report.to_dict()
    assert d["params_net"] == d["params_removed"] - d["params_added"]


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("tiny_llama", "layer"),
        ("tiny_gemma3", "layer"),
        ("tiny_qwen2", "layer"),
        ("tiny_llama", "swiglu"),
        ("tiny_gemma3", "ffn"),
    ],
)
def test_replaced_model_is_the_dense_one_with_the_module_in_place(
    name: str, kind: str, tmp_path: Path
) -> None:
    model = load(name).model
    dense = skip_reference(model, [2, 3])  # the block's other layers bypassed
    LayerReplacement(kind=kind, loss="lm", **FAST)(model, [1, 2, 3], tokens(12))
    decoder_stack(dense).layers[1] = decoder_stack(model).layers[1]
    ids = tokens(2, seq_len=20, seed=5)  # longer than Gemma3's sliding window of 8
    torch.testing.assert_close(logits(model, ids), logits(dense, ids), atol=1e-6, rtol=0)
    assert model.config.layerprune["kept_layers"] == [0, 1, 4, 5]
    if name == "tiny_gemma3":
        assert model.config.layer_types[1] == "full_attention"
    if kind == "layer":  # a standard decoder layer: a standard checkpoint
        assert_round_trip(model, ids, tmp_path)


def naive_lm_loss(model: PreTrainedModel, ids: torch.Tensor) -> float:
    """Mean next-token cross-entropy from the logits, by hand."""
    lp = torch.log_softmax(logits(model, ids)[:, :-1], dim=-1)
    return float(-lp.gather(-1, ids[:, 1:, None]).mean())


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gemma3"])
def test_replacement_reports_the_heldout_lm_loss_of_plain_removal_and_of_the_result(
    name: str,
) -> None:
    model = load(name).model
    plain = skip_reference(model, [1, 2, 3])  # the whole block bypassed
    heldout = tokens(3, seq_len=20, seed=4)
    step = LayerReplacement(kind="layer", epochs=1, lr=3e-3, **FAST)
    report = step(model, [1, 2, 3], tokens(8), heldout=heldout)
    assert report.heldout_lm_loss_identity == pytest.approx(naive_lm_loss(plain, heldout), 1e-5)
    assert report.heldout_lm_loss_after == pytest.approx(naive_lm_loss(model, heldout), 1e-5)
    assert report.heldout_lm_loss_before != report.heldout_lm_loss_after  # it trained


def test_linear_and_lora_round_trip(tmp_path: Path) -> None:
    model = load("tiny_llama").model
    LinearReplacement()(model, [2, 3], tokens(6))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = LoraHealing(steps=3, lr=1e-3, **FAST)(model, [], tokens(12))
    assert not [w for w in caught if issubclass(w.category, FutureWarning)]  # peft's, filtered
    assert report.steps == 3 and report.heldout_lm_loss_after is not None
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert [s["method"] for s in model.config.layerprune_recovery["steps"]] == [
        "replace_linear",
        "lora_heal",
    ]
    assert_round_trip(model, tokens(2, seed=5), tmp_path)


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gemma3"])
@pytest.mark.parametrize(("kind", "loss"), [("ffn", "mse"), ("ffn_residual", "nmse"),
                                            ("swiglu", "mse"), ("swiglu", "lm")])  # fmt: skip
def test_mlp_replacements_round_trip_through_save_recovered(
    name: str, kind: str, loss: str, tmp_path: Path
) -> None:
    model = load(name).model
    LayerReplacement(kind=kind, loss=loss, lr=1e-2, **FAST)(model, [2, 3], tokens(12))
    ids = tokens(2, seq_len=20, seed=5)
    expected = logits(model, ids)
    config = model.config.to_dict()
    save_recovered(model, tmp_path)
    torch.testing.assert_close(logits(model, ids), expected, atol=0, rtol=0)  # left as it was
    assert model.config.to_dict() == config
    reloaded = load_recovered(tmp_path, dtype=torch.float32)
    assert reloaded.config.num_hidden_layers == decoder_stack(reloaded).num_layers == 5
    assert reloaded.config.layerprune == model.config.layerprune
    torch.testing.assert_close(logits(reloaded, ids), expected, atol=1e-6, rtol=0)
    # Plain transformers must not load it as the block-pruned model without its replacement.
    with pytest.raises(ValueError, match=r"layerprune\.recovery\.load_recovered"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_bad_inputs_name_the_step() -> None:
    model = load("tiny_llama").model
    with pytest.raises(
        LayerpruneError, match=r"recovery 'layer' needs a contiguous block; got layers \[1, 3\]"
    ):
        LayerReplacement()(model, [3, 1], tokens(12))
    assert contiguous_block([4, 2, 3]) == (2, 3)
    with pytest.raises(LayerpruneError, match="needs at least batch_size=4 training windows"):
        LayerReplacement(kind="ffn", **FAST)(model, [1, 2], tokens(4))
    with pytest.raises(
        LayerpruneError,
        match="unknown recovery kind 'mlp'; allowed: layer, ffn, ffn_residual, swiglu",
    ):
        LayerReplacement(kind="mlp", **FAST)
    with pytest.raises(
        LayerpruneError, match="unknown recovery loss 'l1'; allowed: mse, nmse, cosine, lm"
    ):
        LayerReplacement(kind="layer", loss="l1", **FAST)
    with pytest.raises(LayerpruneError, match=r"loss lm with exclude_positions \[0\]"):
        LayerReplacement(loss="lm", exclude_positions=[0], **FAST)
    assert LayerReplacement(loss="lm").positions_left_out == []  # the default: none
    with pytest.raises(LayerpruneError, match=r"ridge 0\.5 with loss cosine; allowed: ridge 0"):
        LinearReplacement(loss="cosine", ridge=0.5)
    with pytest.raises(
        LayerpruneError, match=r"batch_tokens 100; allowed: a multiple of batch_size x"
    ):
        LayerReplacement(batch_tokens=100, **FAST)(model, [1, 2], tokens(12))
    with pytest.raises(LayerpruneError, match=r"block \[5, 7\) is out of range"):
        LayerReplacement(**FAST)(model, [5, 6], tokens(12))


@pytest.mark.parametrize("loss", ["mse", "lm"])
def test_diverging_loss_stops_and_leaves_the_model_unchanged(loss: str) -> None:
    model = load("tiny_llama").model
    before = weights(model)
    with pytest.raises(
        LayerpruneError, match=r"recovery 'layer': the loss became (nan|inf) at step 2 of"
    ):
        LayerReplacement(loss=loss, lr=1e30, **FAST)(model, [1, 2], tokens(12))
    assert_unchanged(model, before, 6)
    with pytest.raises(
        LayerpruneError, match=r"recovery 'lora': the loss became (nan|inf) at step \d"
    ):
        LoraHealing(steps=3, lr=1e30, **FAST)(model, [], tokens(12))
    assert_unchanged(model, before, 6)


RECOVERIES = ["none", "layer", "layer_lm", "swiglu", "ffn", "ffn_residual", "linear",
              "linear_cosine", "lora", "layer_lora"]  # fmt: skip


@pytest.mark.parametrize("name", RECOVERIES)
def test_recovery_configs_instantiate_callable_steps(name: str) -> None:
    cfg = compose_config([f"recovery={name}", "recovery.train_data=null"])
    recovery = Recovery(build(cfg.recovery.steps), train_data=None)
    steps = recovery.steps
    assert isinstance(steps, dict) and list(steps) == list(cfg.recovery.steps)
    assert all(isinstance(s, RecoveryStep) for s in steps.values())
    if steps:
        path = compose_config([f"recovery={name}"]).recovery.train_data.path
        assert path.endswith("text/wiki.txt")
    loaded = load("tiny_llama")
    recovery.steps = {
        k: dataclasses.replace(s, epochs=1, progress=False)
        if isinstance(s, LinearReplacement)
        else dataclasses.replace(s, **FAST, lr=1e-3)
        for k, s in steps.items()
    }
    recovery.train_data = TinyWindows(tokens(10))
    removed = [2, 3]
    reports = recovery.apply(loaded, removed, recovery.windows(loaded))
    assert len(reports) == len(steps) and all(r["method"] for r in reports)
    model = loaded.model
    net = len(removed) - sum(s.layers_added for s in steps.values())
    assert model.config.num_hidden_layers == decoder_stack(model).num_layers == 6 - net


@pytest.mark.parametrize(
    ("step", "expected"),
    [("layer", LayerReplacement()), ("swiglu", LayerReplacement(kind="swiglu")),
     ("ffn", LayerReplacement(kind="ffn", betas=[0.9, 0.95], warmup_ratio=0.03, min_lr=5e-6,
                              grad_clip=1.0)),
     ("ffn_residual", LayerReplacement(kind="ffn_residual")),
     ("layer_lm", LayerReplacement(loss="lm", betas=[0.9, 0.95], grad_clip=1.0)),
     ("linear", LinearReplacement()), ("linear_cosine", LinearReplacement(loss="cosine")),
     ("lora", LoraHealing())],
)  # fmt: skip
def test_step_configs_hold_the_step_defaults(step: str, expected: RecoveryStep) -> None:
    """A step YAML lists every setting, with the dataclass default (or the variant's own
    values), so none can drift."""
    cfg = compose_config([f"+recovery/step@step={step}", "seed=0"])
    assert build(cfg.step) == expected
    listed = set(cfg.step) - {"_target_"}
    assert listed == {f.name for f in dataclasses.fields(type(expected))} - {"progress"}


def test_a_step_setting_is_overridden_by_its_name() -> None:
    cfg = compose_config(["recovery=layer_lora", "recovery.steps.replace.lr=1e-4",
                          "recovery.steps.lora.rank=4", "seed=3"])  # fmt: skip
    steps = Recovery(build(cfg.recovery.steps), train_data=None).steps
    assert isinstance(steps, dict)
    assert (steps["replace"].lr, steps["replace"].seed) == (1e-4, 3)
    assert (steps["lora"].rank, steps["lora"].lr) == (4, 2e-4)


@pytest.mark.parametrize(
    "steps",
    [
        {"lora": LoraHealing(), "replace": LayerReplacement()},
        {"replace": LayerReplacement(), "linear": LinearReplacement()},
    ],
)
def test_a_pruning_step_must_come_first_and_alone(steps: dict[str, RecoveryStep]) -> None:
    order = ", ".join(f"{k} ({type(s).__name__})" for k, s in steps.items())
    with pytest.raises(LayerpruneError, match="at most one step that prunes") as error:
        Recovery(steps=steps, train_data=None)
    assert f"run in the order {order};" in str(error.value)
    assert "\n" not in str(error.value)
    assert Recovery(steps=[LayerReplacement(), LoraHealing(), LoraHealing()], train_data=None)


def test_recovery_steps_without_training_text_are_one_clear_error() -> None:
    recovery = Recovery(steps={"lora": LoraHealing()}, train_data=None)
    with pytest.raises(LayerpruneError, match="LoraHealing train on text, but train_data is null"):
        recovery.windows(load("tiny_llama"))
    assert Recovery(steps={}, train_data=None).windows(load("tiny_llama")) is None
