"""LLaMA-Factory v1 configs: each v1 key lands on the tunelab key it means, untranslatable settings are refused by
name with the reason, a v0 config is never read as v1, and a v1 config trains.

    .venv/bin/python -m pytest tests/config/test_llamafactory_v1.py
"""

import json
import textwrap
from pathlib import Path

import pytest
import yaml

import tunelab
from tunelab.config import ConfigError, load_config
from tunelab.config.llamafactory_v1 import (MUON_FIXED, V0_KEYS, V1_KEYS, V1_ONLY_KEYS, is_v1_config,
                                            translate_v1)
from tunelab.config.load import read_config_file
from helpers import REPO, SEED_YAML, read_log

#: Every top-level field of v1's ModelArguments, DataArguments, TrainingArguments and SampleArguments, as read in
#: LLaMA-Factory's src/llamafactory/v1/config/*_args.py.
V1_FIELDS = """model custom_chat_template trust_remote_code flash_attn model_class init_config peft_config kernel_config
quant_config train_dataset eval_dataset output_dir micro_batch_size global_batch_size cutoff_len learning_rate
num_train_epochs max_steps max_grad_norm bf16 batching_strategy batching_workers enable_activation_checkpointing
dist_config dp_size cp_size cp_mode mp_replicate_size mp_shard_size dist_timeout optim_config lr_scheduler_config
seed full_determinism resume_from_checkpoint save_steps save_epochs save_ckpt_as_hf save_total_limit logging_steps
pref_loss pref_beta pref_ftx simpo_gamma dpo_label_smoothing ld_alpha sample_backend max_new_tokens""".split()


@pytest.fixture
def v1_file(tmp_path, monkeypatch):
    """Write a v1 config (and the dataset yaml it names, listing the repository's identity data); return its path."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    datasets = tmp_path / "v1_sft.yaml"
    datasets.write_text(f"identity:\n  path: {REPO / 'data' / 'identity.json'}\n  source: local\n  converter: alpaca\n")

    def write(text: str) -> Path:
        path = tmp_path / "v1.yaml"
        path.write_text(textwrap.dedent(text).replace("DATASETS", str(datasets)))
        return path
    write.datasets = datasets
    return write


def translated(text: str, world_size: int = 1) -> dict:
    values = yaml.safe_load(textwrap.dedent(text))
    translation = translate_v1(values, "v1.yaml", world_size)
    assert translation.problems == []
    return translation.values


def refusal_of(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return str(info.value)


# ------------------------------------------------------------------ each key lands where it should

def test_v1_keys_land_on_the_tunelab_keys_they_mean(v1_file):
    config = load_config(v1_file("""
        model: some/model
        trust_remote_code: true
        flash_attn: flash_attention_2
        model_class: llm
        peft_config: {name: lora, r: 16, lora_alpha: 32, lora_dropout: 0.1, target_modules: [q_proj, v_proj],
                      use_rslora: true, modules_to_save: [lm_head]}
        kernel_config: {name: auto}
        train_dataset: DATASETS
        output_dir: out
        micro_batch_size: 2
        global_batch_size: 8
        cutoff_len: 512
        learning_rate: 3.0e-5
        num_train_epochs: 2
        max_steps: 40
        max_grad_norm: 0.5
        bf16: false
        batching_strategy: normal
        batching_workers: 2
        enable_activation_checkpointing: false
        dist_timeout: 600
        seed: 7
        full_determinism: true
        save_steps: 20
        save_total_limit: 2
        logging_steps: 5
        pref_beta: 0.2
        sample_backend: hf
        max_new_tokens: 64
    """))
    assert config.model_name_or_path == "some/model" and config.trust_remote_code and config.flash_attn == "fa2"
    assert config.finetuning_type == "lora" and config.lora_rank == 16 and config.lora_alpha == 32
    assert config.lora_dropout == pytest.approx(0.1) and config.lora_target == ["q_proj", "v_proj"]
    assert config.use_rslora and config.additional_target == ["lm_head"]
    assert config.dataset == [str(v1_file.datasets)] and config.do_train and config.output_dir == "out"
    # global 8 = micro 2 x 1 process x 4 accumulated passes
    assert config.per_device_train_batch_size == 2 and config.gradient_accumulation_steps == 4
    assert (config.cutoff_len, config.learning_rate, config.num_train_epochs, config.max_steps) == (512, 3e-5, 2, 40)
    assert config.max_grad_norm == 0.5 and not config.bf16 and config.dataloader_num_workers == 2
    assert config.disable_gradient_checkpointing and config.ddp_timeout == 600 and config.seed == 7
    assert config.save_steps == 20 and config.save_strategy == "steps" and config.logging_steps == 5
    assert config.pref_beta == pytest.approx(0.2) and config.infer_backend == "huggingface"
    assert config.max_new_tokens == 64
    assert config.extra_training_args == {"full_determinism": True, "save_total_limit": 2, "weight_decay": 0.01,
                                          "dataloader_drop_last": True}


def test_keys_left_out_take_v1s_defaults_not_tunelabs(v1_file):
    config = load_config(v1_file("model: some/model\npeft_config: {name: lora, r: 32}\n"))
    assert config.finetuning_type == "lora" and config.lora_rank == 32
    assert config.lora_alpha == 16 and config.lora_dropout == pytest.approx(0.05)  # tunelab: 2 x rank, 0
    assert config.per_device_train_batch_size == 1 and config.learning_rate == pytest.approx(1e-4)
    assert config.lr_scheduler_type == "constant" and config.extra_training_args["weight_decay"] == 0.01
    assert config.logging_steps == 1 and config.bf16 and config.flash_attn == "sdpa" and config.max_new_tokens == 128
    assert config.save_strategy == "no" and config.ddp_timeout == 18000
    assert load_config(v1_file("model: some/model\n")).finetuning_type == "full"  # no peft_config


def test_global_batch_size_divides_by_the_world_size_at_load_time(v1_file, monkeypatch):
    path = v1_file("model: m\nmicro_batch_size: 2\nglobal_batch_size: 16\n")
    assert load_config(path).gradient_accumulation_steps == 8
    monkeypatch.setenv("WORLD_SIZE", "4")  # as torchrun sets it in each process
    assert load_config(path).gradient_accumulation_steps == 2
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert "`global_batch_size` (v1): got 16; expected a multiple of micro_batch_size x world size = 2 x 3" \
        in refusal_of(path)


@pytest.mark.parametrize("text, expected", [
    ("peft_config: {name: freeze, freeze_trainable_layers: -1, freeze_trainable_modules: mlp, "
     "freeze_extra_modules: [embed_tokens]}",
     {"finetuning_type": "freeze", "freeze_trainable_layers": -1, "freeze_trainable_modules": "mlp",
      "freeze_extra_modules": ["embed_tokens"]}),
    ("quant_config: {name: bnb}", {"quantization_bit": 4}),
    ("quant_config: {name: bnb, quantization_bit: 8, double_quantization: false, quantization_type: fp4}",
     {"quantization_bit": 8, "double_quantization": False, "quantization_type": "fp4"}),
    ("dist_config: {name: fsdp2, reshard_after_forward: false, offload_params: true}",
     {"fsdp": True, "fsdp_config": {"version": 2, "reshard_after_forward": False, "cpu_offload": True}}),
    ("dist_config: {name: fsdp2}\ninit_config: {name: init_on_rank0}",
     {"fsdp_config": {"version": 2, "reshard_after_forward": True, "cpu_offload": False,
                      "cpu_ram_efficient_loading": True}}),
    ("save_epochs: 1\nsave_steps: 10", {"save_strategy": "epoch"}),
    ("resume_from_checkpoint: out/checkpoint-20", {"resume_from_checkpoint": "out/checkpoint-20"}),
    ("peft_config: {name: lora, adapter_name_or_path: out, export_dir: merged, export_size: 2, infer_dtype: bfloat16}",
     {"adapter_name_or_path": "out", "export_dir": "merged", "export_size": 2, "infer_dtype": "bfloat16"}),
])
def test_plugin_blocks_and_checkpoint_keys_translate(text, expected):
    values = translated("model: m\n" + text)
    assert {key: values.get(key) for key in expected} == expected


def test_nothing_is_set_for_keys_v1_reads_as_tunelab_does():
    values = translated("model: m\nquant_config: {name: auto}\nresume_from_checkpoint: auto\neval_dataset: x\n"
                        "cp_mode: ulysses\nsave_ckpt_as_hf: true\n")
    assert "quantization_bit" not in values and "resume_from_checkpoint" not in values  # v1: no quantization
    assert "eval_dataset" not in values  # v1 declares it but never evaluates


@pytest.mark.parametrize("enabled, expected", [
    ({}, True), ({"bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}}, True),
    ({"bf16": {"enabled": False}}, False), ({"fp16": {"enabled": False}}, False), ({"bf16": {"enabled": True}}, True),
])
def test_deepspeed_takes_its_file_and_v1s_precision_rule(tmp_path, enabled, expected):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, **enabled}))
    values = translated(f"model: m\nbf16: false\ndist_config: {{name: deepspeed, config_file: {path}}}\n")
    assert values["deepspeed"] == str(path) and values["bf16"] is expected  # v1 ignores `bf16` under DeepSpeed


def test_a_dataset_yaml_is_passed_to_the_data_registry_as_it_is(tmp_path):
    """Its entries are read and checked by the registry (tests/data/test_v1_dataset_yaml.py), before any model."""
    listing = tmp_path / "data.yaml"
    listing.write_text("a: {path: missing.json, source: hub, size: -1}\n")
    values = translated(f"model: m\ntrain_dataset: {listing}\n")
    assert values["dataset"] == [str(listing)] and values["do_train"] and "streaming" not in values


def test_muon_takes_v1s_settings_and_defaults():
    values = translated("model: m\nlearning_rate: 2.0e-5\noptim_config: {name: muon, wd: 0.05, momentum: 0.95, "
                        "nesterov: true, ns_steps: 5, adamw_betas: [0.8, 0.9], adamw_eps: 1.0e-6}\n")
    assert values["use_muon"] and values["learning_rate"] == 2e-5
    assert [values[key] for key in ("weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon")] == [0.05, 0.8, 0.9,
                                                                                                    1e-6]
    # v1's Muon defaults are not AdamW's: weight decay 0.1, betas (0.9, 0.95).
    values = translated("model: m\noptim_config: {name: muon}\n")
    assert [values[key] for key in ("weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon")] == [0.1, 0.9, 0.95,
                                                                                                    1e-8]
    assert "use_muon" not in translated("model: m\n")


def test_muon_accepts_only_the_settings_torch_and_v1_share():
    """tunelab's Muon is torch.optim.Muon at its defaults: v1's momentum, nesterov and ns_steps must be those."""
    import inspect

    import torch

    torch_defaults = {key: value.default for key, value in inspect.signature(torch.optim.Muon).parameters.items()}
    assert {key: torch_defaults[key] for key in MUON_FIXED} == MUON_FIXED
    assert MUON_FIXED == {"momentum": 0.95, "nesterov": True, "ns_steps": 5}  # v1's muon plugin's defaults
    assert translated("model: m\noptim_config: {name: muon, momentum: 0.95, nesterov: true, ns_steps: 5}\n")["use_muon"]


def test_optim_config_lr_is_ignored_as_v1_does(caplog):
    """v1 overwrites `optim_config.lr` with `learning_rate` (training_args.py), warning; so does tunelab."""
    values = translated("model: m\nlearning_rate: 3.0e-5\noptim_config: {name: muon, lr: 0.02}\n")
    assert values["learning_rate"] == 3e-5 and "`optim_config.lr` is ignored" in caplog.text


@pytest.mark.parametrize("name, enabled", [("liger_kernel", True), ("auto, liger_kernel", True), ("auto", False)])
def test_liger_kernel_turns_on_tunelabs_liger(name, enabled):
    values = translated(f"model: m\nkernel_config: {{name: '{name}', require_logits: true}}\n")
    assert values.get("enable_liger_kernel", False) is enabled


def test_padding_free_is_tunelabs_padding_free():
    """v1's padding_free packs a micro-batch's samples into one row, as `padding_free` does. It is not
    `neat_packing`, which would put more samples in each micro-batch."""
    values = translated("model: m\nmicro_batch_size: 4\nbatching_strategy: padding_free\n")
    assert values["per_device_train_batch_size"] == 4 and values["padding_free"] is True
    assert not values.get("neat_packing") and not values.get("packing")
    assert "padding_free" not in translated("model: m\nmicro_batch_size: 4\nbatching_strategy: normal\n")


# ------------------------------------------------------------------ refusals, by v1 name and with the reason

@pytest.mark.parametrize("text, message", [
    ("cp_size: 2\ncp_mode: ulysses", "`cp_size: 2` (v1) is a LLaMA-Factory setting tunelab does not support "
                                     "(context parallelism"),
    ("dist_config: {name: fsdpturbo, ep_size: 16}", "`dist_config.name: fsdpturbo` (v1) is a LLaMA-Factory setting "
                                                    "tunelab does not support (FSDPTurbo, v1's FSDP engine"),
    ("kernel_config: {name: 'auto, flash-linear-attention'}", "`kernel_config.name: flash-linear-attention` (v1)"),
    ("optim_config: {name: muon, momentum: 0.9}", "`optim_config.momentum: 0.9` (v1) is a LLaMA-Factory setting "
                                                  "tunelab does not support (tunelab's Muon is torch.optim.Muon"),
    ("optim_config: {name: muon, nesterov: false}", "`optim_config.nesterov: false` (v1)"),
    ("optim_config: {name: muon, ns_steps: 6}", "`optim_config.ns_steps: 6` (v1)"),
    ("optim_config: {name: muon, adamw_betas: 0.9}", "`optim_config.adamw_betas` (v1): got 0.9; expected two numbers"),
    ("optim_config: {name: muon, weight_decay: 0.1}", "unknown v1 key `optim_config.weight_decay`"),
    ("optim_config: {name: muon}\npeft_config: {name: lora}", "`optim_config.name: muon` (v1) is a LLaMA-Factory "
                                                              "setting tunelab does not support (v1 gives the LoRA "
                                                              "matrices to AdamW"),
    ("optim_config: {name: adamw}", "`optim_config.name` (v1): got 'adamw'; expected one of: muon"),
    ("lr_scheduler_config: {name: cosine}", "`lr_scheduler_config: {'name': 'cosine'}` (v1) is a LLaMA-Factory "
                                            "setting tunelab does not support (v1 registers no scheduler plugin"),
    ("batching_strategy: dynamic_padding_free", "`batching_strategy: dynamic_padding_free` (v1) is a LLaMA-Factory "
                                                "setting tunelab does not support (token-budget micro-batches"),
    ("batching_strategy: dynamic_batching", "`batching_strategy: dynamic_batching` (v1) is a LLaMA-Factory setting"),
    ("custom_chat_template: '{{ messages }}'", "`custom_chat_template: {{ messages }}` (v1)"),
    ("model_class: cls", "`model_class: cls` (v1) is a LLaMA-Factory setting tunelab does not support (tunelab "
                         "trains causal language models"),
    ("mp_replicate_size: 2", "`mp_replicate_size: 2` (v1) is a LLaMA-Factory setting tunelab does not support "
                             "(hybrid sharding"),
    ("init_config: {name: init_on_meta}", "`init_config.name: init_on_meta` (v1)"),
    ("init_config: {name: init_on_rank0}", "`init_config.name: init_on_rank0` (v1) is a LLaMA-Factory setting "
                                           "tunelab does not support (loading the weights on the first process only"),
    ("dist_config: {name: fsdp2, dcp_path: ckpt}", "`dist_config.dcp_path: ckpt` (v1)"),
    ("save_epochs: 0.5", "`save_epochs: 0.5` (v1) is a LLaMA-Factory setting tunelab does not support (tunelab "
                         "saves every N steps"),
    ("peft_config: {name: freeze, cast_trainable_params_to_fp32: false}",
     "`peft_config.cast_trainable_params_to_fp32: false` (v1)"),
    ("ld_alpha: 0.5", "v1.yaml (v1 `ld_alpha`): `ld_alpha` is a LLaMA-Factory option tunelab does not support"),
    ("train_dataset: llamafactory/v1-sft-demo", "`train_dataset: llamafactory/v1-sft-demo` (v1) is a LLaMA-Factory "
                                                "setting tunelab does not support (no such file here, so v1 reads it "
                                                "from the hub"),
    ("micro_batch_sise: 2", "v1.yaml: unknown v1 key `micro_batch_sise` (did you mean `micro_batch_size`?)"),
    ("peft_config: {name: lora, rank: 8}", "unknown v1 key `peft_config.rank`"),
    ("peft_config: {name: oft}", "`peft_config.name` (v1): got 'oft'; expected one of: lora, freeze"),
    ("flash_attn: fa2", "`flash_attn` (v1): got 'fa2'; expected one of: eager, sdpa, flash_attention_2"),
    ("micro_batch_size: two", "v1.yaml (v1 `micro_batch_size`): `per_device_train_batch_size`: got 'two'; expected "
                              "an integer"),
])
def test_untranslatable_v1_settings_are_refused_by_name_with_the_reason(v1_file, text, message):
    assert message in refusal_of(v1_file("model: m\n" + text + "\n"))


def test_a_data_file_named_directly_is_v1s_own_format_and_refused(v1_file):
    path = REPO / "data" / "identity.json"
    assert f"`train_dataset: {path}` (v1) is a LLaMA-Factory setting tunelab does not support (without a " \
           f"`converter` v1 reads its own sample format" in refusal_of(v1_file(f"model: m\ntrain_dataset: {path}\n"))


def test_a_file_mixing_v1_and_v0_keys_is_read_as_v0_naming_the_v1_keys(v1_file):
    message = refusal_of(v1_file("model: m\nmicro_batch_size: 2\nstage: dpo\nlearning_rate: 1.0e-4\n"))
    for key in ("model", "micro_batch_size"):
        assert f"unknown key `{key}` (see `tunelab help keys`); it is a LLaMA-Factory v1 key, read only in a v1 " \
               f"config (no v0 keys)" in message


# ------------------------------------------------------------------ a v0 config is never read as v1

def test_no_key_of_a_v0_config_marks_a_file_as_v1():
    """The detection rule: a file is v1 only through a key that no v0 config may hold."""
    assert not any(is_v1_config({key: None}) for key in V0_KEYS)
    assert not is_v1_config({"model": "m", "micro_batch_size": 2, "model_name_or_path": "m"})  # mixed: v0
    assert V1_ONLY_KEYS.isdisjoint(V0_KEYS) and set(V1_FIELDS) == V1_KEYS
    # The keys that decide, pinned: a v0 key added later under one of these names must show up here.
    assert V1_ONLY_KEYS == set("""model custom_chat_template model_class init_config peft_config kernel_config
        quant_config train_dataset micro_batch_size global_batch_size batching_strategy batching_workers
        enable_activation_checkpointing dist_config dp_size cp_size cp_mode mp_replicate_size mp_shard_size
        dist_timeout optim_config lr_scheduler_config save_epochs save_ckpt_as_hf sample_backend""".split())


@pytest.mark.parametrize("path", sorted((REPO / "examples").glob("*.yaml")), ids=lambda path: path.name)
def test_tunelab_examples_are_v0(path):
    assert not is_v1_config(read_config_file(path))


def test_v0_configs_keep_v0_meaning_and_messages(tmp_path):
    path = tmp_path / "v0.yaml"
    path.write_text(SEED_YAML)
    assert not is_v1_config(read_config_file(path))
    # Keys both formats share read as v0, with tunelab's defaults (v1's micro batch would be 1).
    path.write_text("model_name_or_path: m\nlearning_rate: 1.0e-4\noutput_dir: out\n")
    assert load_config(path).per_device_train_batch_size == 8
    path.write_text("model_name_or_path: m\nlearning_rte: 1.0e-4\n")
    assert "unknown key `learning_rte` (did you mean `learning_rate`?)" in refusal_of(path)


# ------------------------------------------------------------------ a v1 config trains

def test_a_v1_lora_config_trains(v1_file, tiny_model_dir, tmp_path):
    path = v1_file(f"""
        model: {tiny_model_dir}
        peft_config: {{name: lora, r: 8, target_modules: all}}
        train_dataset: DATASETS
        output_dir: {tmp_path / "out"}
        micro_batch_size: 4
        global_batch_size: 8
        cutoff_len: 128
        learning_rate: 1.0e-2
        max_steps: 6
        bf16: false
        seed: 0
    """)
    tunelab.train(path)
    log = read_log(tmp_path / "out")
    assert [row["current_steps"] for row in log if "loss" in row] == [1, 2, 3, 4, 5, 6]  # logging_steps 1 (v1)
    losses = [row["loss"] for row in log if "loss" in row]
    assert 2 < losses[0] < 12 and losses[-1] < losses[0] - 0.5  # measured: 6.85 -> 5.63
    adapter = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"], adapter["lora_dropout"]) == (8, 16, 0.05)  # v1's LoRA defaults
    assert not list((tmp_path / "out").glob("checkpoint-*"))  # v1 saves no checkpoint without save_steps
