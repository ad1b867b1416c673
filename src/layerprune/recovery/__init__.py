"""Recovering what depth pruning lost: block replacement, a linear fold, LoRA healing.

Plain Python API; ``conf/recovery`` instantiates the :mod:`~layerprune.recovery.steps`.
"""

from layerprune.recovery.activations import BlockBatch, contiguous_block, stream_block
from layerprune.recovery.checkpoint import load_recovered, save_recovered
from layerprune.recovery.linear import replace_linear
from layerprune.recovery.lora import lora_heal
from layerprune.recovery.modules import FFNReplacement
from layerprune.recovery.replace import replace_block
from layerprune.recovery.report import RecoveryReport
from layerprune.recovery.steps import (
    LayerReplacement,
    LinearReplacement,
    LoraHealing,
    Recovery,
)

__all__ = [
    "BlockBatch",
    "FFNReplacement",
    "LayerReplacement",
    "LinearReplacement",
    "LoraHealing",
    "Recovery",
    "RecoveryReport",
    "contiguous_block",
    "load_recovered",
    "lora_heal",
    "replace_block",
    "replace_linear",
    "save_recovered",
    "stream_block",
]
