"""What a run shows on the console: progress bars, the plan, the result table, the run folder.

Hydra's ``job_logging`` config (``conf/hydra/job_logging/layerprune.yaml``) sends the
``layerprune`` logger to the console and the run's log file, and every other logger to the
file only. Libraries that write to the terminal by themselves (transformers' and datasets'
handlers and progress bars, W&B's banner, Python warnings) are routed into logging here.
"""

from __future__ import annotations

import logging
import os
import sys


def configure(verbose: bool = False) -> None:
    """Quiet third-party output (into the log file); ``verbose`` shows everything, and
    layerprune's own debug lines."""
    logging.captureWarnings(True)
    if verbose:
        logging.getLogger("layerprune").setLevel(logging.DEBUG)
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter("[%(name)s][%(levelname)s] %(message)s"))
        logging.getLogger().addHandler(console)
        return
    os.environ.setdefault("WANDB_SILENT", "true")
    import datasets
    import transformers

    transformers.utils.logging.disable_default_handler()  # its own stderr handler, replaced
    transformers.utils.logging.enable_propagation()  # by the root logger's file
    transformers.utils.logging.disable_progress_bar()
    datasets.utils.logging.enable_propagation()
    datasets.disable_progress_bars()
