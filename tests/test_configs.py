"""The catalogue: every option of every config group composes, and those that need no model or
network instantiate. Options named ``_*`` are bases that other options build on."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from layerprune.app import CONF_DIR, build

from .conftest import compose_config

NEEDS = {"model=local": ["model.path=/somewhere"], "calibration=file": ["calibration.path={wiki}"]}
OFFLINE = ("layerprune.calibration.HFDataset",)  # streams from the hub when instantiated


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml") if not p.stem.startswith("_"))


CASES = [
    f"{group}={name}"
    for group in ("model", "calibration", "scorer", "eval", "recovery", "logger", "experiment")
    for name in options(group)
]


@pytest.mark.parametrize("choice", CASES)
def test_every_option_composes(choice: str, tmp_path: Path) -> None:
    from .conftest import MIRROR

    extra = [o.format(wiki=MIRROR / "text" / "wiki.txt") for o in NEEDS.get(choice, [])]
    cfg = compose_config([choice, *extra])
    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert isinstance(resolved, dict)
    group = choice.split("=")[0]
    node = cfg.get(group) if group != "experiment" else None
    buildable = group in ("scorer", "calibration", "logger") and node is not None
    if buildable and node.get("_target_") not in OFFLINE:
        assert build(node) is not None


def test_a_user_config_folder_adds_options(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "my_tiny.yaml").write_text(
        "defaults:\n  - tiny_llama\n  - _self_\nname: my_tiny\nconfig:\n  num_hidden_layers: 8\n"
    )
    cfg = compose_config([f"hydra.searchpath=[file://{tmp_path}]", "model=my_tiny"])
    assert cfg.model.name == "my_tiny" and cfg.model.config.num_hidden_layers == 8
    assert cfg.model.config.hidden_size == 64  # the rest from tiny_llama and its base
