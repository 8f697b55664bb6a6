"""Shared fixtures: tiny random models built once per test session, and an offline, quiet, 2-thread environment."""

import os

# Set before transformers is imported anywhere: tests never reach the hub, and tokenizers must not fork threads.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

from tunelab.model import build_tiny_model  # noqa: E402

torch.set_num_threads(2)

# Property tests are reproducible: the same examples on every run and machine (no random seed, no example database),
# without a per-example deadline (a shared 2-core machine is slow at times). Each test sets its own example budget.
# HYPOTHESIS_PROFILE=explore draws new examples instead.
settings.register_profile("ci", derandomize=True, database=None, deadline=None)
settings.register_profile("explore", database=None, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


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


@pytest.fixture(scope="session")
def picture_adapter(tmp_path_factory, tiny_qwen2_vl_dir):
    """A LoRA adapter on the tiny Qwen2-VL that answers PICTURE_QUESTION about each picture of PICTURE_ANSWERS with
    its own answer (greedy): a model that ignored the image could not tell them apart. Returns the chat config."""
    import json

    import tunelab
    from helpers import LF_DATA, PICTURE_ANSWERS, PICTURE_QUESTION

    if not LF_DATA.is_dir():
        pytest.skip("../shared/lf_data (LLaMA-Factory's demo data) is absent")
    folder = tmp_path_factory.mktemp("pictures")
    samples = [{"messages": [{"role": "user", "content": "<image>" + PICTURE_QUESTION},
                             {"role": "assistant", "content": answer}],
                "images": [str(LF_DATA / "mllm_demo_data" / picture)]} for picture, answer in PICTURE_ANSWERS.items()]
    (folder / "pictures.json").write_text(json.dumps(samples * 8))
    (folder / "dataset_info.json").write_text(json.dumps({"pictures": {
        "file_name": "pictures.json", "formatting": "sharegpt", "columns": {"messages": "messages", "images": "images"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}}))
    common = {"model_name_or_path": str(tiny_qwen2_vl_dir), "template": "qwen2_vl", "image_max_pixels": 65536}
    adapter = folder / "lora"
    # About 30 s on 2 CPU cores: 80 steps at a high learning rate make the tiny model answer each picture greedily.
    tunelab.train({**common, "stage": "sft", "do_train": True, "finetuning_type": "lora", "lora_rank": 16,
                   "dataset": "pictures", "dataset_dir": str(folder), "output_dir": str(adapter),
                   "per_device_train_batch_size": 2, "learning_rate": 5e-3, "num_train_epochs": 10,
                   "lr_scheduler_type": "constant", "save_strategy": "no", "report_to": "none", "seed": 0})
    return {**common, "adapter_name_or_path": str(adapter), "do_sample": False, "max_new_tokens": 12,
            "dataset_dir": str(folder)}
