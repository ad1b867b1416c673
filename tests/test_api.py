"""The Python API: the README's example runs as written, and agrees with the command line."""

from __future__ import annotations

import json
import pkgutil
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

import layerprune as lp
from layerprune.app import run

from .conftest import MIRROR, compose_config, load

README = Path(__file__).parents[1] / "README.md"
WIKI = MIRROR / "text" / "wiki.txt"


def readme_example() -> str:
    """The code block that follows the ``api-example`` marker in README.md."""
    text = README.read_text()
    match = re.search(r"<!-- api-example -->\n```python\n(.*?)```", text, re.S)
    assert match, "README.md lost its Python API example"
    return match.group(1)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    tiny = load("tiny_llama")
    folder = tmp_path / "tiny-model"
    tiny.model.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    return folder


def test_readme_example_runs_and_matches_the_cli(model_dir: Path, tmp_path: Path) -> None:
    code = readme_example()
    for old, new in {
        '"path/to/model"': repr(str(model_dir)),
        '"../shared/data/text/wiki.txt"': repr(str(WIKI)),
        "n=64, seq_len=512": "n=4, seq_len=32",
        '"pruned-model"': repr(str(tmp_path / "pruned-model")),
    }.items():
        assert old in code, f"the README example no longer contains {old}"
        code = code.replace(old, new)
    namespace: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), namespace)
    plan = namespace["plan"]

    record = run(
        compose_config([
            "model=local", f"model.path={model_dir}", "calibration.n=4",
            "calibration.seq_len=32", f"calibration.path={WIKI}", "scorer=block_influence",
            "sparsity=0.25", "eval=none", "logger=none", "force=true",
        ]),
        tmp_path / "cli",
    )  # fmt: skip
    assert plan.removed_layers == record["plan"]["removed_layers"]
    assert plan.params_after == record["plan"]["params_after"]
    assert (tmp_path / "pruned-model" / "config.json").is_file()


def test_saved_checkpoint_reloads_identically_and_records_its_recipe(
    model_dir: Path, tmp_path: Path
) -> None:
    model = lp.load(str(model_dir))
    windows = lp.windows(model, WIKI, n=4, seq_len=32)
    plan = lp.plan(model, lp.score(model, windows), lp.Streamline(), sparsity=2, unit="layers")
    lp.prune(model, plan)
    out = lp.save(model, tmp_path / "pruned", plan)

    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = windows[:2]
    with torch.no_grad():
        expected = model.model(input_ids=ids).logits
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, atol=0, rtol=0)
    recipe = json.loads((out / "config.json").read_text())["layerprune_recipe"]
    assert recipe["base_model"]["source"] == str(model_dir.resolve())
    assert recipe["scorer"] == "streamline" and recipe["selection"] == "contiguous"
    assert recipe["sparsity"] == {"amount": 2, "unit": "layers"}
    assert recipe["removed_layers"] == plan.removed_layers and len(plan.removed_layers) == 2
    assert recipe["kept_layers"] == [i for i in range(6) if i not in plan.removed_layers]
    assert recipe["layerprune_version"] == lp.__version__
    card = (out / "README.md").read_text()
    assert f'base_model: "{model_dir.resolve()}"' in card
    assert f"Removed original layers: {plan.removed_layers} of 6" in card


def test_cli_checkpoint_carries_recipe_and_card(model_dir: Path, tmp_path: Path) -> None:
    record = run(
        compose_config([
            "model=tiny_llama", "calibration.n=4", "calibration.seq_len=32", "scoring.batch_size=2",
            "scorer=angular", "sparsity=2", "sparsity_unit=layers", "save_model=true",
            "eval=none", "logger=none", "force=true",
        ]),
        tmp_path,
    )  # fmt: skip
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    recipe = config["layerprune_recipe"]
    assert recipe["removed_layers"] == record["plan"]["removed_layers"]
    assert recipe["base_model"]["name"] == "tiny_llama"
    assert recipe["base_model"]["source"] == "random init of llama (seed 0)"
    assert recipe["calibration"]["n"] == 4 and recipe["calibration"]["seq_len"] == 32
    assert config["num_hidden_layers"] == 4
    assert (
        "# tiny_llama, depth-pruned with layerprune"
        in (tmp_path / "model" / "README.md").read_text()
    )


@pytest.mark.parametrize(
    ("mask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775)]
)
def test_results_follow_the_umask(mask: int, file_mode: int, dir_mode: int, tmp_path: Path) -> None:
    import os

    old = os.umask(mask)
    try:
        run(
            compose_config([
                "model=tiny_llama", "calibration.n=4", "calibration.seq_len=32", "sparsity=0.25",
                "save_model=true", "eval=none", "logger=none", "force=true",
            ]),
            tmp_path,
        )  # fmt: skip
    finally:
        os.umask(old)
    assert (tmp_path / "metrics.json").stat().st_mode & 0o777 == file_mode
    assert (tmp_path / "model" / "config.json").stat().st_mode & 0o777 == file_mode
    assert (tmp_path / "model").stat().st_mode & 0o777 == dir_mode


# The modules of the app around the library: the entry points, the lm-eval evaluation, the
# report and the tracker (README, "Layout").
APP = {"__main__", "app", "search_app", "evaluation", "mirror", "lm_eval_compat", "fastlm",
       "report", "claims", "choices", "controls", "tracking"}  # fmt: skip


def test_the_library_imports_neither_hydra_wandb_nor_lm_eval() -> None:
    modules = [m.name for m in pkgutil.walk_packages(lp.__path__, "layerprune.")]
    library = [m for m in modules if m.split(".")[1] not in APP]
    assert {"layerprune.pipeline", "layerprune.criteria", "layerprune.recovery.lora"} < set(library)
    code = "".join(f"import {m}\n" for m in library) + (
        "import sys\nprint(sorted({n.split('.')[0] for n in sys.modules} & "
        "{'hydra', 'wandb', 'lm_eval'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
