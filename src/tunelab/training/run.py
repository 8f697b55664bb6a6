"""Dispatch a validated config to its stage module."""

import gc
import importlib
import logging
from typing import Any

from tunelab.config import Config
from tunelab.config.stages import STAGE_SPECS


def stage_module(stage: str) -> Any:
    """The module that runs a stage (`config/stages.py` names it): its `run(config)` returns the metrics."""
    return importlib.import_module(f"tunelab.training.stages.{STAGE_SPECS[stage].module}")


def run_training(config: Config) -> dict[str, Any]:
    setup_logging()
    results = stage_module(config.stage).run(config)
    _leave_process_group()
    return results


def _leave_process_group() -> None:
    """Under torchrun, wait until every process is done (the main one may still be writing weights), then shut the
    process group down before the interpreter exits: left to exit-time destructors, gloo's threads may be torn down
    while still running (`terminate called without an active exception`)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        # Work objects still referenced (and the tensors they hold) go now, while the interpreter can free them.
        gc.collect()


def setup_logging() -> None:
    """tunelab's own messages at INFO on stderr; transformers' at WARNING so the progress bar stays readable."""
    logger = logging.getLogger("tunelab")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[tunelab] %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    import transformers

    transformers.logging.set_verbosity_warning()
