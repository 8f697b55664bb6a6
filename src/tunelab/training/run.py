"""Dispatch a validated config to its stage module."""

import importlib
import logging
from typing import Any

from tunelab.config import Config

#: stage name -> module with `run(config) -> metrics`. orpo and simpo are dpo with that loss (`config.pref_loss`).
STAGES = {
    "pt": "tunelab.training.stages.pt",
    "sft": "tunelab.training.stages.sft",
    "rm": "tunelab.training.stages.rm",
    "dpo": "tunelab.training.stages.dpo",
    "orpo": "tunelab.training.stages.dpo",
    "simpo": "tunelab.training.stages.dpo",
    "kto": "tunelab.training.stages.kto",
    "ppo": "tunelab.training.stages.ppo",
    "grpo": "tunelab.training.stages.grpo",
}


def run_training(config: Config) -> dict[str, Any]:
    setup_logging()
    stage = importlib.import_module(STAGES[config.stage])
    return stage.run(config)


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
