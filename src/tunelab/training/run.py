"""Dispatch a validated config to its stage module."""

import errno
import gc
import importlib
import logging
from typing import Any

from tunelab.config import Config
from tunelab.config.stages import STAGE_SPECS
from tunelab.data.disk import NoSpaceError


def stage_module(stage: str) -> Any:
    """The module that runs a stage (`config/stages.py` names it): its `run(config)` returns the metrics."""
    return importlib.import_module(f"tunelab.training.stages.{STAGE_SPECS[stage].module}")


def run_training(config: Config) -> dict[str, Any]:
    setup_logging()
    try:
        results = stage_module(config.stage).run(config)
    except OSError as err:
        # The large saves report a full disk with the space they need (`checkpoints.py`, `data/cache.py`); this
        # catches the small files between them: the log, trainer_state.json, the results, the plots.
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise NoSpaceError(f"no space left to write {err.filename or 'a file'}: free some space and run the same "
                           f"command again (it resumes from the last complete checkpoint in {config.output_dir})"
                           ) from err
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
