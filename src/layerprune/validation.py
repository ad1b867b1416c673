"""Checks of a run's inputs, so that a bad value fails in one line before the work it would spoil.

:func:`check_config` reads the composed config alone (types, ranges, choices, the files the run
will read, combinations the config decides) and runs before any object is built or any model
is loaded; :func:`check_job` checks what needs the built objects (a recovery against the
scorer and the model type the config names); :func:`check_model` checks what needs the loaded
model (context length, layer count, architecture support) before scoring.

Every failure is a :class:`~layerprune.errors.LayerpruneError` whose message reads
``<key>: <bad value>; allowed: <what is allowed>``. The config is read as plain data (the
resolved config, ``???`` where a mandatory value is unset), so this module needs no Hydra.
"""

from __future__ import annotations

import importlib
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from layerprune.criteria import ModelScorer
from layerprune.engine import UnsupportedLayers, capture_calls
from layerprune.errors import LayerpruneError
from layerprune.layers import decoder_stack, layer_param_counts, param_count
from layerprune.models import LoadedModel
from layerprune.recovery import LinearReplacement, Recovery
from layerprune.recovery.cache import DTYPES as CACHE_DTYPES
from layerprune.recovery.modules import KINDS
from layerprune.recovery.objective import TOKEN_LOSSES
from layerprune.recovery.replace import LOSSES
from layerprune.scoring import Scorer
from layerprune.selection import UNITS, Sparsity

CONVENTIONS = ("residual", "hf_hidden_states")
SELECTIONS = ("independent", "contiguous")
DTYPES = ("auto", "float32", "bfloat16", "float16")
LOGGER_MODES = ("offline", "online", "disabled")
DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
FLAGS = ("save_model", "force", "verbose", "debug")
# lm-eval's registered metrics (lm_eval.api.metrics) and the common ones tasks compute
HEADLINE_METRICS = (
    "acc", "acc_norm", "acc_mutual_info", "acc_all", "acc_bytes", "exact_match", "f1", "mcc",
    "bleu", "chrf", "ter", "brier_score", "likelihood", "perplexity", "word_perplexity",
    "byte_perplexity", "bits_per_byte",
)  # fmt: skip
# model types whose MLP output is normalised before the residual: ReplaceMe's fold is not exact
NORMED_MLP_TYPES = ("gemma2", "gemma3", "gemma3_text")
MISSING = object()


def invalid(key: str, value: Any, allowed: str) -> LayerpruneError:
    """The one-line error: which key, its bad value, what is allowed."""
    return LayerpruneError(f"{key}: {shown(value)}; allowed: {allowed}")


def shown(value: Any) -> str:
    if value is MISSING:
        return "??? (not set)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return value if value else "'' (empty)"
    return str(value)


Config = dict[str, Any]


def get(cfg: Config, key: str) -> Any:
    """The value at a dotted key, :data:`MISSING` when absent or ``???``."""
    node: Any = cfg
    for part in key.split("."):
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]  # an item of a list, e.g. eval.perplexity.0.path
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return MISSING
    return MISSING if node == "???" else node


def has(cfg: Config, key: str) -> bool:
    return get(cfg, key) is not MISSING


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return is_int(v) or (isinstance(v, float) and math.isfinite(v))


def integer(cfg: Config, key: str, low: int, optional: bool = False) -> int | None:
    """An integer >= ``low`` (or null where ``optional``)."""
    v = get(cfg, key)
    if optional and v is None:
        return None
    if not is_int(v) or v < low:
        raise invalid(key, v, f"an integer >= {low}" + (" or null" if optional else ""))
    return int(v)


def number(cfg: Config, key: str, ok: Callable[[float], bool], allowed: str) -> float | None:
    v = get(cfg, key)
    if not is_number(v) or not ok(float(v)):
        raise invalid(key, v, allowed)
    return float(v)


def choice(cfg: Config, key: str, options: Iterable[str]) -> str:
    options = tuple(options)
    v = get(cfg, key)
    if v not in options:
        raise invalid(key, v, ", ".join(options))
    return str(v)


def flag(cfg: Config, key: str) -> None:
    v = get(cfg, key)
    if not isinstance(v, bool):
        raise invalid(key, v, "true, false")


def text_file(cfg: Config, key: str) -> None:
    """A file the run will read: set, present, and UTF-8 text (read once, in full)."""
    v = get(cfg, key)
    if not isinstance(v, str) or not v:
        raise invalid(key, v, "the path of a UTF-8 text file")
    path = Path(v).expanduser()
    if not path.is_file():
        why = "a folder" if path.is_dir() else "no such file"
        raise invalid(key, f"{v} ({why})", "the path of an existing UTF-8 text file")
    try:
        with path.open(encoding="utf-8") as f:
            while f.read(1 << 24):
                pass
    except UnicodeDecodeError as e:
        raise invalid(
            key, f"{v} (not UTF-8: byte {e.object[e.start]:#04x} at offset {e.start})",
            "a UTF-8 text file",
        ) from None  # fmt: skip
    except OSError as e:
        raise invalid(key, f"{v} ({e.strerror})", "a readable UTF-8 text file") from None


def device(cfg: Config, key: str) -> None:
    v = get(cfg, key)
    if not isinstance(v, str) or not DEVICE.match(v):
        raise invalid(key, v, "auto, cpu, cuda, cuda:<index>, mps")
    if v.startswith("cuda"):
        count = torch.cuda.device_count()
        index = int(v.partition(":")[2] or 0)
        if index >= count:
            have = f"{count} GPU(s)" if count else "no GPU (torch sees no CUDA device)"
            raise invalid(key, v, f"auto or cpu: this machine has {have}")
    if v == "mps" and not torch.backends.mps.is_available():
        raise invalid(key, v, "auto or cpu: MPS is not available on this machine")


def windows(cfg: Config, prefix: str) -> None:
    """``n`` windows of ``seq_len`` tokens from a text file (or a hub dataset)."""
    integer(cfg, f"{prefix}.n", 1)
    integer(cfg, f"{prefix}.seq_len", 2)
    if has(cfg, f"{prefix}.seed"):
        integer(cfg, f"{prefix}.seed", 0)
    if has(cfg, f"{prefix}.add_bos"):
        flag(cfg, f"{prefix}.add_bos")
    target = str(get(cfg, f"{prefix}._target_"))
    if target.endswith("TextFile"):
        text_file(cfg, f"{prefix}.path")
    elif target.endswith("HFDataset") and not isinstance(get(cfg, f"{prefix}.path"), str):
        raise invalid(f"{prefix}.path", get(cfg, f"{prefix}.path"), "a Hugging Face dataset id")


def check_sparsity(cfg: Config) -> None:
    unit = choice(cfg, "sparsity_unit", UNITS)
    v = get(cfg, "sparsity")
    if unit == "layers":
        if not (is_int(v) or (isinstance(v, float) and v.is_integer())) or v < 1:
            raise invalid("sparsity", v, "a whole number of layers >= 1 (sparsity_unit=layers)")
    elif not is_number(v) or not 0 < v < 1:
        raise invalid(
            "sparsity", v, f"a number in (0, 1) as a {unit} (or sparsity_unit=layers for a count)"
        )


def check_model_config(cfg: Config) -> None:
    model = cfg.get("model")
    if not isinstance(model, dict):
        raise invalid("model", model, "a model option (model=smollm2_135m, tiny_llama, ...)")
    for key in ("name", "_target_"):
        if not isinstance(get(cfg, f"model.{key}"), str):
            raise invalid(f"model.{key}", get(cfg, f"model.{key}"), "a string")
    target = str(model["_target_"])
    if target.endswith("from_pretrained"):
        path = get(cfg, "model.path")
        if not isinstance(path, str) or not path:
            raise invalid("model.path", path, "a hub id or a folder written by save_pretrained")
    if target.endswith("random_init"):
        config = get(cfg, "model.config")
        layers = config.get("num_hidden_layers") if isinstance(config, dict) else None
        if layers is not None and (not is_int(layers) or layers < 2):
            raise invalid("model.config.num_hidden_layers", layers, "an integer >= 2")
        if not isinstance(get(cfg, "model.model_type"), str) or not get(cfg, "model.model_type"):
            raise invalid("model.model_type", get(cfg, "model.model_type"), "a transformers "
                          "model type (llama, qwen2, gemma3_text, ...)")  # fmt: skip
    if has(cfg, "model.dtype"):
        choice(cfg, "model.dtype", DTYPES)
    if has(cfg, "model.device"):
        device(cfg, "model.device")


def check_eval(cfg: Config) -> None:
    ev = cfg.get("eval")
    if not ev:
        return
    tasks = get(cfg, "eval.tasks")
    if not isinstance(tasks, list) or not tasks:
        raise invalid("eval.tasks", tasks, "a non-empty list of lm-eval task names")
    seen: set[str] = set()
    for task in tasks:
        if not isinstance(task, str) or not task:
            raise invalid("eval.tasks", tasks, "lm-eval task names (strings)")
        if task in seen:
            raise invalid("eval.tasks", tasks, f"each task once ('{task}' is listed twice)")
        seen.add(task)
    headline = get(cfg, "eval.headline")
    if headline not in (None, MISSING):
        if not isinstance(headline, dict):
            raise invalid("eval.headline", headline, "a mapping {task: metric}")
        for task, metric in headline.items():
            if metric not in HEADLINE_METRICS:
                raise invalid(f"eval.headline.{task}", metric, ", ".join(HEADLINE_METRICS))
    backend = get(cfg, "eval.backend")
    if backend not in (MISSING, "hf", "fast"):
        raise invalid("eval.backend", backend, "hf, fast")
    integer(cfg, "eval.limit", 1, optional=True)
    integer(cfg, "eval.num_fewshot", 0)
    integer(cfg, "eval.batch_size", 1)
    if has(cfg, "eval.batch_tokens"):
        integer(cfg, "eval.batch_tokens", 1)
    if has(cfg, "eval.max_length"):
        integer(cfg, "eval.max_length", 2, optional=True)
    texts = get(cfg, "eval.perplexity")
    if texts in (None, MISSING):
        return
    keys = (
        [f"eval.perplexity.{i}" for i in range(len(texts))]
        if isinstance(texts, list)
        else ["eval.perplexity"]
    )
    for key in keys:  # one perplexity text, or a list of them
        text_file(cfg, f"{key}.path")
        seq_len = integer(cfg, f"{key}.seq_len", 2)
        stride = get(cfg, f"{key}.stride")
        if stride is not None and (not is_int(stride) or not 1 <= stride <= (seq_len or 0)):
            raise invalid(f"{key}.stride", stride, f"null or an integer in [1, {seq_len}]")
        integer(cfg, f"{key}.batch_size", 1)
        integer(cfg, f"{key}.max_tokens", seq_len or 2, optional=True)


def min_train_windows(step: Config) -> int:
    """The fewest training windows a trained step accepts: one batch after the held-out ones."""
    batch = step.get("batch_size", 1)
    fraction = step.get("heldout_fraction")
    if fraction is None:
        return max(1, batch)
    n = 1
    while n - max(1, round(fraction * n)) < batch:
        n += 1
    return n


def check_step(cfg: Config, key: str, step: Config) -> None:
    """One recovery step's settings (``key`` = recovery.steps.<name>)."""
    for field in ("batch_size", "epochs", "rank", "alpha", "token_batch"):
        if field in step:
            integer(cfg, f"{key}.{field}", 1)
    for field in ("steps", "tokens", "batch_tokens"):
        if step.get(field) is not None:
            integer(cfg, f"{key}.{field}", 1)
    for field in ("lr", "grad_clip"):
        if field in step:
            number(cfg, f"{key}.{field}", lambda x: x > 0, "a number > 0")
    for field in ("weight_decay", "min_lr", "ridge"):
        if field in step:
            number(cfg, f"{key}.{field}", lambda x: x >= 0, "a number >= 0")
    if "warmup_ratio" in step:
        number(cfg, f"{key}.warmup_ratio", lambda x: 0 <= x <= 1, "a number in [0, 1]")
    if "dropout" in step:
        number(cfg, f"{key}.dropout", lambda x: 0 <= x < 1, "a number in [0, 1)")
    if "heldout_fraction" in step:
        number(cfg, f"{key}.heldout_fraction", lambda x: 0 < x < 1, "a number in (0, 1)")
    betas = step.get("betas", [0.9, 0.999])
    if not (isinstance(betas, list) and len(betas) == 2 and all(is_number(b) and 0 <= b < 1
                                                                 for b in betas)):  # fmt: skip
        raise invalid(f"{key}.betas", betas, "two numbers in [0, 1), e.g. [0.9, 0.95]")
    target = str(step["_target_"])
    if target.endswith("LayerReplacement"):
        choice(cfg, f"{key}.kind", KINDS)
        choice(cfg, f"{key}.loss", LOSSES)
    elif target.endswith("LinearReplacement"):
        choice(cfg, f"{key}.loss", TOKEN_LOSSES)
        if step.get("loss") == "cosine" and step.get("ridge"):
            raise invalid(f"{key}.ridge", step["ridge"], "0 with loss cosine (the pull toward "
                          "the identity applies to mse and nmse)")  # fmt: skip
    check_token_filter(cfg, key, step)
    if "activation_cache" in step:
        flag(cfg, f"{key}.activation_cache")
    if "cache_dtype" in step:
        choice(cfg, f"{key}.cache_dtype", CACHE_DTYPES)


def check_token_filter(cfg: Config, key: str, step: Config) -> None:
    positions = step.get("exclude_positions")
    if positions is not None and (
        not isinstance(positions, list) or not all(is_int(p) and p >= 0 for p in positions)
    ):
        raise invalid(f"{key}.exclude_positions", positions, "null (the loss's default) or a "
                      "list of positions >= 0, e.g. [0]")  # fmt: skip
    outliers = step.get("exclude_outliers")
    if outliers is not None:
        number(cfg, f"{key}.exclude_outliers", lambda x: x > 1, "null or a factor > 1")
    if step.get("loss") == "lm" and (positions or outliers is not None):
        value = f"lm with exclude_positions {positions} and exclude_outliers {shown(outliers)}"
        raise invalid(f"{key}.loss", value, "mse, nmse or cosine to leave tokens out, or lm with "
                      "exclude_positions null or [] and exclude_outliers null")  # fmt: skip


def check_positions_fit(cfg: Config, steps: dict[str, Any]) -> None:
    """Positions left out must lie in the training windows (none is silently ignored)."""
    seq_len = get(cfg, "recovery.train_data.seq_len")
    for name, step in steps.items():
        positions = step.get("exclude_positions") or []
        if any(p >= seq_len for p in positions):
            raise invalid(
                f"recovery.steps.{name}.exclude_positions", positions, "positions < "
                f"recovery.train_data.seq_len = {seq_len}, the length of the training windows",
            )  # fmt: skip


def check_budget(cfg: Config, steps: dict[str, Any]) -> None:
    """The budget in tokens: whole optimiser steps of whole batches of windows."""
    seq_len = get(cfg, "recovery.train_data.seq_len")
    for name, step in steps.items():
        tokens = step.get("batch_tokens")
        micro = step.get("batch_size", 1) * seq_len
        if tokens is not None and tokens % micro:
            shared = get(cfg, "recovery.budget.batch_tokens") == tokens
            key = (
                "recovery.budget.batch_tokens" if shared else f"recovery.steps.{name}.batch_tokens"
            )
            raise invalid(
                key, tokens, f"a multiple of batch_size x seq_len = {step.get('batch_size', 1)} "
                f"x {seq_len} = {micro} tokens (recovery.steps.{name})",
            )  # fmt: skip


def check_recovery(cfg: Config) -> None:
    steps = get(cfg, "recovery.steps")
    if steps is MISSING or not steps:
        return  # no recovery: its train_data is never read
    if not isinstance(steps, dict):
        raise invalid("recovery.steps", steps, "a mapping {name: step}")
    for field in ("tokens", "batch_tokens"):  # what the steps read, named where it is set
        if has(cfg, f"recovery.budget.{field}"):
            integer(cfg, f"recovery.budget.{field}", 1, optional=True)
    if has(cfg, "recovery.activation_cache"):
        flag(cfg, "recovery.activation_cache")
    if has(cfg, "recovery.cache_dtype"):
        choice(cfg, "recovery.cache_dtype", CACHE_DTYPES)
    for name, step in steps.items():
        key = f"recovery.steps.{name}"
        if not isinstance(step, dict) or "_target_" not in step:
            raise invalid(key, step, "a step from conf/recovery/step (layer, linear, lora, ...)")
        check_step(cfg, key, step)
    if get(cfg, "recovery.train_data") in (None, MISSING):
        raise invalid("recovery.train_data", None, "a text file option (recovery/train_data)")
    windows(cfg, "recovery.train_data")
    need = max(min_train_windows(step) for step in steps.values())
    n = get(cfg, "recovery.train_data.n")
    if n < need:
        raise invalid(
            "recovery.train_data.n", n, f"an integer >= {need} (one training batch after the "
            "held-out windows)",
        )  # fmt: skip
    check_budget(cfg, steps)
    check_positions_fit(cfg, steps)
    model_type = get(cfg, "model.model_type")
    for name, step in steps.items():
        if str(step["_target_"]).endswith("LinearReplacement") and model_type in NORMED_MLP_TYPES:
            raise invalid(
                "recovery", f"{name} (LinearReplacement) with model_type {model_type}",
                "layer, swiglu, ffn or lora: this architecture normalises its MLP output, so the "
                "linear fold is not exact",
            )  # fmt: skip


def target_class(cfg: Config, key: str) -> type | None:
    """The class a ``_target_`` names, where it can be imported (else None: building fails
    later with its own message)."""
    target = get(cfg, f"{key}._target_")
    if not isinstance(target, str) or "." not in target:
        return None
    module, _, name = target.rpartition(".")
    try:
        found = getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None
    return found if isinstance(found, type) else None


def check_model_scorer(cfg: Config, key: str = "scorer") -> None:
    """A scorer that measures the model (the node at ``key``): single layers only, and
    sensible settings."""
    cls = target_class(cfg, key)
    if cls is None or not issubclass(cls, ModelScorer):
        return
    selection = get(cfg, f"{key}.selection")
    if selection is not MISSING and selection not in cls.selections:
        raise invalid(
            f"{key}.selection", selection, f"{', '.join(cls.selections)} ({cls.name} measures "
            "the model without single layers; block selection is not part of the method)",
        )  # fmt: skip
    for field in ("early_barrier", "latter_barrier", "keep_first", "keep_last"):
        if has(cfg, f"{key}.{field}"):
            integer(cfg, f"{key}.{field}", 0)
    if has(cfg, f"{key}.batch_size"):
        integer(cfg, f"{key}.batch_size", 1)


def check_config(cfg: Config) -> None:
    """Everything the config alone decides; raises on the first bad value."""
    check_sparsity(cfg)
    integer(cfg, "seed", 0)
    if has(cfg, "first_start"):  # set by a control of the linear fold, not in config.yaml
        integer(cfg, "first_start", 0)
    for key in FLAGS:
        if has(cfg, key):
            flag(cfg, key)
    integer(cfg, "scoring.batch_size", 1)
    choice(cfg, "scoring.convention", CONVENTIONS)
    flag(cfg, "scoring.cache")
    flag(cfg, "speed.enabled")
    for key in ("batch_size", "prompt_tokens", "new_tokens", "repeats"):
        integer(cfg, f"speed.{key}", 1)
    check_model_config(cfg)
    if get(cfg, "scorer.selection") is not MISSING:
        choice(cfg, "scorer.selection", SELECTIONS)
    check_model_scorer(cfg)
    if get(cfg, "calibration") in (None, MISSING):
        raise invalid("calibration", None, "a calibration option (wiki, c4, file, ...)")
    windows(cfg, "calibration")
    check_eval(cfg)
    check_recovery(cfg)
    if has(cfg, "logger.mode"):
        choice(cfg, "logger.mode", LOGGER_MODES)
    runs = get(cfg, "paths.runs")
    if not isinstance(runs, str) or not runs:
        raise invalid("paths.runs", runs, "a folder path")
    if Path(runs).expanduser().exists() and not Path(runs).expanduser().is_dir():
        raise invalid("paths.runs", f"{runs} (a file)", "a folder path")


def check_job(recovery: Recovery, scorer: Scorer) -> None:
    """What the built objects decide: a block replacement needs a contiguous selection."""
    assert isinstance(recovery.steps, Mapping)
    for name, step in recovery.steps.items():
        if step.contiguous and isinstance(scorer, ModelScorer):
            raise invalid(
                "recovery", f"{name} ({type(step).__name__}) with scorer {scorer.name}",
                f"a recovery without a block replacement (none, lora, lora_shortened): "
                f"{scorer.name} selects single layers, and step {name} needs a contiguous block",
            )  # fmt: skip
        if step.contiguous and scorer.selection != "contiguous":
            raise invalid(
                "scorer.selection", scorer.selection,
                f"contiguous (recovery step {name} ({type(step).__name__}) needs a contiguous "
                f"block, and scorer '{scorer.name}' selects single layers; set "
                "scorer.selection=contiguous)",
            )  # fmt: skip


def context_length(config: Any) -> int | None:
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value: Any = getattr(config, attr, None)
        if is_int(value) and value > 0:
            return int(value)
    return None


def check_model_scorer_fits(
    loaded: LoadedModel, scorer: ModelScorer, sparsity: Sparsity, k: int
) -> None:
    """A model scorer on the loaded model: a budget its protected layers leave room for, and
    (for the criteria that run layers one by one) layers that take nothing but the residual
    stream and position-derived inputs, probed on two short rows."""
    num = decoder_stack(loaded.model).num_layers
    limit = scorer.max_removable(num)
    if k > limit:
        raise invalid(
            "sparsity", sparsity.amount, f"a target that removes at most {limit} of the {num} "
            f"layers of {loaded.name} with scorer {scorer.name} (this one removes {k}; "
            f"{scorer.protection()})",
        )  # fmt: skip
    if not scorer.skips_layers:
        return
    device = next(loaded.model.parameters()).device
    probe = torch.arange(3, 19, device=device).view(2, 8)  # two different rows of 8 tokens
    try:
        with torch.no_grad(), capture_calls(decoder_stack(loaded.model)):
            loaded.model(input_ids=probe, use_cache=False)
    except UnsupportedLayers as e:
        raise invalid(
            "scorer", f"{scorer.name} on {loaded.name} ({loaded.model.config.model_type}: {e})",
            "a model whose decoder layers take the residual stream and position-derived inputs "
            "only (Llama, Mistral, Qwen2/Qwen3, Gemma3, OPT), or scorer=taylor",
        ) from None  # fmt: skip


def check_model(
    loaded: LoadedModel,
    sparsity: Sparsity,
    recovery: Recovery,
    seq_lens: dict[str, int],
    scorer: Scorer | None = None,
) -> None:
    """What needs the loaded model, checked before scoring: a config with layers and a model
    type, every window within the context length, a sparsity that keeps a layer, a recovery
    the architecture supports, and a model scorer that can run on it with its budget.
    ``seq_lens`` maps config keys to window lengths."""
    config = loaded.model.config
    name = loaded.name
    if not getattr(config, "model_type", None):
        raise invalid("model", f"{name} (its config has no model_type)", "a transformers "
                      "causal LM whose config.json names its model_type")  # fmt: skip
    try:
        stack = decoder_stack(loaded.model)
    except LayerpruneError as e:
        raise invalid("model", f"{name} ({config.model_type})", str(e)) from None
    num = stack.num_layers
    if num < 2:
        raise invalid("model", f"{name} ({num} decoder layers)", "a model with >= 2 layers")
    limit = context_length(config)
    for key, seq_len in seq_lens.items():
        if limit is not None and seq_len > limit:
            raise invalid(key, seq_len, f"<= {limit} tokens, the context length of {name}")
    layer_params = layer_param_counts(loaded.model)
    try:
        k = sparsity.num_layers_to_remove(layer_params, param_count(loaded.model))
    except LayerpruneError as e:
        allowed = f"a target that removes one to {num - 1} of the {num} layers of {name} ({e})"
        raise invalid("sparsity", sparsity.amount, allowed) from None
    k += recovery.layers_added
    if k >= num:
        raise invalid(
            "sparsity", sparsity.amount, f"a target that keeps at least one of the {num} layers "
            f"of {name}: with {recovery.layers_added} replacement layer(s) it removes {k} of {num} "
            "layers; keep at least one",
        )  # fmt: skip
    if isinstance(scorer, ModelScorer):
        check_model_scorer_fits(loaded, scorer, sparsity, k)
    assert isinstance(recovery.steps, Mapping)
    for step_name, step in recovery.steps.items():
        if isinstance(step, LinearReplacement) and stack.post_mlp_norm(0) is not None:
            raise invalid(
                "recovery", f"{step_name} (LinearReplacement) on {name} ({config.model_type})",
                "layer, swiglu, ffn or lora: this architecture normalises its MLP output, so "
                "the linear fold is not exact",
            )  # fmt: skip


def check_jsonl(
    key: str, path: Path, task: str | None = None, needed: Iterable[str] | None = None
) -> None:
    """A data mirror file: every line one JSON object with the fields of the first line, and
    among them the fields ``needed`` by ``task``'s prompts."""
    fields: set[str] | None = None
    try:
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise invalid(key, f"{path} (line {number} is not JSON: {e})",
                                  "JSON Lines, one object a line") from None  # fmt: skip
                if not isinstance(row, dict):
                    raise invalid(key, f"{path} (line {number} is not an object)", "JSON Lines, "
                                  "one object a line")  # fmt: skip
                if fields is None:
                    fields = set(row)
                    if lacking := sorted(set(needed or ()) - fields):
                        value = f"{path} (rows lack {lacking}, which task {task} reads)"
                        raise invalid(key, value, "rows with the fields of the task's prompts")
                elif missing := fields - set(row):
                    raise invalid(key, f"{path} (line {number} lacks {sorted(missing)})",
                                  "rows with the task's fields")  # fmt: skip
    except UnicodeDecodeError as e:
        raise invalid(key, f"{path} (not UTF-8 at offset {e.start})", "UTF-8 JSON Lines") from None
