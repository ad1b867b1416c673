"""layerprune: depth (layer) pruning of decoder-only LLMs.

The core API (models, calibration, scoring, selection, surgery) is plain Python on top of
torch and transformers; the Hydra app in :mod:`layerprune.app` composes it.
"""

from layerprune.errors import LayerpruneError

__version__ = "0.1.0"
__all__ = ["LayerpruneError", "__version__"]
