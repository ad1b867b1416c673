"""Recovering what depth pruning lost: block replacement, a linear fold, LoRA healing.

Plain Python API: each step is a dataclass of its settings, called on the model, e.g.
``LayerReplacement(kind="layer", lr=1e-4)(model, removed, windows)``. ``conf/recovery``
instantiates them into a :class:`~layerprune.recovery.steps.Recovery`.
"""

from layerprune.recovery.activations import BlockBatch, contiguous_block, stream_block
from layerprune.recovery.cache import ActivationCache
from layerprune.recovery.checkpoint import load_recovered, save_recovered
from layerprune.recovery.linear import LinearReplacement
from layerprune.recovery.lora import LoraHealing
from layerprune.recovery.modules import MLPReplacement
from layerprune.recovery.objective import TokenFilter
from layerprune.recovery.replace import LayerReplacement
from layerprune.recovery.report import RecoveryReport
from layerprune.recovery.steps import Recovery, RecoveryStep

__all__ = [
    "ActivationCache",
    "BlockBatch",
    "LayerReplacement",
    "LinearReplacement",
    "LoraHealing",
    "MLPReplacement",
    "Recovery",
    "RecoveryReport",
    "RecoveryStep",
    "TokenFilter",
    "contiguous_block",
    "load_recovered",
    "save_recovered",
    "stream_block",
]
