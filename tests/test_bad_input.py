"""Bad input fails in one line naming the key, the bad value and what is allowed: before any
model is loaded when the config alone decides, right after loading when the model does; never
with a traceback, never leaving results behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

import layerprune.models
from layerprune.app import run
from layerprune.errors import LayerpruneError

from .conftest import MIRROR, compose_config
from .test_app import TINY, cli

RESULTS = {"scores.json", "plan.json", "metrics.json", "importance.png"}
NO_GPU = not torch.cuda.is_available()

# (overrides, expected start of the message): the config alone decides, no model is loaded
EARLY = [
    ("sparsity=abc", "sparsity: abc; allowed: a number in (0, 1)"),
    ("sparsity=0", "sparsity: 0; allowed: a number in (0, 1)"),
    ("sparsity=1.5", "sparsity: 1.5; allowed: a number in (0, 1)"),
    ("sparsity_unit=layers sparsity=2.5", "sparsity: 2.5; allowed: a whole number of layers"),
    ("sparsity_unit=blocks", "sparsity_unit: blocks; allowed: layers, layer_ratio, param_ratio"),
    ("seed=-1", "seed: -1; allowed: an integer >= 0"),
    ("seed=abc", "seed: abc; allowed: an integer >= 0"),
    ("++first_start=-1", "first_start: -1; allowed: an integer >= 0"),
    ("save_model=maybe", "save_model: maybe; allowed: true, false"),
    ("scoring.batch_size=0", "scoring.batch_size: 0; allowed: an integer >= 1"),
    ("scoring.convention=bogus", "scoring.convention: bogus; allowed: residual, hf_hidden_states"),
    ("scoring.cache=2", "scoring.cache: 2; allowed: true, false"),
    ("scorer.selection=blocks", "scorer.selection: blocks; allowed: independent, contiguous"),
    ("calibration.n=0", "calibration.n: 0; allowed: an integer >= 1"),
    ("calibration.n=many", "calibration.n: many; allowed: an integer >= 1"),
    ("calibration.seq_len=1", "calibration.seq_len: 1; allowed: an integer >= 2"),
    ("calibration=file", "calibration.path: ??? (not set); allowed: the path of a UTF-8 text file"),
    ("calibration.path=/no/such.txt", "calibration.path: /no/such.txt (no such file); allowed"),
    ("calibration.path={tmp}", "calibration.path: {tmp} (a folder); allowed"),
    ("calibration.path={tmp}/latin1.txt", "calibration.path: {tmp}/latin1.txt (not UTF-8"),
    ("model.dtype=float64", "model.dtype: float64; allowed: auto, float32, bfloat16, float16"),
    ("model.device=tpu", "model.device: tpu; allowed: auto, cpu, cuda, cuda:<index>, mps"),
    ("model.config.num_hidden_layers=0", "model.config.num_hidden_layers: 0; allowed: an integer"),
    ("model=local", "model.path: ??? (not set); allowed: a hub id or a folder"),
    ("logger=wandb logger.mode=loud", "logger.mode: loud; allowed: offline, online, disabled"),
    ("eval=quick eval.tasks=[piqa,piqa,arc_easy]", "eval.tasks: ['piqa', 'piqa', 'arc_easy']; "
     "allowed: each task once ('piqa' is listed twice)"),
    ("eval=quick eval.tasks=[]", "eval.tasks: []; allowed: a non-empty list of lm-eval task names"),
    ("eval=quick eval.headline.hellaswag=acc_nrom", "eval.headline.hellaswag: acc_nrom; allowed: "
     "acc, acc_norm"),
    ("eval=quick eval.limit=0", "eval.limit: 0; allowed: an integer >= 1 or null"),
    ("eval=quick eval.num_fewshot=-1", "eval.num_fewshot: -1; allowed: an integer >= 0"),
    ("eval=quick eval.batch_size=0", "eval.batch_size: 0; allowed: an integer >= 1"),
    ("eval=quick eval.perplexity.seq_len=0", "eval.perplexity.seq_len: 0; allowed: an integer"),
    ("eval=quick eval.perplexity.stride=0", "eval.perplexity.stride: 0; allowed: null or"),
    ("eval=quick eval.perplexity.path=/no/ppl.txt", "eval.perplexity.path: /no/ppl.txt (no such"),
    ("scorer=streamline recovery=layer recovery.train_data.n=1",
     "recovery.train_data.n: 1; allowed: an integer >= 9"),
    ("scorer=streamline recovery=layer recovery.train_data.path=/no/train.txt",
     "recovery.train_data.path: /no/train.txt (no such file)"),
    ("scorer=streamline recovery=layer recovery.train_data.seq_len=1",
     "recovery.train_data.seq_len: 1; allowed: an integer >= 2"),
    ("scorer=streamline recovery=layer recovery.steps.replace.lr=-1",
     "recovery.steps.replace.lr: -1; allowed: a number > 0"),
    ("scorer=streamline recovery=layer recovery.steps.replace.epochs=0",
     "recovery.steps.replace.epochs: 0; allowed: an integer >= 1"),
    ("scorer=streamline recovery=lora recovery.steps.lora.rank=0",
     "recovery.steps.lora.rank: 0; allowed: an integer >= 1"),
    ("scorer=block_influence recovery=layer", "scorer.selection: independent; allowed: contiguous"),
    ("scorer=streamline recovery=layer recovery.budget.tokens=0",
     "recovery.budget.tokens: 0; allowed: an integer >= 1 or null"),
    ("scorer=streamline recovery=layer recovery.budget.batch_tokens=1000",
     "recovery.budget.batch_tokens: 1000; allowed: a multiple of batch_size x seq_len = 8 x 512 "
     "= 4096 tokens (recovery.steps.replace)"),
    ("scorer=streamline recovery=layer recovery.steps.replace.batch_tokens=6000",
     "recovery.steps.replace.batch_tokens: 6000; allowed: a multiple of batch_size x seq_len"),
    ("scorer=streamline recovery=layer recovery.steps.replace.kind=mlp",
     "recovery.steps.replace.kind: mlp; allowed: layer, ffn, ffn_residual, swiglu"),
    ("scorer=streamline recovery=layer recovery.steps.replace.loss=l1",
     "recovery.steps.replace.loss: l1; allowed: mse, nmse, cosine, lm"),
    ("scorer=streamline recovery=layer recovery.steps.replace.exclude_positions=[-1]",
     "recovery.steps.replace.exclude_positions: [-1]; allowed: null (the loss's default) or a "
     "list of positions >= 0"),
    ("scorer=streamline recovery=layer recovery.steps.replace.exclude_positions=0",
     "recovery.steps.replace.exclude_positions: 0; allowed: null (the loss's default) or a "
     "list of positions >= 0"),
    ("scorer=streamline recovery=layer recovery.steps.replace.exclude_positions=[0,512]",
     "recovery.steps.replace.exclude_positions: [0, 512]; allowed: positions < "
     "recovery.train_data.seq_len = 512, the length of the training windows"),
    ("scorer=streamline recovery=linear recovery.train_data.seq_len=64 "
     "recovery.steps.linear.exclude_positions=[64]",
     "recovery.steps.linear.exclude_positions: [64]; allowed: positions < "
     "recovery.train_data.seq_len = 64"),
    ("scorer=streamline recovery=layer recovery.steps.replace.exclude_outliers=0.5",
     "recovery.steps.replace.exclude_outliers: 0.5; allowed: null or a factor > 1"),
    ("scorer=streamline recovery=layer_lm recovery.steps.replace.exclude_positions=[0]",
     "recovery.steps.replace.loss: lm with exclude_positions [0] and exclude_outliers null; "
     "allowed: mse, nmse or cosine"),
    ("scorer=streamline recovery=layer recovery.steps.replace.betas=[0.9]",
     "recovery.steps.replace.betas: [0.9]; allowed: two numbers in [0, 1)"),
    ("scorer=streamline recovery=linear_cosine recovery.steps.linear.ridge=0.1",
     "recovery.steps.linear.ridge: 0.1; allowed: 0 with loss cosine"),
    ("scorer=streamline recovery=linear recovery.steps.linear.loss=lm",
     "recovery.steps.linear.loss: lm; allowed: mse, nmse, cosine"),
    ("scorer=streamline recovery=layer recovery.activation_cache=maybe",
     "recovery.activation_cache: maybe; allowed: true, false"),
    ("scorer=streamline recovery=layer recovery.cache_dtype=int8",
     "recovery.cache_dtype: int8; allowed: float16, bfloat16, float32"),
    ("model=tiny_gemma3 scorer=streamline recovery=linear",
     "recovery: linear (LinearReplacement) with model_type gemma3_text; allowed: layer, swiglu"),
    ("experiment=sleb scorer.selection=contiguous", "scorer.selection: contiguous; allowed: "
     "independent (sleb measures the model without single layers"),
    ("experiment=sleb recovery=layer", "recovery: replace (LayerReplacement) with scorer sleb; "
     "allowed: a recovery without a block replacement (none, lora, lora_shortened)"),
    ("scorer=ppl scorer.keep_first=-1", "scorer.keep_first: -1; allowed: an integer >= 0"),
    ("scorer=sleb scorer.latter_barrier=x", "scorer.latter_barrier: x; allowed: an integer >= 0"),
    ("scorer=taylor scorer.batch_size=0", "scorer.batch_size: 0; allowed: an integer >= 1"),
    ("experiment=search +search.settings.ppl.bogus=1",
     "search.settings.ppl.bogus: 1; allowed: a setting of scorer ppl: one of keep_first, "
     "keep_last"),
    ("experiment=search +search.settings.block_influence.bogus=1",
     "search.settings.block_influence.bogus: 1; allowed: a setting of scorer block_influence: "
     "none"),
    ("experiment=search +search.settings.ppl.keep_first=-1",
     "search.settings.ppl.keep_first: -1; allowed: an integer >= 0"),
    ("experiment=search +search.settings.sleb.early_barrier=x",
     "search.settings.sleb.early_barrier: x; allowed: an integer >= 0"),
    ("experiment=search +search.settings.sleb.early_barrier=1.5",
     "search.settings.sleb.early_barrier: 1.5; allowed: an integer >= 0"),
    ("experiment=search +search.settings.taylor.batch_size=0",
     "search.settings.taylor.batch_size: 0; allowed: an integer >= 1"),
    ("experiment=search +search.settings.random.seed=3",
     "search.settings.random.seed: 3; allowed: not set here: search.random_seeds sets the seed"),
    ("experiment=search +search.settings.sleb.selection=contiguous",
     "search.settings.sleb.selection: contiguous; allowed: not set here: search.selections"),
    ("experiment=search +search.settings.ppl=4",
     "search.settings.ppl: 4; allowed: a mapping {{setting: value}} of keep_first, keep_last"),
    ("experiment=search search.evaluate=all", "search.evaluate: all; allowed: top, spread"),
    pytest.param(
        "model.device=cuda", "model.device: cuda; allowed: auto or cpu: this machine has no GPU",
        marks=pytest.mark.skipif(not NO_GPU, reason="a GPU is present"),
    ),
]  # fmt: skip

# the model decides: checked right after loading, before scoring
AFTER_LOAD = [
    ("calibration.seq_len=1024", "calibration.seq_len: 1024; allowed: <= 512 tokens, the context"),
    ("sparsity_unit=layers sparsity=6", "sparsity: 6.0; allowed: a target that removes one to 5"),
    ("scorer=streamline recovery=layer recovery.train_data.n=12 sparsity_unit=layers sparsity=5",
     "sparsity: 5.0; allowed: a target that keeps at least one of the 6 layers"),
    ("eval=quick eval.perplexity.seq_len=2048",
     "eval.perplexity.seq_len: 2048; allowed: <= 512 tokens"),
    ("scorer=sleb sparsity_unit=layers sparsity=5", "sparsity: 5.0; allowed: a target that removes "
     "at most 4 of the 6 layers of tiny_llama with scorer sleb (this one removes 5; it never "
     "removes the first 1 or the last 1 remaining layer(s): scorer.early_barrier"),
    ("scorer=taylor", "sparsity: 0.25; allowed: a target that removes at most 0 of the 6 layers "
     "of tiny_llama with scorer taylor (this one removes 2; it keeps the first 4 and the last 2 "
     "layers: scorer.keep_first, scorer.keep_last)"),
]  # fmt: skip


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait ".encode("latin-1") * 50)
    return tmp_path


def overrides(text: str, tmp: Path) -> list[str]:
    return [*TINY, *text.format(tmp=tmp).split()]


def fail_if_loaded(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("a model was loaded before the config was checked")


@pytest.mark.parametrize(("override", "message"), EARLY)
def test_config_errors_come_before_any_model(
    override: str, message: str, inputs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for loader in ("random_init", "from_pretrained", "from_packaged_gguf"):
        monkeypatch.setattr(layerprune.models, loader, fail_if_loaded)
    out = inputs / "run"
    with pytest.raises(LayerpruneError) as err:
        run(compose_config(overrides(override, inputs)), out)
    assert str(err.value).startswith(message.format(tmp=inputs)), str(err.value)
    assert "\n" not in str(err.value)
    assert not out.exists() or not RESULTS & {p.name for p in out.iterdir()}


@pytest.mark.parametrize(("override", "message"), AFTER_LOAD)
def test_model_errors_come_before_scoring(override: str, message: str, inputs: Path) -> None:
    out = inputs / "run"
    with pytest.raises(LayerpruneError) as err:
        run(compose_config(overrides(override, inputs)), out)
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value)
    assert not (inputs / "cache" / "scores").exists()
    assert not out.exists() or not RESULTS & {p.name for p in out.iterdir()}


def test_unused_training_text_is_not_read(tmp_path: Path) -> None:
    cfg = compose_config([*TINY, "recovery=none", "recovery.train_data.path=/no/such.txt"])
    assert run(cfg, tmp_path)["recovery"] == []


def test_a_mirror_file_that_is_not_json_is_one_error(tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    shutil.copytree(MIRROR / "text", mirror / "text")
    piqa = mirror / "hf" / "baber" / "piqa" / "default"
    piqa.mkdir(parents=True)
    (piqa / "validation.jsonl").write_text('{"goal": "x", "sol1": "a"\nnot json\n')
    cfg = compose_config([
        *TINY, "eval=quick", "eval.tasks=[piqa]", "eval.limit=2", "eval.perplexity=null",
        f"data.mirror={mirror}", f"paths.cache={tmp_path / 'cache'}",
    ])  # fmt: skip
    with pytest.raises(LayerpruneError) as err:
        run(cfg, tmp_path / "run")
    assert str(err.value).startswith(f"data.mirror: {piqa / 'validation.jsonl'}")
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_a_mirror_file_lacking_a_prompt_field_is_one_error(tmp_path: Path) -> None:
    # Jinja renders a missing field as "": without the check the task would score garbage
    mirror = tmp_path / "mirror"
    shutil.copytree(MIRROR / "text", mirror / "text")
    piqa = mirror / "hf" / "baber" / "piqa" / "default"
    piqa.mkdir(parents=True)
    rows = [{"question": "x", "sol1": "a", "sol2": "b", "label": 0}] * 3
    (piqa / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = compose_config([
        *TINY, "eval=quick", "eval.tasks=[piqa]", "eval.limit=2", "eval.perplexity=null",
        f"data.mirror={mirror}", f"paths.cache={tmp_path / 'cache'}",
    ])  # fmt: skip
    with pytest.raises(LayerpruneError) as err:
        run(cfg, tmp_path / "run")
    assert str(err.value) == (
        f"data.mirror: {piqa / 'validation.jsonl'} (rows lack ['goal'], which task piqa reads); "
        "allowed: rows with the fields of the task's prompts"
    )


def test_prompt_fields_are_read_from_the_templates() -> None:
    from layerprune.mirror import prompt_fields

    cfg = {"doc_to_text": "Q: {{goal}}\nA:", "doc_to_target": "label",
           "doc_to_choice": "{{[sol1, sol2]}}"}  # fmt: skip
    assert prompt_fields(cfg) == {"goal", "label", "sol1", "sol2"}
    assert prompt_fields({**cfg, "doc_to_choice": ["no", "yes"]}) == {"goal", "label"}
    assert prompt_fields({**cfg, "process_docs": "utils.process_docs"}) is None
    assert prompt_fields({**cfg, "doc_to_text": "/x/preprocess.doc_to_text"}) is None


def test_cache_under_a_file_is_one_error_when_the_run_folder_is_unwritable(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(LayerpruneError) as err:
        run(compose_config(TINY), tmp_path / "file" / "run")
    assert str(err.value).startswith(f"{tmp_path / 'file' / 'run'}: Not a directory; allowed:")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sparsity=abc", "sparsity: abc; allowed"),
        ("eval=quick eval.tasks=[piqa,piqa,arc_easy]", "eval.tasks: ['piqa', 'piqa', 'arc_easy']"),
        ("calibration.path={tmp}/latin1.txt", "calibration.path: {tmp}/latin1.txt (not UTF-8"),
        (
            "experiment=ppl scorer.selection=contiguous",
            "scorer.selection: contiguous; allowed: independent",
        ),
        (
            "experiment=search +search.settings.sleb.early_barrier=x",
            "search.settings.sleb.early_barrier: x; allowed: an integer >= 0",
        ),
    ],
)
def test_cli_prints_one_line_and_exits_2(override: str, message: str, inputs: Path) -> None:
    result = cli(*overrides(override, inputs), "hydra.run.dir=run", cwd=inputs)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [lines[0]] and lines[0].startswith(
        "layerprune: error: " + message.format(tmp=inputs)
    ), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not RESULTS & {p.name for p in (inputs / "run").iterdir()}


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = cli(*TINY, "seed=-1", "debug=true", "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("layerprune: error: seed: -1;")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("model_type", "model: tiny_llama (its config has no model_type); allowed:"),
        ("layers", "model: tiny_llama (0 decoder layers); allowed: a model with >= 2 layers"),
    ],
)
def test_a_loaded_model_without_layers_or_type_is_refused(change: str, message: str) -> None:
    from layerprune.recovery import Recovery
    from layerprune.selection import Sparsity
    from layerprune.validation import check_model

    from .conftest import load

    loaded = load("tiny_llama")
    if change == "model_type":
        loaded.model.config.model_type = ""
    else:
        del loaded.model.model.layers[:]
    with pytest.raises(LayerpruneError) as err:
        check_model(loaded, Sparsity(0.25), Recovery({}, None), {"calibration.seq_len": 32})
    assert str(err.value).startswith(message), str(err.value)


def test_cli_runs_folder_under_a_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    result = cli(*TINY, f"paths.runs={tmp_path / 'file' / 'runs'}", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"layerprune: error: paths.runs: {tmp_path / 'file' / 'runs'} "
        f"({tmp_path / 'file' / 'runs'}: Not a directory); allowed: a folder that can be created "
        "and written"
    ]


def test_a_criterion_refuses_layers_fed_per_window_inputs_before_scoring() -> None:
    """Layers that take an input computed from the tokens (as per-layer embeddings are) cannot
    be run one by one from cached states: refused after loading, with the scorer named."""
    from layerprune.criteria import SLEB, TaylorPlus
    from layerprune.layers import decoder_stack
    from layerprune.recovery import Recovery
    from layerprune.selection import Sparsity
    from layerprune.validation import check_model

    from .conftest import load

    loaded = load("tiny_llama")

    def per_window(_m: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        kwargs["position_ids"] = (1000 * args[0][..., 0]).long()  # differs between windows
        return args, kwargs

    decoder_stack(loaded.model).layers[2].register_forward_pre_hook(per_window, with_kwargs=True)
    lengths = {"calibration.seq_len": 32}
    with pytest.raises(LayerpruneError) as err:
        check_model(loaded, Sparsity(1, "layers"), Recovery({}, None), lengths, SLEB())
    assert str(err.value).startswith(
        "scorer: sleb on tiny_llama (llama: the decoder layers take an input (kwargs.position_ids) "
        "that differs between windows); allowed: a model whose decoder layers take"
    ), str(err.value)
    # Taylor+ runs the model whole: nothing to refuse
    check_model(loaded, Sparsity(1, "layers"), Recovery({}, None), lengths, TaylorPlus(1, 1))


@pytest.mark.parametrize(
    ("positions", "message"),
    [
        (0, "recovery 'linear': exclude_positions 0; allowed: null or positions >= 0"),
        ([True], "recovery 'linear': exclude_positions [True]; allowed: null or positions >= 0"),
    ],
)
def test_a_step_refuses_positions_that_are_not_a_list_in_one_line(
    positions: Any, message: str
) -> None:
    from layerprune.recovery import LinearReplacement

    with pytest.raises(LayerpruneError) as err:
        LinearReplacement(exclude_positions=positions)
    assert str(err.value).startswith(message), str(err.value)


def test_a_step_refuses_positions_beyond_its_windows_before_any_work() -> None:
    from layerprune.layers import decoder_stack
    from layerprune.recovery import LayerReplacement, LinearReplacement

    from .conftest import load

    model = load("tiny_llama").model
    windows = torch.randint(3, 250, (12, 24), generator=torch.Generator().manual_seed(0))
    steps = {
        "linear": LinearReplacement(exclude_positions=[0, 24]),
        "layer": LayerReplacement(exclude_positions=[24], batch_size=2),
    }
    for name, step in steps.items():
        with pytest.raises(LayerpruneError) as err:
            step(model, [2, 3], windows)
        assert str(err.value) == (
            f"recovery '{name}': exclude_positions {step.exclude_positions}; allowed: "
            "positions < 24, the length of the windows"
        )
    assert len(decoder_stack(model).layers) == 6  # nothing removed
