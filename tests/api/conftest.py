"""The engine the API tests serve: the tiny model, greedy, replying with at most 16 tokens (one per test module)."""

import pytest

from tunelab.config import load_config
from tunelab.infer.backends import build_engine


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return build_engine(load_config({"model_name_or_path": str(tiny_model_dir), "template": "qwen",
                                     "do_sample": False, "max_new_tokens": 16}))
