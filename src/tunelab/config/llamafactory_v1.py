"""LLaMA-Factory's "v1" config format, translated to the keys of tunelab's schema.

    tunelab train train_lora_sft.yaml              # a v1 file, as `USE_V1=1 llamafactory-cli sft` reads it
    tunelab train train_lora_sft.yaml stage=dpo    # `llamafactory-cli dpo`: v1 files hold no stage

LLaMA-Factory's v1 trainer (`src/llamafactory/v1/`) reads YAML with other keys (`model`, `train_dataset`,
`micro_batch_size`, plugin blocks such as `peft_config` with a `name`, ...). `load_config` reads such a file through
`translate_v1`, so every command reads both formats; command-line overrides stay tunelab keys.

A file is v1 when it holds a key only v1 has (`V1_ONLY_KEYS`: v1's keys less every key a v0 config may hold) and
none only v0 has. Keys both share (`learning_rate`, ...) decide nothing, so a v0 file is never read as v1; a mixed
file is read as v0, where each v1 key is unknown (and named as v1's). Each key means what v1's source does with it,
and v1's defaults apply where tunelab's differ and change the run (`V1_DEFAULTS`). `global_batch_size` becomes
`gradient_accumulation_steps` = global / (micro_batch_size x world size), the world size being WORLD_SIZE when the
config loads (set by torchrun in each process `tunelab train` starts, else 1): v1's data-parallel size, as context
parallelism is refused.
A dataset yaml (`train_dataset`) is the data registry's to read and check, before any model loads.
Differences remain: v1 joins an alpaca instruction and input without a newline, splits a multi-turn conversation
into one sample per assistant turn (the same tokens trained in other batches; `size` counts those), and its Muon
decays norms and biases too and takes 2-D weights outside the decoder layers (a vision tower's), which tunelab's
gives to AdamW. `padding_free` and `liger_kernel` change layouts and kernels, not the loss (see `_speed`).
"""

import difflib
import json
import logging
import os
from pathlib import Path
from typing import Any

from tunelab.config.llamafactory import DECIDED_BY_TUNELAB, UNSUPPORTED
from tunelab.config.passthrough import IGNORED_TRAINING_KEYS, PASSTHROUGH_TRAINING_KEYS, RENAMED_TRAINING_KEYS
from tunelab.config.schema import public_fields

logger = logging.getLogger(__name__)


def is_v1_config(values: dict[str, Any]) -> bool:
    """Whether a config's keys are LLaMA-Factory v1's: some key only v1 has, and none only v0 has."""
    return any(key in V1_ONLY_KEYS for key in values) and not any(key in V0_ONLY_KEYS for key in values)


def translate_v1(values: dict[str, Any], origin: str, world_size: int | None = None) -> "V1Translation":
    """The tunelab keys a v1 config means (`.values`), where each came from, and what cannot be translated."""
    t = V1Translation(values, origin, world_size or int(os.environ.get("WORLD_SIZE", "1")))
    for key, value in values.items():
        if key in RENAMED and value is not None:  # null leaves a key at v1's default
            t.set(RENAMED[key], value, key)
        elif key in SPELLED:
            tunelab_key, spellings = SPELLED[key]
            if isinstance(value, (str, bool)) and value in spellings:
                t.set(tunelab_key, spellings[value], key)
            else:
                t.invalid(key, f"got {value!r}; expected one of: {', '.join(map(str, spellings))}")
        elif key in REFUSED and value not in REFUSED[key][0]:
            t.refuse(key, value, REFUSED[key][1])
        elif key not in V1_KEYS:  # the other v1 keys are read by STEPS or have NO_EFFECT
            t.unknown(str(key), V1_KEYS)
    for step in STEPS:
        step(t)
    return t


# ------------------------------------------------------------------ what each v1 key means in tunelab

def _same(*keys: str) -> dict[str, str]:
    return {key: key for key in keys}


#: v1 key -> the tunelab key that means the same.
RENAMED = {
    **_same("trust_remote_code", "output_dir", "cutoff_len", "learning_rate", "num_train_epochs", "max_steps", "bf16",
            "max_grad_norm", "seed", "full_determinism", "save_total_limit", "logging_steps", "max_new_tokens",
            "pref_loss", "pref_beta", "pref_ftx", "simpo_gamma", "dpo_label_smoothing", "ld_alpha"),
    "model": "model_name_or_path", "micro_batch_size": "per_device_train_batch_size",
    "batching_workers": "dataloader_num_workers", "dist_timeout": "ddp_timeout",
}
#: v1 key -> (tunelab key, v1 value -> tunelab value), for the values v1 spells its own way.
SPELLED = {
    "flash_attn": ("flash_attn", {"eager": "eager", "sdpa": "sdpa", "flash_attention_2": "fa2"}),
    "sample_backend": ("infer_backend", {"hf": "huggingface", "vllm": "vllm"}),
    "enable_activation_checkpointing": ("disable_gradient_checkpointing", {True: False, False: True}),
}
#: v1 key -> (the values that ask for nothing tunelab lacks, why any other is refused).
REFUSED = {
    "cp_size": ((1,), "context parallelism, each sequence split across cp_size processes (`cp_mode: ulysses`), is "
                      "not integrated: every tunelab process holds whole sequences"),
    "mp_replicate_size": ((1,), "hybrid sharding (FSDP replicated over groups of processes) is not integrated: "
                                "tunelab's FSDP shards over all processes"),
    "custom_chat_template": ((None,), "tunelab's `template` is a template name or a .jinja file, not Jinja text: "
                                      "save it as a file and give `template=FILE.jinja` on the command line"),
    "lr_scheduler_config": ((None,), "v1 registers no scheduler plugin, so LLaMA-Factory itself fails on any"),
    "batching_strategy": (("normal", "padding_free"), "token-budget micro-batches (as many samples as fit "
                          "cutoff_len x micro_batch_size tokens) are not implemented; `neat_packing` packs rows of "
                          "cutoff_len tokens ahead of training by best fit, which groups samples otherwise"),
    "model_class": (("llm",), "tunelab trains causal language models; `cls` is v1's per-token score head of "
                              "`llamafactory-cli rm`, for which tunelab's `stage=rm` adds its own value head"),
    "save_epochs": ((None, 1), "tunelab saves every N steps (`save_steps`) or every epoch (`save_epochs: 1`)"),
}
#: v1 keys accepted with no effect on a tunelab run, and why.
NO_EFFECT = {
    "save_ckpt_as_hf": "tunelab's checkpoints are transformers' either way",
    "cp_mode": "v1 reads it only with cp_size > 1, which is refused",
    "eval_dataset": "v1 declares it but never reads it: its trainers do not evaluate",
    "dp_size": "v1 requires the world size here (with cp_size 1), and tunelab's data-parallel size is the world size",
    "mp_shard_size": "v1 requires the world size here (with mp_replicate_size 1), as tunelab's FSDP shards",
}
#: v1's defaults where tunelab's differ and change the run (tunelab key -> v1's value).
V1_DEFAULTS = {
    "model_name_or_path": "Qwen/Qwen3-4B-Instruct-2507", "per_device_train_batch_size": 1, "learning_rate": 1e-4,
    "logging_steps": 1, "bf16": True, "flash_attn": "sdpa", "ddp_timeout": 18000, "max_new_tokens": 128,
    "finetuning_type": "full",         # no peft_config: every weight trains
    "lr_scheduler_type": "constant",   # no lr_scheduler_config: a constant factor of 1, no warm-up
    "weight_decay": 0.01,              # v1 builds torch.optim.AdamW with its own defaults
    "dataloader_drop_last": True,      # v1's batch generator requires dropping the last partial batch
    "lora_alpha": 16, "lora_dropout": 0.05,  # v1's LoRA, whatever its rank; tunelab's alpha is 2 x rank, dropout 0
}

#: Plugin block -> its plugin names in v1 -> None when translated (by a step below), or why tunelab refuses it.
PLUGINS: dict[str, dict[str, str | None]] = {
    "peft_config": {"lora": None, "freeze": None},
    "quant_config": {"bnb": None, "auto": None},
    "dist_config": {"fsdp2": None, "deepspeed": None, "fsdpturbo": "FSDPTurbo, v1's FSDP engine with expert "
                    "parallelism (`ep_size`) for mixture-of-experts models, is not integrated; `name: fsdp2` is"},
    "init_config": {"init_on_default": None, "init_on_rank0": None, "init_on_meta": "building the model on the "
                    "meta device, its weights filled later from `dist_config.dcp_path`, is not supported"},
    "optim_config": {"muon": None},
    # Comma-separated names. `auto` applies fused kernels on Ascend NPUs only: on CUDA and CPU none, as tunelab.
    "kernel_config": {"auto": None, "liger_kernel": None, **dict.fromkeys((
        "flash-linear-attention", "cuda_fused_moe", "npu_fused_moe", "npu_fused_rmsnorm", "npu_fused_rope",
        "npu_fused_swiglu"), "a fused GPU/NPU kernel tunelab does not integrate")},
}
#: v1's Muon settings -> (tunelab key, v1's default); `adamw_betas` (0.9, 0.95) -> adam_beta1 and adam_beta2. `lr`
#: is overwritten by `learning_rate` in v1 (with a warning), so it is accepted and ignored.
MUON = {"wd": ("weight_decay", 0.1), "adamw_eps": ("adam_epsilon", 1e-8)}
#: Muon settings tunelab leaves at torch.optim.Muon's defaults, which are v1's: accepted at these values only.
MUON_FIXED = {"momentum": 0.95, "nesterov": True, "ns_steps": 5}
#: (block, name) -> its settings: v1 key -> tunelab key, or None for those a step reads itself.
SETTINGS: dict[tuple[str, str], dict[str, str | None]] = {
    ("peft_config", "lora"): {
        **_same("lora_alpha", "lora_dropout", "use_rslora", "use_dora", "adapter_name_or_path", "export_dir",
                "export_size", "export_hub_model_id", "infer_dtype", "export_legacy_format"),
        "r": "lora_rank", "target_modules": "lora_target", "modules_to_save": "additional_target"},
    ("peft_config", "freeze"): {**_same("freeze_trainable_layers", "freeze_trainable_modules", "freeze_extra_modules"),
                                "cast_trainable_params_to_fp32": None},
    # tunelab picks the 4-bit compute dtype itself: v0's `compute_dtype` is one of DECIDED_BY_TUNELAB.
    **{("quant_config", name): {**_same("double_quantization", "quantization_type", "compute_dtype"),
                                "quantization_bit": None} for name in ("bnb", "auto")},
    ("dist_config", "fsdp2"): dict.fromkeys(("reshard_after_forward", "offload_params", "pin_memory", "dcp_path")),
    ("dist_config", "deepspeed"): {"config_file": "deepspeed"},
    ("optim_config", "muon"): dict.fromkeys((*MUON, "adamw_betas", "lr", *MUON_FIXED)),
}

#: Why a data file named as `train_dataset`, or a dataset yaml's entry, is refused (the data registry's too).
NO_CONVERTER = ("without a `converter` v1 reads its own sample format (typed content parts, `loss_weight`), which "
                "tunelab does not read; list alpaca or sharegpt files in a dataset yaml with that `converter`")
HUB = ("tunelab reads hub datasets through dataset_info.json entries (`hf_hub_url`), which a v1 config cannot "
       "name: download the files and list them with `source: local`")


class V1Translation:
    """A v1 config's translation, built by STEPS: the raw v1 values and the tunelab values, origins and problems."""

    def __init__(self, raw: dict[str, Any], origin: str, world_size: int) -> None:
        self.raw, self.origin, self.world_size = raw, origin, world_size
        self.values: dict[str, Any] = dict(V1_DEFAULTS)  # tunelab (v0) keys
        self.where: dict[str, str] = dict.fromkeys(V1_DEFAULTS, f"{origin} (v1's default)")  # for messages
        self.problems: list[str] = []  # what cannot be translated, each naming its v1 key and value
        self.blocks: dict[str, dict[str, Any]] = {}  # the plugin blocks tunelab can run, by key

    def set(self, key: str, value: Any, v1_key: str) -> None:
        self.values[key] = value
        self.where[key] = f"{self.origin} (v1 `{v1_key}`)"

    def refuse(self, v1_key: str, value: Any, reason: str) -> None:
        shown = "null" if value is None else str(value).lower() if isinstance(value, bool) else value
        self.problems.append(f"{self.origin}: `{v1_key}: {shown}` (v1) is a LLaMA-Factory setting "
                             f"tunelab does not support ({reason})")

    def invalid(self, v1_key: str, message: str) -> None:
        self.problems.append(f"{self.origin}: `{v1_key}` (v1): {message}")

    def unknown(self, v1_key: str, known: Any) -> None:
        close = difflib.get_close_matches(v1_key.rsplit(".", 1)[-1], sorted(known), n=1, cutoff=0.75)
        hint = f" (did you mean `{close[0]}`?)" if close else ""
        self.problems.append(f"{self.origin}: unknown v1 key `{v1_key}`{hint}")


# ------------------------------------------------------------------ the keys that need more than a rename

def _train_dataset(t: V1Translation) -> None:
    """A dataset yaml (name -> path, source, converter, ...), or a data file in v1's own sample format."""
    value = t.raw.get("train_dataset")
    if value is None:
        return
    t.set("do_train", True, "train_dataset")  # v1's sft, dpo and rm commands always train
    if not isinstance(value, str):
        t.invalid("train_dataset", f"expected a path, got {value!r}")
    elif value.endswith(".yaml") and Path(value).is_file():
        t.set("dataset", [value], "train_dataset")  # its entries are the data registry's to read and check
    elif value.endswith(".yaml") or not Path(value).exists():  # v1 then looks on the hub
        t.refuse("train_dataset", value, f"no such file here, so v1 reads it from the hub; {HUB}")
    else:
        t.refuse("train_dataset", value, NO_CONVERTER)


def _global_batch_size(t: V1Translation) -> None:
    """Samples per optimizer step over all processes -> forward passes per process per step."""
    total, micro = t.raw.get("global_batch_size"), t.values["per_device_train_batch_size"]  # renamed, or v1's 1
    if total is None or not isinstance(micro, int):
        return  # unset: one micro-batch per step, as tunelab; a bad micro_batch_size is reported by its own key
    if isinstance(total, int) and not isinstance(total, bool) and total > 0 and total % (micro * t.world_size) == 0:
        t.set("gradient_accumulation_steps", total // (micro * t.world_size), "global_batch_size")
    else:
        t.invalid("global_batch_size", f"got {total!r}; expected a multiple of micro_batch_size x world size = "
                                       f"{micro} x {t.world_size} (WORLD_SIZE when the config loads)")


def _checkpoints(t: V1Translation) -> None:
    steps, epochs, resume = (t.raw.get(key) for key in ("save_steps", "save_epochs", "resume_from_checkpoint"))
    if epochs == 1 or steps is None:  # v1's save_epochs wins over save_steps; without either it saves no checkpoint
        t.set("save_strategy", "epoch" if epochs == 1 else "no", "save_epochs" if epochs == 1 else "save_steps")
    else:
        t.set("save_steps", steps, "save_steps")
    if resume not in (None, "auto"):  # `auto`: the last checkpoint in output_dir, which tunelab resumes by itself
        t.set("resume_from_checkpoint", resume, "resume_from_checkpoint")


def _plugins(t: V1Translation) -> None:
    """Check every plugin block's names and settings; keep the blocks tunelab can run, with their settings set."""
    for key, names in PLUGINS.items():
        block = t.raw.get(key)
        if block is None:
            continue
        if not isinstance(block, dict) or not isinstance(block.get("name"), str):
            t.invalid(key, f"expected a mapping with a `name`, got {block!r}")
            continue
        chosen = [name.strip() for name in block["name"].split(",")] if key == "kernel_config" else [block["name"]]
        refused = [name for name in chosen if names.get(name, "") is not None]
        for name in refused:
            if name not in names:
                t.invalid(f"{key}.name", f"got {name!r}; expected one of: {', '.join(names)}")
            else:
                t.refuse(f"{key}.name", name, names[name])
        if refused:
            continue
        t.blocks[key] = block
        settings = SETTINGS.get((key, block["name"]), {})
        for sub, value in block.items():
            if sub != "name" and sub not in settings and key != "kernel_config":  # kernels' settings are free-form
                t.unknown(f"{key}.{sub}", settings)
            elif settings.get(sub) and value is not None:
                t.set(settings[sub], value, f"{key}.{sub}")


def _method(t: V1Translation) -> None:
    """`peft_config` and `quant_config`: LoRA, freeze or full, and QLoRA with bitsandbytes."""
    peft, quant = t.blocks.get("peft_config"), t.blocks.get("quant_config")
    if peft is not None:
        t.set("finetuning_type", peft["name"], "peft_config.name")
        if peft.get("cast_trainable_params_to_fp32", True) is not True:
            t.refuse("peft_config.cast_trainable_params_to_fp32", peft["cast_trainable_params_to_fp32"],
                     "tunelab always trains the unfrozen weights in float32")
    # v1's bitsandbytes plugin defaults to 4 bits; `auto` without bits quantizes nothing.
    bits = quant and quant.get("quantization_bit", 4 if quant["name"] == "bnb" else None)
    if bits is not None:
        t.set("quantization_bit", bits, "quant_config.quantization_bit")


def _optimizer(t: V1Translation) -> None:
    """`optim_config: muon`: tunelab's Muon (torch.optim.Muon, AdamW for all but the decoder layers' matrices)."""
    muon = t.blocks.get("optim_config")
    if muon is None:
        return
    t.set("use_muon", True, "optim_config.name")
    for v1_key, (key, default) in MUON.items():
        t.set(key, default if muon.get(v1_key) is None else muon[v1_key], f"optim_config.{v1_key}")
    betas = muon.get("adamw_betas", (0.9, 0.95))
    if isinstance(betas, (list, tuple)) and len(betas) == 2:
        t.set("adam_beta1", betas[0], "optim_config.adamw_betas")
        t.set("adam_beta2", betas[1], "optim_config.adamw_betas")
    else:
        t.invalid("optim_config.adamw_betas", f"got {betas!r}; expected two numbers, such as [0.9, 0.95]")
    for key, fixed in MUON_FIXED.items():
        if muon.get(key, fixed) != fixed:
            t.refuse(f"optim_config.{key}", muon[key], f"tunelab's Muon is torch.optim.Muon with its {key} at "
                                                       f"{fixed}, torch's default and v1's")
    if muon.get("lr") is not None:
        logger.warning("%s: `optim_config.lr` is ignored, as in v1: Muon trains at `learning_rate`", t.origin)
    if t.values["finetuning_type"] == "lora":
        t.refuse("optim_config.name", "muon", "v1 gives the LoRA matrices to AdamW, tunelab's Muon every 2-D "
                                              "weight of the decoder layers, the LoRA matrices included")


def _speed(t: V1Translation) -> None:
    """Liger's kernels and padding-free batches: other kernels and layouts for the same loss."""
    kernels = t.blocks.get("kernel_config")
    if kernels and "liger_kernel" in (name.strip() for name in kernels["name"].split(",")):
        # v1 patches Qwen3-family models with Liger's defaults (non-fused cross-entropy in training); transformers
        # patches every family Liger supports, with its fused linear cross-entropy: the same loss.
        t.set("enable_liger_kernel", True, "kernel_config.name")
    if t.raw.get("batching_strategy") == "padding_free":
        # v1 packs a micro-batch's micro_batch_size samples into one row (positions restarting per sample, no
        # attention across them), as tunelab's `padding_free` does; `neat_packing` would fill rows of cutoff_len
        # tokens, micro_batch_size rows a micro-batch: more samples a step.
        t.set("padding_free", True, "batching_strategy")


def _distributed(t: V1Translation) -> None:
    """`dist_config` fsdp2 or deepspeed (last of STEPS: under DeepSpeed, v1 takes bf16 from its file)."""
    dist, init = t.blocks.get("dist_config", {}), t.blocks.get("init_config", {})
    if init.get("name") == "init_on_rank0" and dist.get("name") != "fsdp2":
        t.refuse("init_config.name", "init_on_rank0", "loading the weights on the first process only needs FSDP "
                                                      "to share them (`dist_config.name: fsdp2`)")
    if dist.get("name") == "fsdp2":  # FSDP2 around each decoder layer; v1's `bf16` is its mixed precision
        if dist.get("dcp_path") is not None:
            t.refuse("dist_config.dcp_path", dist["dcp_path"], "loading the weights from a torch.distributed "
                                                               "checkpoint is not supported: tunelab loads `model`")
        # `pin_memory` goes with offloading, which transformers' FSDP does with pinned memory.
        fsdp_config = {"version": 2, "reshard_after_forward": dist.get("reshard_after_forward", True),
                       "cpu_offload": bool(dist.get("offload_params", False))}
        if init.get("name") == "init_on_rank0":
            fsdp_config["cpu_ram_efficient_loading"] = True
        t.set("fsdp", True, "dist_config.name")
        t.set("fsdp_config", fsdp_config, "dist_config")
    elif dist.get("name") == "deepspeed":  # v1 ignores `bf16` here: bf16 unless the file turns it (or fp16) off
        try:
            ds = json.loads(Path(dist.get("config_file") or "").read_text(encoding="utf-8"))
            fp16, bf16 = (str(ds.get(key, {}).get("enabled", "auto")).lower() for key in ("fp16", "bf16"))
        except (OSError, ValueError, AttributeError, RecursionError) as err:
            return t.invalid("dist_config.config_file", f"cannot read the DeepSpeed config: {err}")
        if fp16 == "true":
            t.invalid("dist_config.config_file", "it enables fp16; v1 trains DeepSpeed in bf16 or float32 only")
        t.set("bf16", bf16 == "true" or (bf16 == "auto" and fp16 == "auto"), "dist_config.config_file")


#: The steps after the renames, in order.
STEPS = (_train_dataset, _global_batch_size, _checkpoints, _plugins, _method, _optimizer, _speed, _distributed)
#: The top-level keys the steps read.
STEP_KEYS = frozenset(("train_dataset", "global_batch_size", "save_steps", "resume_from_checkpoint", *PLUGINS))

#: Every top-level key of v1's ModelArguments, DataArguments, TrainingArguments and SampleArguments.
V1_KEYS = frozenset(RENAMED) | frozenset(SPELLED) | frozenset(REFUSED) | frozenset(NO_EFFECT) | STEP_KEYS
#: Every key a v0 (tunelab or LLaMA-Factory v0) config may hold.
V0_KEYS = (frozenset(f.name for f in public_fields()) | PASSTHROUGH_TRAINING_KEYS | frozenset(DECIDED_BY_TUNELAB)
           | frozenset(UNSUPPORTED) | frozenset(RENAMED_TRAINING_KEYS) | frozenset(IGNORED_TRAINING_KEYS))
#: The keys that mark a file as v1 (no v0 config holds them), and those that mark it as v0.
V1_ONLY_KEYS, V0_ONLY_KEYS = V1_KEYS - V0_KEYS, V0_KEYS - V1_KEYS
