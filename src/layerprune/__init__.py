"""layerprune: depth (layer) pruning of decoder-only LLMs.

The library (models, calibration, scoring, selection, surgery, recovery, stability) is plain
Python on torch and transformers; :mod:`layerprune.api` is its short front door, re-exported
here, and the Hydra app in :mod:`layerprune.app` composes the same pieces from configs.
"""

__version__ = "0.1.0"

from layerprune.api import evaluate, load, measure, plan, prune, recover, save, score, windows
from layerprune.criteria import SLEB, CriterionScores, PPLCriterion, TaylorPlus
from layerprune.errors import LayerpruneError
from layerprune.recovery import LayerReplacement, LinearReplacement, LoraHealing
from layerprune.scoring import Angular, BlockInfluence, Last, LayerStats, Random, Streamline
from layerprune.selection import Plan

__all__ = [
    "SLEB",
    "Angular",
    "BlockInfluence",
    "CriterionScores",
    "Last",
    "LayerReplacement",
    "LayerStats",
    "LayerpruneError",
    "LinearReplacement",
    "LoraHealing",
    "PPLCriterion",
    "Plan",
    "Random",
    "Streamline",
    "TaylorPlus",
    "__version__",
    "evaluate",
    "load",
    "measure",
    "plan",
    "prune",
    "recover",
    "save",
    "score",
    "windows",
]
