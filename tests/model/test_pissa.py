"""PiSSA: `pissa_init` starts LoRA from the weights' principal singular vectors (same function at step 0), and
`pissa_convert` saves to output_dir a plain LoRA adapter that applies to the ORIGINAL base model.

    .venv/bin/python -m pytest tests/model/test_pissa.py -q -m "not distributed"   # about 15 s on 2 CPU cores
    .venv/bin/python -m pytest tests/model/test_pissa.py -q -m distributed         # 2 processes under torchrun

The trained model's reference logits come from peft alone: a PiSSA-form checkpoint loaded onto the original base
(peft redoes the exact SVD on load), never from tunelab's conversion.
"""

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from helpers import assert_two_processes_train_as_accumulation, losses, run_config
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import tunelab
from tunelab.config import load_config
from tunelab.model import load_model, load_tokenizer
from tunelab.training.pissa import convert_pissa_to_lora

TEXTS = ["Hello! How are you today? I am fine, thank you.", "The quick brown fox jumps over the lazy dog."]


def load(model_dir: Path, trainable: bool = True, **overrides):
    config = load_config({"model_name_or_path": str(model_dir), **overrides})
    tokenizer = load_tokenizer(config)
    return load_model(config, tokenizer, trainable=trainable), tokenizer


def logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def base_weight(model, name: str = "model.layers.0.self_attn.q_proj") -> torch.Tensor:
    return model.base_model.model.get_submodule(name).get_base_layer().weight.detach().clone()


def test_pissa_init_keeps_the_function_and_moves_the_principal_part_into_the_adapter(tiny_model_dir, caplog):
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with caplog.at_level(logging.WARNING):
        model, tokenizer = load(tiny_model_dir, pissa_init=True, pissa_iter=-1, lora_rank=4)
    assert "applies to the PiSSA residual model only" in caplog.text
    assert model.peft_config["default"].init_lora_weights == "pissa"
    torch.testing.assert_close(logits(model, tokenizer), logits(original, tokenizer), atol=1e-4, rtol=1e-4)
    # The base layer holds the residual W - s * B A; with plain LoRA it would hold W itself.
    q_proj = original.model.layers[0].self_attn.q_proj.weight
    assert (base_weight(model) - q_proj).abs().max() > 0.05

    fast, _ = load(tiny_model_dir, pissa_init=True, pissa_iter=4, pissa_convert=True)
    assert fast.peft_config["default"].init_lora_weights == "pissa_niter_4"


def test_conversion_restores_the_original_weights_and_keeps_the_function(tiny_model_dir):
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model, tokenizer = load(tiny_model_dir, pissa_init=True, pissa_convert=True, lora_rank=4,
                            additional_target="lm_head")
    initial = {key: value.detach().clone() for key, value in get_peft_model_state_dict(model).items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    for _ in range(4):
        model(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    trained = logits(model, tokenizer)

    convert_pissa_to_lora(model, initial)
    torch.testing.assert_close(base_weight(model), original.model.layers[0].self_attn.q_proj.weight, atol=1e-5,
                               rtol=0)
    assert (model.peft_config["default"].r, model.peft_config["default"].lora_alpha) == (8, 16)
    torch.testing.assert_close(logits(model, tokenizer), trained, atol=1e-4, rtol=1e-4)


def test_pissa_convert_saves_a_lora_adapter_for_the_original_model(tiny_model_dir, tmp_path):
    out = tmp_path / "pissa"
    tunelab.train(run_config(tiny_model_dir, out, pissa_init=True, pissa_iter=-1, pissa_convert=True, lora_rank=4,
                             additional_target="lm_head", learning_rate=5e-3))
    values = losses(out)
    assert 4.0 < values[0] < 9.0 and sum(values[-3:]) / 3 < values[0] - 0.5, values

    converted = json.loads((out / "adapter_config.json").read_text())
    assert (converted["r"], converted["lora_alpha"], converted["init_lora_weights"]) == (8, 16, True)
    # Checkpoints stay in PiSSA form, so a run resumes from them exactly; the last one is the trained model.
    checkpoint = out / "checkpoint-24"
    assert json.loads((checkpoint / "adapter_config.json").read_text())["init_lora_weights"] == "pissa"

    tokenizer = load_tokenizer(load_config({"model_name_or_path": str(tiny_model_dir)}))
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    untrained = logits(original, tokenizer)
    trained = logits(PeftModel.from_pretrained(original, checkpoint), tokenizer)
    assert (trained - untrained).abs().max() > 0.5
    # output_dir's adapter, as chat and export load it: merged onto model_name_or_path.
    merged, _ = load(tiny_model_dir, trainable=False, adapter_name_or_path=str(out))
    torch.testing.assert_close(logits(merged, tokenizer), trained, atol=1e-4, rtol=1e-4)


def test_a_resumed_run_converts_to_the_same_adapter(tiny_model_dir, tmp_path):
    """The starting adapter is rebuilt, not saved: the fast SVD must be seeded so that a resumed run gets the same."""
    first, resumed = tmp_path / "first", tmp_path / "resumed"
    settings = {"pissa_init": True, "pissa_convert": True, "lora_rank": 4, "learning_rate": 5e-3}
    tunelab.train(run_config(tiny_model_dir, first, **settings))
    shutil.copytree(first / "checkpoint-12", resumed / "checkpoint-12")
    tunelab.train(run_config(tiny_model_dir, resumed, **settings))
    assert losses(resumed)[-6:] == losses(first)[-6:]
    expected, got = load_file(first / "adapter_model.safetensors"), load_file(resumed / "adapter_model.safetensors")
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=1e-5)


@pytest.mark.distributed
def test_pissa_two_processes_train_as_one_with_accumulation(tiny_model_dir, tmp_path):
    """The fast SVD is seeded, so both runs start from the same decomposition and save the same converted adapter."""
    records = assert_two_processes_train_as_accumulation(
        lambda out, **more: run_config(tiny_model_dir, out, pissa_init=True, pissa_convert=True, lora_rank=4,
                                       learning_rate=5e-3, max_steps=6, per_device_train_batch_size=2, **more),
        tmp_path, 29631, keys=("loss",), weights=("adapter_model.safetensors",))
    assert records[-1]["loss"] < records[0]["loss"]
