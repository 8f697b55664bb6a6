"""tunelab: fine-tune open-weight LLMs from one YAML file and one command.

Layers, each importing only the ones before it: config -> data -> model -> eval -> training -> infer ->
api/webui -> cli. Importing this package is cheap; torch and transformers load only when a run starts or a model
loads.

    tunelab.train("examples/quickstart.yaml")                 # a run's metrics
    model = tunelab.ChatModel("examples/quickstart_chat.yaml")  # chat with the result (see infer/chat_model.py)
"""

from pathlib import Path
from typing import Any

__version__ = "0.1.0"


def train(config: dict[str, Any] | str | Path, overrides: list[tuple[str, str]] = ()) -> dict[str, Any]:
    """Validate a config (a dict or a YAML/JSON path) and run its training stage; returns the run's metrics."""
    from tunelab.config import load_config
    from tunelab.training.run import run_training

    return run_training(load_config(config, overrides))


def __getattr__(name: str) -> Any:
    # ChatModel is imported on first use, so `import tunelab` stays light.
    if name == "ChatModel":
        from tunelab.infer.chat_model import ChatModel

        return ChatModel
    raise AttributeError(f"module 'tunelab' has no attribute {name!r}")
