"""The config layer: schema types, did-you-mean, every cross-field rule, overrides, and the light CLI start-up."""

import dataclasses
import json
import subprocess
import sys

import pytest

from tunelab.cli import main, parse_overrides
from tunelab.config import ConfigError, load_config
from tunelab.config.passthrough import IGNORED_TRAINING_KEYS, PASSTHROUGH_TRAINING_KEYS, RENAMED_TRAINING_KEYS
from tunelab.config.rules import RULES
from tunelab.config.schema import STAGES, public_fields
from helpers import REPO, SEED_YAML

BASE = {"model_name_or_path": "some/model", "do_train": True, "dataset": "identity", "output_dir": "out"}


def error_of(values: dict, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(values, overrides)
    return str(info.value)


def test_seed_yaml_loads_with_its_values(tmp_path):
    path = tmp_path / "llama3_lora_sft.yaml"
    path.write_text(SEED_YAML)
    config = load_config(path)
    assert config.dataset == ["identity", "alpaca_en_demo"]
    assert config.learning_rate == pytest.approx(1e-4)
    assert config.lora_target == ["all"] and config.lora_alpha == 16
    assert config.bf16 and config.overwrite_output_dir and config.val_size == pytest.approx(0.1)
    assert config.eval_strategy == "steps" and config.eval_steps == 500


def test_unknown_key_names_file_key_and_closest_key(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("model_name_or_path: m\nlearning_rte: 1.0e-4\n")
    with pytest.raises(ConfigError, match=r"cfg\.yaml: unknown key `learning_rte` \(did you mean `learning_rate`\?\)"):
        load_config(path)


def test_unknown_override_is_attributed_to_the_command_line():
    message = error_of(BASE, [("lora_rnak", "8")])
    assert "command line: unknown key `lora_rnak`" in message and "`lora_rank`" in message


@pytest.mark.parametrize("key, value, expected", [
    ("learning_rate", "fast", "expected a number"),
    ("learning_rate", -1, "greater than 0"),
    ("lora_rank", 0, "at least 1"),
    ("lora_dropout", 1.5, "at most 1"),
    ("bf16", "maybe", "expected true or false"),
    ("cutoff_len", 3.5, "expected an integer"),
    ("stage", "rlhf", "expected one of: " + ", ".join(STAGES)),
    ("finetuning_type", "partial", "expected one of: full, freeze, lora, qlora"),
    ("lora_target", 5, "expected a list of strings"),
    ("interleave_probs", "0.5,half", "expected a list of numbers"),
    ("template", 3, "expected a string"),
])
def test_bad_values_name_key_value_and_what_is_allowed(key, value, expected):
    message = error_of({**BASE, key: value})
    assert f"`{key}`" in message and repr(value) in message and expected in message


def test_all_problems_are_reported_together():
    message = error_of({**BASE, "lora_rank": 0, "bf16": "x", "warmup_ratoi": 0.1})
    assert message.startswith("3 problems") and "lora_rank" in message and "warmup_ratio" in message


def test_text_values_take_the_declared_type():
    config = load_config(BASE, parse_overrides(["learning_rate=1e-4", "--bf16", "--eval_strategy", "no",
                                                "max_samples=10", "lora_target=q_proj, v_proj", "weight_decay=0.01"]))
    assert config.learning_rate == pytest.approx(1e-4) and config.bf16 is True
    assert config.eval_strategy == "no" and config.max_samples == 10
    assert config.lora_target == ["q_proj", "v_proj"]
    assert config.extra_training_args == {"weight_decay": 0.01}


def test_json_config_and_yaml_syntax_errors(tmp_path):
    good = tmp_path / "cfg.json"
    good.write_text(json.dumps(BASE))
    assert load_config(good).dataset == ["identity"]
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"model_name_or_path": "m",\n "x": }')
    with pytest.raises(ConfigError, match=r"bad\.json:2:\d+: invalid JSON"):
        load_config(bad_json)
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model_name_or_path: m\nstage: [sft\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+:\d+: invalid YAML"):
        load_config(bad_yaml)


def test_keys_transformers_5_removed_are_handled():
    config = load_config({**BASE, "evaluation_strategy": "steps", "val_size": 0.1, "logging_dir": "logs",
                          "save_safetensors": True, "no_cuda": True, "overwrite_output_dir": True})
    assert config.eval_strategy == "steps" and config.overwrite_output_dir
    assert config.extra_training_args == {"use_cpu": True}


def test_fsdp_keys_transformers_5_moved_go_into_fsdp_config():
    config = load_config({**BASE, "fsdp": "full_shard auto_wrap",
                          "fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer"})
    assert config.extra_training_args["fsdp_config"] == {"transformer_layer_cls_to_wrap": "LlamaDecoderLayer"}
    assert "fsdp_transformer_layer_cls_to_wrap" not in config.extra_training_args
    assert "write `min_num_params` in that file instead" in error_of(
        {**BASE, "fsdp_config": "fsdp.json", "fsdp_min_num_params": 1000})


def test_llamafactory_keys_not_supported_yet_are_refused_only_when_switched_on():
    assert load_config({**BASE, "packing": False, "use_kt": False}).dataset == ["identity"]
    assert "`use_kt` is a LLaMA-Factory option tunelab does not support (a GPU kernel" in error_of(
        {**BASE, "use_kt": True})


# One config per rule that breaks exactly that rule, keyed by a phrase of the rule's message.
RULE_CASES = {
    "`dpo_label_smoothing` applies to": {"stage": "dpo", "pref_loss": "hinge", "dpo_label_smoothing": 0.1},
    "`pref_ftx` does not apply to orpo": {"stage": "orpo", "pref_ftx": 0.5},
    "`kto_chosen_weight` and `kto_rejected_weight` apply": {"stage": "dpo", "kto_chosen_weight": 2.0},
    "`do_predict` and `predict_with_generate` apply to `stage: sft` only": {
        "stage": "pt", "do_predict": True, "predict_with_generate": True, "eval_dataset": "x"},
    "go together": {"predict_with_generate": True},
    "`do_predict` generates replies for the evaluation set": {"do_predict": True, "predict_with_generate": True},
    "`do_predict` needs `output_dir`": {"do_train": False, "output_dir": None, "do_predict": True,
                                        "predict_with_generate": True, "eval_dataset": "x"},
    "`model_name_or_path` is required": {"do_train": False},
    "`do_train` needs `dataset`": {"dataset": None},
    "`do_train` needs `output_dir`": {"output_dir": None},
    "`bf16` and `fp16` are exclusive": {"bf16": True, "fp16": True},
    "`quantization_bit` needs `finetuning_type: lora`": {"finetuning_type": "full", "quantization_bit": 4},
    "`adapter_name_or_path` needs `finetuning_type: lora`": {"finetuning_type": "freeze",
                                                             "adapter_name_or_path": "a"},
    "`create_new_adapter` needs `adapter_name_or_path`": {"create_new_adapter": True},
    "`train_on_prompt` and `mask_history` are exclusive": {"train_on_prompt": True, "mask_history": True},
    "apply to `stage: sft` only": {"stage": "pt", "mask_history": True},
    "`val_size` and `eval_dataset` are exclusive": {"val_size": 0.1, "eval_dataset": "x",
                                                    "eval_strategy": "steps"},
    "needs an evaluation set": {"do_eval": True},
    "`freeze_trainable_layers` must not be 0": {"finetuning_type": "freeze", "freeze_trainable_layers": 0},
    "`lora_target: all` already covers": {"lora_target": "all,q_proj"},
    "`overwrite_output_dir` starts over": {"overwrite_output_dir": True, "resume_from_checkpoint": "ckpt"},
    "`streaming` needs `max_steps`": {"streaming": True},
    "`streaming` cannot hold out": {"streaming": True, "max_steps": 10, "val_size": 0.1, "eval_strategy": "steps"},
    "`neat_packing` is a kind of packing": {"neat_packing": True, "packing": False},
    "`interleave_probs` needs `mix_strategy": {"dataset": "a,b", "interleave_probs": "0.5,0.5"},
    "one probability per dataset": {"dataset": "a,b", "mix_strategy": "interleave_under", "interleave_probs": "1.0"},
    "must add up to 1": {"dataset": "a,b", "mix_strategy": "interleave_under", "interleave_probs": "0.6,0.6"},
    "are dpo with that `pref_loss`": {"stage": "orpo", "pref_loss": "sigmoid"},
    "`pref_loss` applies to `stage: dpo`": {"stage": "kto", "pref_loss": "sigmoid"},
    "`ref_model` is only read by": {"stage": "dpo", "pref_loss": "simpo", "ref_model": "m"},
    "`ref_model_adapters` and `ref_model_quantization_bit` need": {"stage": "dpo", "ref_model_adapters": "a"},
    "`stage: ppo` needs `reward_model`": {"stage": "ppo"},
    "`stage: grpo` needs `reward_funcs`": {"stage": "grpo"},
    "read by `stage: ppo` and `stage: grpo` only": {"stage": "sft", "reward_funcs": "m:f"},
    "needs `finetuning_type: lora`; use `reward_model_type: full`": {"stage": "ppo", "reward_model": "rm",
                                                                     "finetuning_type": "full"},
    "`reward_model_type: api` takes an http(s) URL": {"stage": "ppo", "reward_model": "http://localhost:1/score"},
    "apply to `reward_model_type: full`": {"stage": "ppo", "reward_model": "rm", "reward_model_adapters": "a"},
    "is `module:function` or": {"stage": "grpo", "reward_funcs": "rewards.py"},
    "have no evaluation loss": {"stage": "grpo", "reward_funcs": "m:f", "val_size": 0.1, "eval_strategy": "steps"},
    "the other stages score whole samples": {"stage": "dpo", "packing": True},
    "learns from sampled completions": {"stage": "grpo", "reward_funcs": "m:f", "do_sample": False},
    "is not supported by stage": {"stage": "grpo", "reward_funcs": "m:f", "streaming": True, "max_steps": 4},
    "needs an evaluation metric": {"stage": "ppo", "reward_model": "rm", "save_strategy": "best"},
    "runs its own loop, on DDP or DeepSpeed": {"stage": "ppo", "reward_model": "rm", "fsdp": "full_shard"},
    "are LoRA variants": {"finetuning_type": "full", "use_dora": True},
    "takes exactly one of `oft_rank` and `oft_block_size`": {"finetuning_type": "oft", "oft_rank": 4},
    "`pissa_convert` converts a PiSSA adapter": {"pissa_convert": True},
    "cannot serve as this stage's reference": {"stage": "dpo", "pissa_init": True},
    "cannot run on a quantized base": {"pissa_init": True, "quantization_bit": 4},
    "`pissa_convert` is not supported there": {"stage": "grpo", "reward_funcs": "m:f", "grpo_beta": 0,
                                               "pissa_init": True, "pissa_convert": True},
    "cannot convert a DoRA adapter": {"pissa_init": True, "pissa_convert": True, "use_dora": True},
    "`module_dropout` applies to": {"module_dropout": 0.1},
    "needs a positive `freeze_trainable_layers`": {"finetuning_type": "freeze", "use_llama_pro": True,
                                                   "freeze_trainable_layers": -2},
    "optimize the base weights themselves": {"use_galore": True},
    "each choose the optimizer": {"finetuning_type": "full", "use_muon": True, "use_adam_mini": True},
    "train with one process only": {"finetuning_type": "full", "use_badam": True},
    "they need `gradient_accumulation_steps: 1`": {"finetuning_type": "full", "use_apollo": True,
                                                  "apollo_layerwise": True, "gradient_accumulation_steps": 2},
    "`use_badam` switches blocks": {"finetuning_type": "freeze", "use_badam": True},
    "trains one block all run long": {"finetuning_type": "full", "use_badam": True, "badam_switch_mode": "fixed"},
    "bring their own optimizer": {"finetuning_type": "full", "use_muon": True, "optim": "sgd"},
    "build their optimizer on the unsharded model": {"loraplus_lr_ratio": 16, "fsdp": "full_shard"},
    "DeepSpeed ZeRO-3 cannot shard a bitsandbytes-quantized base": {
        "finetuning_type": "qlora", "deepspeed": str(REPO / "examples" / "deepspeed" / "ds_z3_config.json")},
    "`fsdp` cannot shard a bitsandbytes-quantized base": {"finetuning_type": "qlora", "fsdp": "full_shard"},
    "two engines for the same job": {"fsdp": "full_shard", "deepspeed": {"zero_optimization": {"stage": 2}}},
    "must be one of random, sequential, group_by_length": {"train_sampling_strategy": "group_by_lenght"},
    "builds its own optimizer from `optim`": {"stage": "grpo", "reward_funcs": "m:f", "use_muon": True},
    "`use_llama_pro` trains the expanded blocks only": {"finetuning_type": "full", "use_llama_pro": True},
    "change the SFT loss": {"stage": "pt", "use_dft_loss": True},
    "are different losses": {"use_dft_loss": True, "use_eaft_loss": True},
    "is not the base model ASFT anchors to": {"pissa_init": True, "use_asft_loss": True},
    "`moe_aux_loss_coef` is applied by the pt and sft stages only": {"stage": "rm", "moe_aux_loss_coef": 0.01},
    "`pure_bf16` trains in bfloat16 throughout": {"pure_bf16": True, "fp16": True},
    "cannot be smaller than `image_min_pixels`": {"image_max_pixels": 100, "image_min_pixels": 200},
}
#: Environment a rule case needs: a torchrun process of a two-process run.
RULE_ENV = {"train with one process only": {"WORLD_SIZE": "2"}}


@pytest.mark.parametrize("phrase", sorted(RULE_CASES))
def test_each_rule_refuses_its_combination(phrase, monkeypatch):
    for name, value in RULE_ENV.get(phrase, {}).items():
        monkeypatch.setenv(name, value)
    values = {**BASE, **RULE_CASES[phrase]}
    if phrase.startswith("`model_name_or_path`"):
        values.pop("model_name_or_path")
    message = error_of(values)
    assert phrase in message
    assert message.count("\n") == 0, f"only this one rule should break: {message}"


def test_every_rule_has_a_case_and_the_base_config_breaks_none():
    for rule in RULES:
        assert any(phrase in rule.message for phrase in RULE_CASES), f"untested rule: {rule.message}"
    load_config(BASE)


def test_rollout_rules_name_the_stage():
    assert "stage ppo learns from sampled completions" in error_of(
        {**BASE, "stage": "ppo", "reward_model": "rm", "num_beams": 2})


def test_orpo_and_simpo_stages_are_dpo_with_their_loss():
    assert load_config({**BASE, "stage": "orpo"}).pref_loss == "orpo"
    assert load_config({**BASE, "stage": "simpo", "pref_loss": "simpo"}).pref_loss == "simpo"
    assert load_config({**BASE, "stage": "dpo"}).pref_loss == "sigmoid"
    assert load_config({**BASE, "stage": "kto"}).pref_loss is None


def test_qlora_shorthand_and_resolved_defaults():
    config = load_config({**BASE, "finetuning_type": "qlora", "lora_rank": 4})
    assert config.method == "lora" and config.quantization_bit == 4 and config.lora_alpha == 8


def test_passthrough_table_matches_installed_transformers():
    from transformers import TrainingArguments

    hf_keys = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    ours = {f.name for f in public_fields()}
    assert PASSTHROUGH_TRAINING_KEYS <= hf_keys, PASSTHROUGH_TRAINING_KEYS - hf_keys
    assert not (PASSTHROUGH_TRAINING_KEYS & ours)
    assert set(RENAMED_TRAINING_KEYS.values()) <= hf_keys | ours
    assert not (set(IGNORED_TRAINING_KEYS) & hf_keys)


def test_every_stage_has_a_module_that_runs_it():
    from tunelab.training.run import stage_module

    for stage in STAGES:
        assert callable(stage_module(stage).run), stage


@pytest.mark.parametrize(("extra_yaml", "override", "message"), [
    ("", "learning_rte=1e-4", "did you mean `learning_rate`"),
    ("stage: grpo\nreward_funcs: m:f\nsave_strategy: best\n", "do_train=true", "which stage grpo has not"),
])
def test_cli_config_error_exits_2_without_importing_torch(tmp_path, extra_yaml, override, message):
    path = tmp_path / "cfg.yaml"
    path.write_text("model_name_or_path: m\ndo_train: true\ndataset: identity\noutput_dir: out\n" + extra_yaml)
    code = ("import sys; from tunelab.cli import main; rc = main(['train', sys.argv[1], sys.argv[2]]);"
            "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]; print(rc, heavy)")
    result = subprocess.run([sys.executable, "-c", code, str(path), override], capture_output=True, text=True)
    assert result.stdout.strip() == "2 []"
    assert message in result.stderr and "Traceback" not in result.stderr


def test_cli_help_usage_and_unknown_command(capsys):
    assert main(["--help"]) == 0 and "train [CONFIG]" in capsys.readouterr().out
    assert main(["trian"]) == 2 and "did you mean `train`" in capsys.readouterr().err
    assert main(["train", "cfg.yaml", "stray"]) == 2 and "expected key=value" in capsys.readouterr().err
    assert main(["help", "keys"]) == 0 and "learning_rate" in capsys.readouterr().out


def test_keys_alone_make_a_config_as_on_llamafactorys_command_line():
    from tunelab.cli import load_config_args

    keys = ["--stage", "sft", "--model_name_or_path", "m", "--do_train", "--dataset", "identity,alpaca_en_demo",
            "--output_dir", "out", "--learning_rate", "1e-4"]
    flags = load_config_args(keys)
    assigned = load_config_args(["stage=sft", "model_name_or_path=m", "do_train=true",
                                 "dataset=identity,alpaca_en_demo", "output_dir=out", "learning_rate=1e-4"])
    assert flags == assigned
    assert (flags.stage, flags.do_train, flags.dataset, flags.learning_rate) == ("sft", True,
                                                                                ["identity", "alpaca_en_demo"], 1e-4)
    with pytest.raises(ConfigError, match="config file not found: stage"):
        load_config_args(["stage"])
    with pytest.raises(ConfigError, match="did you mean `learning_rate`"):
        load_config_args([*keys, "--learning_rte", "1"])


@pytest.mark.parametrize(("keys", "module", "install"), [
    ({"deepspeed": str(REPO / "examples" / "deepspeed" / "ds_z2_config.json")}, "deepspeed",
     "pip install 'tunelab[deepspeed]'"),
    ({"finetuning_type": "qlora"}, "bitsandbytes", "pip install 'tunelab[quantization]'"),
    ({"report_to": "wandb"}, "wandb", "pip install wandb"),
    ({"optim": "galore_adamw", "optim_target_modules": "all-linear"}, "galore_torch",
     "pip install 'tunelab[methods]'"),
    ({"finetuning_type": "full", "use_badam": True}, "badam", "pip install 'tunelab[methods]'"),
    ({"use_adam_mini": True}, "adam_mini", "pip install 'tunelab[methods]'"),
])
def test_a_missing_optional_package_is_named_when_the_config_loads(keys, module, install, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # what an environment without the package looks like
    message = error_of({**BASE, **keys})
    assert f"needs the `{module}` package, which is not installed: {install}" in message


@pytest.mark.parametrize(("content", "message"), [
    (None, r"`deepspeed`: .*missing.json does not exist \(a relative path is read from .*\); tunelab ships the usual "
           r"files in its examples/deepspeed/"),
    ('{"zero_optimization": {"stage": 3,}}', r"`deepspeed`: .*broken.json:1:35: invalid JSON: Expecting property name"),
    ("[3]", r"`deepspeed`: .*broken.json: expected a JSON object of DeepSpeed settings"),
])
def test_a_deepspeed_file_that_cannot_be_used_is_named_when_the_config_loads(content, message, tmp_path):
    path = tmp_path / ("missing.json" if content is None else "broken.json")
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_config({**BASE, "deepspeed": str(path)})
