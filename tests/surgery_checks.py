"""Acceptance checks for pruned models, shared by the tiny-model and real-model tests."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from layerprune.layers import decoder_stack
from layerprune.speed import cache_keyword
from layerprune.surgery import remove_layers


class Skip(nn.Module):
    """A removed layer in the reference: passes the residual stream through unchanged."""

    def forward(self, hidden_states: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return hidden_states


def skip_reference(model: PreTrainedModel, removed: list[int]) -> PreTrainedModel:
    """The unpruned model with removed layers bypassed: every kept layer keeps its own mask."""
    ref = copy.deepcopy(model)
    layers = decoder_stack(ref).layers
    for i in removed:
        layers[i] = Skip()
    return ref


@torch.no_grad()
def logits(model: PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits.float()


@torch.no_grad()
def incremental_logits(model: PreTrainedModel, ids: torch.Tensor, prefix: int) -> torch.Tensor:
    keyword = cache_keyword(model)
    out = model(input_ids=ids[:, :prefix], use_cache=True)
    cache, steps = getattr(out, keyword), [out.logits]
    for t in range(prefix, ids.shape[1]):
        out = model(input_ids=ids[:, t : t + 1], use_cache=True, **{keyword: cache})
        cache = getattr(out, keyword)
        steps.append(out.logits)
    return torch.cat(steps, dim=1).float()


@torch.no_grad()
def greedy_by_hand(model: PreTrainedModel, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    for _ in range(new_tokens):
        nxt = logits(model, ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


def check_pruned_model(
    model: PreTrainedModel, removed: list[int], ids: torch.Tensor, tmp: Path, atol: float
) -> None:
    """(a) forward = kept layers run by hand, (b) KV-cache decoding = full forward,
    (c) generate = greedy by hand, (d) save + reload gives identical logits and records."""
    num = decoder_stack(model).num_layers
    reference = skip_reference(model, removed)
    expected = logits(reference, ids)
    kept = remove_layers(model, removed)
    assert kept == [i for i in range(num) if i not in removed]
    assert model.config.num_hidden_layers == len(kept) == decoder_stack(model).num_layers
    got = logits(model, ids)
    torch.testing.assert_close(got, expected, atol=atol, rtol=0)  # (a)

    torch.testing.assert_close(
        incremental_logits(model, ids, ids.shape[1] // 3), got, atol=atol, rtol=0
    )

    prompt = ids[:, :6]
    generated = model.generate(
        input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False
    )
    assert torch.equal(generated, greedy_by_hand(model, prompt, 4))  # (c)

    model.save_pretrained(tmp)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=model.dtype).eval()  # (d)
    assert reloaded.config.num_hidden_layers == len(kept)
    assert reloaded.config.layerprune["kept_layers"] == kept
    assert reloaded.config.layerprune["original_num_hidden_layers"] == num
    types = getattr(model.config, "layer_types", None)
    if types is not None:
        assert list(reloaded.config.layer_types) == list(types)
    torch.testing.assert_close(logits(reloaded, ids), got, atol=0, rtol=0)
