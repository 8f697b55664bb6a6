"""The model-side methods beyond full/freeze/LoRA, with LLaMA-Factory's keys: OFT, LLaMA Pro (block expansion and
its trainable blocks), and the precision settings pure_bf16, upcast_layernorm, upcast_lmhead_output. PiSSA has its
own module, test_pissa.py.

    .venv/bin/python -m pytest tests/model/test_methods.py -q -m "not distributed"   # about 30 s on 2 CPU cores
    .venv/bin/python -m pytest tests/model/test_methods.py -q -m distributed         # 2 processes under torchrun

Each method trains for real (two-sided: a sane first loss, a clearly lower end) and changes exactly what it says.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from helpers import (assert_two_processes_train_as_accumulation, eval_logits, losses, make_batch, run_config,
                     train_steps)
from peft import OFTConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import tunelab
from tunelab.cli import main
from tunelab.config import ConfigError, load_config
from tunelab.model import load_model, load_tokenizer
from tunelab.model.export import export_model
from tunelab.model.frozen import load_reference_model
from tunelab.model.layers import trainable_layer_ids
from tunelab.model.llama_pro import expand_blocks
from tunelab.training.arguments import build_training_arguments

TEXTS = ["Hello! How are you today? I am fine, thank you.", "The quick brown fox jumps over the lazy dog.",
         "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nParis.<|im_end|>"]
LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def load(model_dir: Path, trainable: bool = True, **overrides):
    config = load_config({"model_name_or_path": str(model_dir), **overrides})
    tokenizer = load_tokenizer(config)
    return load_model(config, tokenizer, trainable=trainable), tokenizer








def assert_learned(values: list[float]) -> None:
    """Two-sided: a sane first loss for a random model (about ln(800)), a clearly lower end, nothing blown up."""
    assert 4.0 < values[0] < 9.0, values
    assert sum(values[-3:]) / 3 < values[0] - 0.5, values
    assert all(torch.isfinite(torch.tensor(values))), values


# --- OFT ------------------------------------------------------------------------------------------------------------

def test_oft_trains_only_its_blocks_and_its_folder_chats_and_exports(tiny_model_dir, tmp_path):
    out = tmp_path / "oft"
    tunelab.train(run_config(tiny_model_dir, out, finetuning_type="oft", oft_block_size=16, learning_rate=5e-3))
    assert_learned(losses(out))
    settings = json.loads((out / "adapter_config.json").read_text())
    assert settings["peft_type"] == "OFT" and settings["oft_block_size"] == 16 and settings["r"] == 0
    assert set(settings["target_modules"]) == LINEARS
    saved = load_file(out / "adapter_model.safetensors")
    assert saved and all(".oft_R." in key for key in saved), list(saved)
    assert {key.split(".")[-3] for key in saved} == LINEARS

    # The trained model as peft itself applies the folder, against tunelab's merged inference load and the export.
    config = {"model_name_or_path": str(tiny_model_dir), "adapter_name_or_path": str(out), "template": "chatml"}
    tokenizer = load_tokenizer(load_config(config))
    batch = make_batch(tokenizer, TEXTS)
    reference = eval_logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out), batch)
    assert not torch.allclose(reference, eval_logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir), batch),
                              atol=1e-2)
    merged, _ = load(tiny_model_dir, trainable=False, adapter_name_or_path=str(out), template="chatml")
    assert not isinstance(merged, PeftModel)
    torch.testing.assert_close(eval_logits(merged, batch), reference, atol=1e-4, rtol=1e-4)
    exported = export_model(load_config({**config, "export_dir": str(tmp_path / "export")}))
    torch.testing.assert_close(eval_logits(AutoModelForCausalLM.from_pretrained(exported), batch), reference, atol=1e-4,
                               rtol=1e-4)


def test_oft_rank_dropout_and_listed_targets_reach_peft(tiny_model_dir):
    model, _ = load(tiny_model_dir, finetuning_type="oft", oft_rank=4, oft_block_size=0, oft_target="q_proj,v_proj",
                    module_dropout=0.1)
    settings = model.peft_config["default"]
    assert (settings.r, settings.oft_block_size, settings.module_dropout) == (4, 0, 0.1)
    # 4 blocks per layer over the 64 inputs: blocks of 16, each stored as its 16 x 15 / 2 free (skew) entries.
    blocks = {name.split(".")[-4]: tuple(p.shape) for name, p in model.named_parameters() if p.requires_grad}
    assert blocks == {"q_proj": (4, 120), "v_proj": (4, 120)}
    with pytest.raises(ConfigError, match=r"`oft_target`: qkv matches no module; the linear layers are: "):
        load(tiny_model_dir, finetuning_type="oft", oft_target="qkv")


def make_oft_adapter(model_dir: Path, folder: Path, seed: int) -> Path:
    """An OFT adapter with random (non-identity) rotations, so that its effect shows."""
    torch.manual_seed(seed)
    oft = OFTConfig(task_type="CAUSAL_LM", oft_block_size=16, target_modules=["q_proj", "down_proj"],
                    init_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), oft).save_pretrained(folder)
    return folder


def test_oft_adapters_are_continued_or_merged_as_lora_ones_are(tiny_model_dir, tmp_path):
    first = make_oft_adapter(tiny_model_dir, tmp_path / "a", seed=1)
    second = make_oft_adapter(tiny_model_dir, tmp_path / "b", seed=2)
    merged, tokenizer = load(tiny_model_dir, trainable=False, adapter_name_or_path=f"{first},{second}")
    batch = make_batch(tokenizer, TEXTS)
    expected = eval_logits(merged, batch)

    # Continued: the first is merged, the second trains further from its own weights (same function at the start).
    continued, _ = load(tiny_model_dir, finetuning_type="oft", adapter_name_or_path=f"{first},{second}")
    torch.testing.assert_close(eval_logits(continued, batch), expected, atol=1e-4, rtol=1e-4)
    assert continued.peft_config["default"].target_modules == {"q_proj", "down_proj"}
    assert {n.split(".")[-4] for n, p in continued.named_parameters() if p.requires_grad} == {"q_proj", "down_proj"}
    # create_new_adapter: both merged, a fresh OFT adapter (an identity at the start) on every linear layer.
    fresh, _ = load(tiny_model_dir, finetuning_type="oft", adapter_name_or_path=f"{first},{second}",
                    create_new_adapter=True)
    torch.testing.assert_close(eval_logits(fresh, batch), expected, atol=1e-4, rtol=1e-4)
    assert {n.split(".")[-4] for n, p in fresh.named_parameters() if p.requires_grad} == LINEARS
    assert_learned(train_steps(fresh, batch, lr=5e-3))

    with pytest.raises(ConfigError, match="of type OFT, which `finetuning_type: lora` cannot train further"):
        load(tiny_model_dir, finetuning_type="lora", adapter_name_or_path=str(second))


def test_a_fresh_oft_adapter_switched_off_is_the_reference_model(tiny_model_dir, tmp_path):
    adapter = make_oft_adapter(tiny_model_dir, tmp_path / "a", seed=1)
    dpo = {"model_name_or_path": str(tiny_model_dir), "stage": "dpo", "finetuning_type": "oft"}
    tokenizer = load_tokenizer(load_config(dpo))
    assert load_reference_model(load_config(dpo), tokenizer) is None
    # A continued adapter starts trained: switched off it is not the starting policy, so a frozen copy serves.
    continued = load_config({**dpo, "adapter_name_or_path": str(adapter)})
    reference = load_reference_model(continued, tokenizer)
    policy, _ = load(tiny_model_dir, trainable=False, adapter_name_or_path=str(adapter))
    batch = make_batch(tokenizer, TEXTS)
    torch.testing.assert_close(eval_logits(reference, batch), eval_logits(policy, batch))


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
@pytest.mark.parametrize("bits", [4, 8])
def test_oft_trains_on_a_quantized_base(tiny_qwen2_dir, bits):
    model, tokenizer = load(tiny_qwen2_dir, finetuning_type="oft", quantization_bit=bits, oft_block_size=16)
    assert {type(m.get_base_layer()).__name__ for m in model.modules() if hasattr(m, "oft_R")} == {
        "Linear4bit" if bits == 4 else "Linear8bitLt"}
    batch = make_batch(tokenizer, TEXTS)
    values = train_steps(model, batch, steps=4)
    eval_logits(model, batch)  # an evaluation in between must not stop the learning (see test_model.py's qlora test)
    values += train_steps(model, batch, steps=4)
    assert_learned(values)


@pytest.mark.distributed
def test_oft_two_processes_train_as_one_with_accumulation(tiny_model_dir, tmp_path):
    records = assert_two_processes_train_as_accumulation(
        lambda out, **more: run_config(tiny_model_dir, out, finetuning_type="oft", oft_block_size=16, max_steps=6,
                                       per_device_train_batch_size=2, learning_rate=5e-3, **more),
        tmp_path, 29641, keys=("loss",), weights=("adapter_model.safetensors",))
    assert records[-1]["loss"] < records[0]["loss"]


# --- LLaMA Pro ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def expanded_dir(tiny_model_dir, tmp_path_factory):
    """The tiny llama (2 layers) expanded by 2 blocks by `tunelab expand`: layers 0, copy of 0, 1, copy of 1."""
    output = tmp_path_factory.mktemp("expanded") / "model"
    assert main(["expand", str(tiny_model_dir), str(output), "--num_expand", "2"]) == 0
    return output


def test_expansion_inserts_identity_copies_and_keeps_the_logits(tiny_model_dir, expanded_dir, tmp_path):
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    expanded = AutoModelForCausalLM.from_pretrained(expanded_dir)
    assert expanded.config.num_hidden_layers == 4
    tokenizer = load_tokenizer(load_config({"model_name_or_path": str(expanded_dir)}))
    batch = make_batch(tokenizer, TEXTS)
    assert torch.equal(eval_logits(expanded, batch), eval_logits(original, batch))
    source, copies = original.state_dict(), expanded.state_dict()
    for new, old in ((0, 0), (1, 0), (2, 1), (3, 1)):
        for key, value in source.items():
            if f"layers.{old}." not in key:
                continue
            copy = copies[key.replace(f"layers.{old}.", f"layers.{new}.")]
            zeroed = new in (1, 3) and ("o_proj" in key or "down_proj" in key)
            assert torch.equal(copy, torch.zeros_like(value) if zeroed else value), (new, key)
    with pytest.raises(ConfigError, match="must divide the model's 2 layers evenly"):
        expand_blocks(str(tiny_model_dir), tmp_path / "three", num_expand=3)
    with pytest.raises(ConfigError, match="is not empty"):
        expand_blocks(str(tiny_model_dir), expanded_dir, num_expand=2)


@pytest.mark.parametrize(("layers", "wanted", "expected"), [(4, 2, [1, 3]), (6, 2, [2, 5]), (6, 3, [1, 3, 5]),
                                                           (8, 1, [7])])
def test_llama_pro_picks_the_last_block_of_every_group(layers, wanted, expected):
    config = load_config({"model_name_or_path": "m", "finetuning_type": "freeze", "use_llama_pro": True,
                          "freeze_trainable_layers": wanted})
    assert trainable_layer_ids(config, layers) == expected


def test_llama_pro_refuses_uneven_groups(expanded_dir):
    with pytest.raises(ConfigError, match=r"4 layers cannot be split into `freeze_trainable_layers: 3` equal groups"):
        load(expanded_dir, finetuning_type="freeze", use_llama_pro=True, freeze_trainable_layers=3)


def test_llama_pro_freeze_trains_the_inserted_blocks_only(expanded_dir, tmp_path):
    out = tmp_path / "pro"
    tunelab.train(run_config(expanded_dir, out, finetuning_type="freeze", use_llama_pro=True,
                             freeze_trainable_layers=2, learning_rate=1e-3))
    assert_learned(losses(out))
    before, after = load_file(expanded_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    for key, value in before.items():
        inserted = ".layers.1." in key or ".layers.3." in key
        assert torch.equal(after[key], value) != inserted, key


def test_llama_pro_lora_puts_the_adapter_on_the_inserted_blocks_only(expanded_dir):
    model, tokenizer = load(expanded_dir, finetuning_type="lora", use_llama_pro=True, freeze_trainable_layers=2)
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert {(name.split(".layers.")[1].split(".")[0], name.split(".")[-4]) for name in trained} == {
        (layer, module) for layer in ("1", "3") for module in LINEARS}
    assert_learned(train_steps(model, make_batch(tokenizer, TEXTS)))


@pytest.mark.distributed
def test_llama_pro_two_processes_train_as_one_with_accumulation(expanded_dir, tmp_path):
    records = assert_two_processes_train_as_accumulation(
        lambda out, **more: run_config(expanded_dir, out, finetuning_type="freeze", use_llama_pro=True,
                                       freeze_trainable_layers=2, learning_rate=1e-3, max_steps=6,
                                       per_device_train_batch_size=2, **more),
        tmp_path, 29621, keys=("loss",), weights=("model.safetensors",))
    assert records[-1]["loss"] < records[0]["loss"]


# --- precision ------------------------------------------------------------------------------------------------------

def test_pure_bf16_holds_and_trains_every_weight_in_bf16(tiny_model_dir, tmp_path):
    adapter, _ = load(tiny_model_dir, pure_bf16=True)
    assert {p.dtype for p in adapter.parameters()} == {torch.bfloat16}
    assert any(p.requires_grad for p in adapter.parameters())
    mixed, _ = load(tiny_model_dir, bf16=True)
    assert {p.dtype for p in mixed.parameters() if p.requires_grad} == {torch.float32}

    out = tmp_path / "pure"
    config = run_config(tiny_model_dir, out, finetuning_type="full", pure_bf16=True, learning_rate=1e-3)
    # No mixed precision: the Trainer gets neither bf16 nor fp16, so it never autocasts.
    arguments = build_training_arguments(load_config(config))
    assert not arguments.bf16 and not arguments.fp16
    tunelab.train(config)
    assert_learned(losses(out))
    assert {value.dtype for value in load_file(out / "model.safetensors").values()} == {torch.bfloat16}


def test_upcast_layernorm_keeps_norms_in_float32_and_the_model_runs_in_bf16(tiny_model_dir):
    plain, tokenizer = load(tiny_model_dir, pure_bf16=True)
    upcast, _ = load(tiny_model_dir, pure_bf16=True, upcast_layernorm=True)
    norms = {name for name, _ in upcast.named_parameters() if "norm" in name}
    assert len(norms) == 5  # two per layer and the final one
    for name, p in upcast.named_parameters():
        assert p.dtype == (torch.float32 if name in norms else torch.bfloat16), name
    assert {p.dtype for name, p in plain.named_parameters() if name in norms} == {torch.bfloat16}
    batch = make_batch(tokenizer, TEXTS)
    # Without autocast, each norm hands the next layer the bf16 it expects; the result differs only by rounding.
    torch.testing.assert_close(eval_logits(upcast, batch), eval_logits(plain, batch), atol=0.1, rtol=0.05)
    assert_learned(train_steps(upcast, batch))


def test_upcast_lmhead_output_returns_float32_logits(tiny_model_dir):
    plain, tokenizer = load(tiny_model_dir, pure_bf16=True)
    upcast, _ = load(tiny_model_dir, pure_bf16=True, upcast_lmhead_output=True)
    batch = make_batch(tokenizer, TEXTS)
    with torch.no_grad():
        assert plain(**batch).logits.dtype == torch.bfloat16
        assert upcast(**batch).logits.dtype == torch.float32
    torch.testing.assert_close(eval_logits(upcast, batch), eval_logits(plain, batch), atol=0, rtol=0)
    assert_learned(train_steps(upcast, batch))
