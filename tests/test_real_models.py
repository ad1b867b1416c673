"""Real pretrained models (GGUF packages from requirements-models.txt): conversion and surgery."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from layerprune.files import cache_root
from layerprune.models import CONVERSION_CHECK_TEXT, _package_file

from .conftest import compose_config, load
from .surgery_checks import check_pruned_model, logits

pytestmark = pytest.mark.integration


def test_converted_smollm2_equals_the_gguf_model() -> None:
    loaded = load("smollm2_135m", device="cpu")
    entries = list((cache_root() / "models").glob("smollm2_135m-*"))
    assert len(entries) == 1
    source = json.loads((entries[0] / "layerprune_source.json").read_text())
    assert source["check_max_abs_logit_diff"] <= 1e-4
    cfg = compose_config(["model=smollm2_135m"]).model
    gguf = _package_file(cfg.parts[0], list(cfg.pip), cfg.name)
    direct = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    ids = torch.tensor([loaded.tokenizer(CONVERSION_CHECK_TEXT + " the model").input_ids])
    torch.testing.assert_close(
        logits(loaded.model, ids), logits(direct.eval(), ids), atol=1e-4, rtol=0
    )
    assert loaded.model.config.num_hidden_layers == 30


@pytest.mark.parametrize(
    ("name", "removed", "seq"),
    [
        ("smollm2_135m", [3, 12, 13, 14, 29], 64),
        # Gemma-3-270M: full attention at 5, 11, 17; 600 tokens cross its 512-token sliding window
        ("gemma3_270m", [4, 5, 9], 600),
    ],
)
def test_pruned_real_model_is_correct(
    name: str, removed: list[int], seq: int, tmp_path: Path
) -> None:
    loaded = load(name, device="cpu")
    if name == "gemma3_270m":
        assert loaded.model.config.layer_types[5] == "full_attention"
        assert loaded.model.config.sliding_window < seq
    text = Path(compose_config([]).data.mirror, "text", "wiki.txt").read_text()[:20000]
    ids = loaded.tokenizer(text, return_tensors="pt").input_ids[:, :seq]
    assert ids.shape[1] == seq
    check_pruned_model(loaded.model, removed, ids, tmp_path, atol=2e-3)


def test_smollm2_dense_metrics_equal_lm_eval_run_directly(tmp_path: Path) -> None:
    """layerprune's in-memory evaluation against lm-eval loading the same weights itself."""
    import lm_eval

    from layerprune.evaluation import EvalSuite, chosen_documents, evaluate, prepare

    loaded = load("smollm2_135m", device="cpu")
    (folder,) = (cache_root() / "models").glob("smollm2_135m-*")
    suite = EvalSuite(tasks=["piqa", "arc_easy", "hellaswag"], limit=20, batch_size=8)
    mirror = compose_config([]).data.mirror
    source = prepare(suite, mirror, tmp_path)
    documents = chosen_documents(suite, source)  # 20 seeded random documents per task
    assert documents and all(len(ids) == 20 for ids in documents.values())
    ours = evaluate(loaded, suite, source, documents)
    direct = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(folder), "dtype": "float32", "device": "cpu"},
        tasks=list(suite.tasks),
        samples=documents,
        batch_size=8,
        task_manager=source.manager,
        bootstrap_iters=0,
    )
    assert direct is not None
    for task in suite.tasks:
        for metric in ("acc", "acc_norm"):
            assert ours.metrics[task][metric] == direct["results"][task][f"{metric},none"]


@pytest.mark.parametrize("name", ["smollm2_135m", "gemma3_270m", "qwen2_5_coder_0_5b"])
def test_fast_backend_equals_hflm_on_real_weights(name: str) -> None:
    """Per request, the fast backend's log-likelihood and greedy flag against HFLM's, on
    contexts of 30 to 700 tokens of real text (past Gemma-3's 512-token sliding window) with
    1- to 12-token continuations, several per context."""
    from lm_eval.models.huggingface import HFLM

    from layerprune.fastlm import SharedContextLM

    try:
        loaded = load(name, device="cpu")
    except Exception as err:  # requirements-models.txt installs SmolLM2 and Gemma-3 only
        if "which is not installed" in str(err):
            pytest.skip(f"{name}'s model package is not installed")
        raise
    mirror = Path(compose_config([]).data.mirror)
    stream = loaded.tokenizer((mirror / "text" / "wiki.txt").read_text()[:20000]).input_ids
    requests, at = [], 0
    for n_ctx, options in [(30, [1, 1, 1, 1]), (120, [3, 12, 5]), (700, [4, 9]), (260, [1])]:
        context = stream[at : at + n_ctx]
        at += n_ctx
        for n in options:
            requests.append((("", ""), context, stream[at : at + n]))
            at += 7
    args = {"pretrained": loaded.model, "tokenizer": loaded.tokenizer, "device": "cpu"}
    reference = HFLM(**args, batch_size=4)._loglikelihood_tokens(requests, disable_tqdm=True)
    got = SharedContextLM(**args, batch_tokens=1024)._loglikelihood_tokens(requests, True)
    for (ll, greedy), (ll_ref, greedy_ref) in zip(got, reference, strict=True):
        assert abs(ll - ll_ref) <= 1e-4
        assert greedy == greedy_ref
