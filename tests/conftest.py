"""Shared fixtures: tiny random models built once per test session, and an offline, quiet, 2-thread environment."""

import os

# Set before transformers is imported anywhere: tests never reach the hub, and tokenizers must not fork threads.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import pytest  # noqa: E402
import torch  # noqa: E402

from tunelab.model import build_tiny_model  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random llama model with its BPE tokenizer (ChatML tokens, eos <|im_end|>)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_llama"), arch="llama")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory):
    """A tiny random qwen2 model: like the llama one, plus biased q/k/v projections."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_qwen2"), arch="qwen2")
