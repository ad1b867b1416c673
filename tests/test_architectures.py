"""The layer adapter on OPT, Mistral and Qwen3: part names, scoring and recovery through it."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import PreTrainedModel

from layerprune.layers import decoder_stack
from layerprune.recovery import LayerReplacement, LinearReplacement, MLPReplacement, stream_block
from layerprune.scoring import collect_layer_stats

from .conftest import load
from .surgery_checks import logits, skip_reference
from .test_scoring import naive_stats

# The final norm of each family, named here independently of the adapter.
FINAL_NORM = {"tiny_opt": "final_layer_norm", "tiny_mistral": "norm", "tiny_qwen3": "norm"}
NAMES = list(FINAL_NORM)


def tokens(n: int, seq_len: int = 20, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 250, (n, seq_len), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def residual_states(name: str, model: PreTrainedModel, ids: torch.Tensor) -> list[torch.Tensor]:
    """h_0..h_L by hand: HF's hidden states, with the final norm off for the last one."""
    base = model.get_decoder()
    states = [h.double() for h in model(input_ids=ids, output_hidden_states=True).hidden_states]
    norm = getattr(base, FINAL_NORM[name])
    setattr(base, FINAL_NORM[name], nn.Identity())
    try:
        last = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    finally:
        setattr(base, FINAL_NORM[name], norm)
    return [*states[:-1], last.double()]


def test_adapter_names_the_parts_of_each_family() -> None:
    llama = decoder_stack(load("tiny_llama").model)
    assert llama.lora_targets() == (
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
    )  # fmt: skip
    assert llama.mlp_out(2, "t") is llama.layers[2].mlp.down_proj
    assert llama.attention_out(2, "t") is llama.layers[2].self_attn.o_proj
    assert llama.post_mlp_norm(2) is None
    assert llama.norm_eps == llama.config.rms_norm_eps
    opt = decoder_stack(load("tiny_opt").model)
    assert opt.lora_targets() == ("k_proj", "v_proj", "q_proj", "out_proj", "fc1", "fc2")
    assert opt.mlp_out(1, "t") is opt.layers[1].fc2
    assert opt.attention_out(1, "t") is opt.layers[1].self_attn.out_proj
    assert opt.norm_eps == 1e-5  # nn.LayerNorm's, OPTConfig has no epsilon
    assert decoder_stack(load("tiny_gemma3").model).post_mlp_norm(0) == "post_feedforward_layernorm"


@pytest.mark.parametrize("name", NAMES)
def test_scoring_sees_the_residual_states(name: str) -> None:
    model = load(name).model
    ids = tokens(3)
    cos, ang = naive_stats(residual_states(name, model, ids))
    stats = collect_layer_stats(model, ids, batch_size=2)
    torch.testing.assert_close(stats.cosine, cos, atol=1e-5, rtol=0)
    torch.testing.assert_close(stats.angular, ang, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_streamed_block_states_on_more_architectures(name: str) -> None:
    model = load(name).model
    ids = tokens(3)
    states = residual_states(name, model, ids)
    batches = list(stream_block(model, 2, 3, ids, batch_size=2))
    h_in = torch.cat([b.h_in for b in batches]).double()
    h_out = torch.cat([b.h_out for b in batches]).double()
    torch.testing.assert_close(h_in, states[2], atol=1e-5, rtol=0)
    torch.testing.assert_close(h_out, states[5], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["tiny_opt", "tiny_qwen3"])
def test_linear_fold_on_more_architectures(name: str) -> None:
    """T by hand from fc2's (OPT) or the MLP's output, then the folded model's state."""
    model = load(name).model
    start, size, ids = 2, 2, tokens(8)
    layer = decoder_stack(model).layers[start - 1]
    grabbed: list[torch.Tensor] = []
    mlp = layer.fc2 if name == "tiny_opt" else layer.mlp
    handle = mlp.register_forward_hook(lambda _m, _a, out: grabbed.append(out))
    states = residual_states(name, model, ids)
    handle.remove()
    dim = model.config.hidden_size
    m = grabbed[0].double().reshape(-1, dim)
    h_i = states[start].reshape(-1, dim)
    t = torch.linalg.lstsq(m, states[start + size].reshape(-1, dim) - (h_i - m)).solution
    fold = LinearReplacement(batch_size=3, exclude_positions=[])  # every token of every window
    fold(model, [2, 3], ids, heldout=ids[:1])
    folded = residual_states(name, model, ids)[start]
    torch.testing.assert_close(folded.reshape(-1, dim), m @ t + (h_i - m), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("name", "kind"), [("tiny_opt", "swiglu"), ("tiny_qwen3", "layer")])
def test_layer_replacement_on_more_architectures(name: str, kind: str) -> None:
    model = load(name).model
    dense = skip_reference(model, [2, 3])
    step = LayerReplacement(kind=kind, loss="lm", lr=1e-3, batch_size=4, progress=False)
    step(model, [1, 2, 3], tokens(12))
    module = decoder_stack(model).layers[1]
    if kind == "swiglu":  # a gated MLP of OPT's own width and activation
        assert isinstance(module, MLPReplacement) and module.gate is not None
        assert module.spec["inner_size"] == model.config.ffn_dim
        assert module.spec["activation"] == model.config.activation_function
    decoder_stack(dense).layers[1] = module
    ids = tokens(2, seq_len=20, seed=5)
    torch.testing.assert_close(logits(model, ids), logits(dense, ids), atol=1e-6, rtol=0)
