"""The inference backends by `infer_backend` name, and the one way to build an engine.

    engine = build_engine(config)

A backend is a subclass of `engine.Engine` in a module of its own, imported only when chosen (vllm is optional and
heavy). Adding one: a row here, its module, and a test that chats and streams through it.
"""

import importlib

from tunelab.config import Config
from tunelab.infer.engine import Engine

#: infer_backend -> "module:class" of its Engine.
BACKENDS = {
    "huggingface": "tunelab.infer.hf_engine:HuggingFaceEngine",
    "vllm": "tunelab.infer.vllm_engine:VllmEngine",
}


def build_engine(config: Config) -> Engine:
    """The engine `infer_backend` names (the schema allows only these), with the model, its adapters and its
    template loaded."""
    module, name = BACKENDS[config.infer_backend].split(":")
    return getattr(importlib.import_module(module), name)(config)
