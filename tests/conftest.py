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


def _tiny_vl_dir(tmp_path_factory, family: str, tokenizer: str):
    """A tiny random vision-language model with a real tokenizer and processor config from ../shared/tokenizers."""
    from helpers import TOKENIZERS
    from tunelab.model.tiny_vl import build_tiny_vl_model

    source = TOKENIZERS / tokenizer
    if not source.is_dir():
        pytest.skip(f"{source} is absent: the real {family} tokenizer and processor config are needed")
    return build_tiny_vl_model(tmp_path_factory.mktemp(f"tiny_{family}"), source, family)


@pytest.fixture(scope="session")
def tiny_qwen2_vl_dir(tmp_path_factory):
    """A tiny random Qwen2-VL (2 decoder layers, 2 vision blocks) with the real Qwen2-VL tokenizer and processor."""
    return _tiny_vl_dir(tmp_path_factory, "qwen2_vl", "qwen2-vl-instruct")


@pytest.fixture(scope="session")
def tiny_qwen2_5_vl_dir(tmp_path_factory):
    """A tiny random Qwen2.5-VL (windowed vision attention) with the real Qwen2.5-VL tokenizer and processor."""
    return _tiny_vl_dir(tmp_path_factory, "qwen2_5_vl", "qwen2.5-vl-instruct")
