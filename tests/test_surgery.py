from __future__ import annotations

import copy

import pytest
import torch

from layerprune.errors import LayerpruneError
from layerprune.layers import decoder_stack
from layerprune.surgery import original_layer_indices, remove_layers

from .conftest import TINY_MODELS, load
from .surgery_checks import check_pruned_model, logits, skip_reference

SEQ = 24  # longer than the tiny models' sliding window (8)


def sample_ids(vocab: int, seq: int = SEQ, batch: int = 2) -> torch.Tensor:
    return torch.randint(3, vocab - 3, (batch, seq), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", TINY_MODELS)
@pytest.mark.parametrize("removed", [[1, 2], [0, 3, 5]])
def test_pruned_tiny_model_is_correct(name: str, removed: list[int], tmp_path) -> None:
    loaded = load(name)
    check_pruned_model(loaded.model, removed, sample_ids(len(loaded.tokenizer)), tmp_path, 1e-5)


def test_layer_types_are_sliced_to_the_kept_layers() -> None:
    model = load("tiny_gemma3").model
    before = list(model.config.layer_types)
    remove_layers(model, [1, 2])
    assert model.config.layer_types == [before[i] for i in (0, 3, 4, 5)]
    assert [layer.self_attn.layer_idx for layer in decoder_stack(model).layers] == [0, 1, 2, 3]


def test_stale_layer_types_give_wrong_logits() -> None:
    """Why slicing matters: the check above would catch a surgery that forgot it."""
    model = load("tiny_gemma3").model
    ids = sample_ids(model.config.vocab_size)
    expected = logits(skip_reference(model, [1]), ids)
    remove_layers(model, [1])
    model.config.layer_types = [*model.config.layer_types[1:], "full_attention"]  # stale
    assert not torch.allclose(logits(model, ids), expected, atol=1e-3)


def test_repeated_pruning_records_original_indices() -> None:
    model = load("tiny_llama").model
    remove_layers(model, [0, 2])  # keeps 1, 3, 4, 5
    remove_layers(model, [1])  # drops original 3
    assert original_layer_indices(model) == [1, 4, 5]
    assert model.config.layerprune == {"original_num_hidden_layers": 6, "kept_layers": [1, 4, 5]}


@pytest.mark.parametrize("removed", [[6], [-1], list(range(6))])
def test_bad_removals_are_rejected(removed: list[int]) -> None:
    model = load("tiny_llama").model
    before = copy.deepcopy(model.config.to_dict())
    with pytest.raises(LayerpruneError, match=r"out of range|cannot remove all"):
        remove_layers(model, removed)
    assert model.config.to_dict() == before


def test_unknown_architecture_is_a_clear_error() -> None:
    with pytest.raises(LayerpruneError, match="cannot find the decoder layers of Linear"):
        decoder_stack(torch.nn.Linear(2, 2))  # type: ignore[arg-type]


# Surgery acceptance on more layouts: OPT (model.decoder, fc1/fc2, learned positions), Mistral
# (one sliding window for every layer) and Qwen3 (per-layer layer_types, q/k norms).
MORE_TINY_MODELS = ["tiny_opt", "tiny_mistral", "tiny_qwen3"]


@pytest.mark.parametrize("name", MORE_TINY_MODELS)
@pytest.mark.parametrize("removed", [[1, 2], [0, 3, 5]])
def test_pruned_model_of_more_architectures_is_correct(
    name: str, removed: list[int], tmp_path
) -> None:
    loaded = load(name)
    check_pruned_model(loaded.model, removed, sample_ids(len(loaded.tokenizer)), tmp_path, 1e-5)


def test_qwen3_layer_types_are_sliced_and_attention_renumbered() -> None:
    model = load("tiny_qwen3").model
    before = list(model.config.layer_types)
    assert len(set(before)) == 2  # both kinds, so a stale list would change the masks
    remove_layers(model, [0, 3])
    assert model.config.layer_types == [before[i] for i in (1, 2, 4, 5)]
    assert [layer.self_attn.layer_idx for layer in decoder_stack(model).layers] == [0, 1, 2, 3]


def test_opt_attention_is_renumbered() -> None:
    model = load("tiny_opt").model
    remove_layers(model, [1, 4])
    assert [layer.self_attn.layer_idx for layer in model.model.decoder.layers] == [0, 1, 2, 3]
    assert model.config.num_hidden_layers == 4


def test_post_norm_opt_is_refused_clearly() -> None:
    model = load("tiny_opt", **{"config.do_layer_norm_before": "false"}).model
    assert model.model.decoder.final_layer_norm is None
    with pytest.raises(LayerpruneError, match=r"OPTForCausalLM has no final norm.*opt-350m"):
        decoder_stack(model)
