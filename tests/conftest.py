from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import DictConfig

from layerprune.app import compose
from layerprune.models import LoadedModel

TINY_MODELS = ["tiny_llama", "tiny_qwen2", "tiny_gemma3"]
MIRROR = Path(
    os.environ.get("LAYERPRUNE_DATA_MIRROR", Path(__file__).parents[1] / ".." / "shared" / "data")
)


def compose_config(overrides: list[str]) -> DictConfig:
    return compose(overrides)


def load(model: str, **overrides: str) -> LoadedModel:
    extra = [f"model.{k}={v}" for k, v in overrides.items()]
    cfg = compose_config([f"model={model}", *extra])
    return instantiate(cfg.model, _convert_="all")


@pytest.fixture(autouse=True)
def _isolated_cache(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unit tests never touch the user's cache; converted real models are shared per session."""
    if "LAYERPRUNE_TEST_CACHE" not in os.environ:
        os.environ["LAYERPRUNE_TEST_CACHE"] = str(tmp_path_factory.getbasetemp() / "cache")
    monkeypatch.setenv("LAYERPRUNE_CACHE", os.environ["LAYERPRUNE_TEST_CACHE"])
