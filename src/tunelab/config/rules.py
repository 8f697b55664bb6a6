"""Cross-field rules: combinations of keys that cannot run together, one row each.

Each rule is a predicate that is true when the config is *wrong*, and the message shown then. They run after every
key has its declared type, so a predicate reads plain values. Each rule has a test in `tests/config/test_config.py`.
"""

import os
import re
from collections.abc import Callable
from typing import NamedTuple

from tunelab.config.distributed import zero_stage
from tunelab.config.schema import REFERENCE_LOSSES, Config
from tunelab.config.stages import STAGE_SPECS, StageSpec, stages_where


class Rule(NamedTuple):
    violated: Callable[[Config], bool]
    message: str


#: The samplers transformers' Trainer has (`train_sampling_strategy`).
SAMPLING_STRATEGIES = ("random", "sequential", "group_by_length", "batch_rebalance")

def _has_eval_data(c: Config) -> bool:
    return c.val_size > 0 or bool(c.eval_dataset)


def _stage(c: Config) -> StageSpec:
    return STAGE_SPECS[c.stage]


def _uses_reference(c: Config) -> bool:
    reference = _stage(c).reference
    return {"never": False, "always": True, "pref_loss": c.pref_loss in REFERENCE_LOSSES,
            "grpo_beta": c.grpo_beta > 0}[reference]


def _is_url(value: str | None) -> bool:
    return bool(value) and value.startswith(("http://", "https://"))


#: The optimizers that replace the Trainer's (`optim`); one at a time.
_OPTIMIZER_KEYS = ("use_galore", "use_apollo", "use_badam", "use_adam_mini", "use_muon", "loraplus_lr_ratio")
_SFT_LOSS_KEYS = ("use_dft_loss", "use_asft_loss", "use_eaft_loss")


def _chosen(c: Config, keys: tuple[str, ...]) -> list[str]:
    return [key for key in keys if getattr(c, key) not in (None, False)]


def _processes() -> int:
    """Processes the run trains with: torchrun's WORLD_SIZE inside it, else what `tunelab train` will launch."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    forced = os.environ.get("FORCE_TORCHRUN", "0").lower() in ("1", "true")
    return int(os.environ.get("NPROC_PER_NODE", "1")) * int(os.environ.get("NNODES", "1")) if forced else 1


RULES: tuple[Rule, ...] = (
    Rule(lambda c: c.model_name_or_path is None,
         "`model_name_or_path` is required: a hub id, a local model folder or a .gguf file"),
    Rule(lambda c: c.do_train and not c.dataset,
         "`do_train` needs `dataset` (names from dataset_info.json, comma-separated)"),
    Rule(lambda c: c.do_train and not c.output_dir,
         "`do_train` needs `output_dir` (where the trained weights and logs go)"),
    Rule(lambda c: c.bf16 and c.fp16, "`bf16` and `fp16` are exclusive: pick one"),
    Rule(lambda c: c.quantization_bit is not None and not c.uses_adapter,
         "`quantization_bit` needs `finetuning_type: lora` (QLoRA) or `oft`: quantized weights cannot be trained "
         "directly"),
    Rule(lambda c: bool(c.adapter_name_or_path) and not c.uses_adapter,
         "`adapter_name_or_path` needs `finetuning_type: lora` or `oft`"),
    Rule(lambda c: c.create_new_adapter and not c.adapter_name_or_path,
         "`create_new_adapter` needs `adapter_name_or_path` (the adapters to merge first)"),
    Rule(lambda c: c.train_on_prompt and c.mask_history,
         "`train_on_prompt` and `mask_history` are exclusive: one trains on more, the other on less"),
    Rule(lambda c: (c.train_on_prompt or c.mask_history) and c.stage != "sft",
         "`train_on_prompt` and `mask_history` apply to `stage: sft` only"),
    Rule(lambda c: c.val_size > 0 and bool(c.eval_dataset),
         "`val_size` and `eval_dataset` are exclusive: evaluate on a held-out split or on a named dataset"),
    Rule(lambda c: (c.do_eval or c.eval_strategy != "no") and not _has_eval_data(c),
         "evaluation (`do_eval` or `eval_strategy`) needs an evaluation set: set `val_size` or `eval_dataset`"),
    Rule(lambda c: c.freeze_trainable_layers == 0 and c.method == "freeze",
         "`freeze_trainable_layers` must not be 0 (positive: the last N layers, negative: the first N)"),
    Rule(lambda c: "all" in c.lora_target and len(c.lora_target) > 1,
         "`lora_target: all` already covers every linear layer; do not list other modules beside it"),
    Rule(lambda c: c.overwrite_output_dir and c.resume_from_checkpoint is not None,
         "`overwrite_output_dir` starts over and `resume_from_checkpoint` continues: pick one"),
    Rule(lambda c: c.streaming and c.max_steps <= 0,
         "`streaming` needs `max_steps`: a streamed dataset has no known length to count epochs by"),
    Rule(lambda c: c.streaming and c.val_size > 0,
         "`streaming` cannot hold out `val_size` of an unread stream: use `eval_dataset`"),
    Rule(lambda c: c.neat_packing and c.packing is False,
         "`neat_packing` is a kind of packing: it cannot run with `packing: false`"),
    Rule(lambda c: c.interleave_probs is not None and c.mix_strategy == "concat",
         "`interleave_probs` needs `mix_strategy: interleave_under` or `interleave_over`"),
    Rule(lambda c: c.interleave_probs is not None and len(c.interleave_probs) != len(c.dataset or []),
         "`interleave_probs` needs one probability per dataset in `dataset`"),
    Rule(lambda c: c.interleave_probs is not None and abs(sum(c.interleave_probs) - 1) > 1e-6,
         "`interleave_probs` must add up to 1"),
    Rule(lambda c: _stage(c).fixed_loss and c.pref_loss != _stage(c).pref_loss,
         f"{stages_where(lambda s: s.fixed_loss)} are dpo with that `pref_loss`: leave `pref_loss` out or set it to "
         "the stage's name"),
    Rule(lambda c: c.pref_loss is not None and _stage(c).pref_loss is None,
         "`pref_loss` applies to `stage: dpo` (and its shorthands orpo and simpo) only"),
    Rule(lambda c: (c.ref_model is not None or bool(c.ref_model_adapters)) and not _uses_reference(c),
         "`ref_model` is only read by stages that compare with a reference: dpo (sigmoid, hinge, ipo), kto, ppo, "
         "and grpo with `grpo_beta` > 0"),
    Rule(lambda c: (bool(c.ref_model_adapters) or c.ref_model_quantization_bit is not None) and c.ref_model is None,
         "`ref_model_adapters` and `ref_model_quantization_bit` need `ref_model`"),
    Rule(lambda c: c.stage == "ppo" and c.reward_model is None,
         "`stage: ppo` needs `reward_model`: an rm adapter (reward_model_type: lora), a model (full) or a URL (api)"),
    Rule(lambda c: c.stage == "grpo" and c.reward_model is None and not c.reward_funcs,
         "`stage: grpo` needs `reward_funcs` (Python functions, `module:function`) or `reward_model`"),
    Rule(lambda c: (c.reward_model is not None or bool(c.reward_funcs)) and not _stage(c).rollout,
         f"`reward_model` and `reward_funcs` are read by {stages_where(lambda s: s.rollout)} only"),
    Rule(lambda c: c.reward_model is not None and c.reward_model_type == "lora" and not c.uses_lora,
         "`reward_model_type: lora` puts the reward adapter on the policy's base model, so it needs "
         "`finetuning_type: lora`; use `reward_model_type: full` for a separate reward model"),
    Rule(lambda c: c.reward_model is not None and (c.reward_model_type == "api") != _is_url(c.reward_model),
         "`reward_model_type: api` takes an http(s) URL in `reward_model`, and only that type takes a URL"),
    Rule(lambda c: (bool(c.reward_model_adapters) or c.reward_model_quantization_bit is not None)
         and c.reward_model_type != "full",
         "`reward_model_adapters` and `reward_model_quantization_bit` apply to `reward_model_type: full`"),
    Rule(lambda c: any(not re.fullmatch(r"[^:\s]+:[A-Za-z_]\w*", spec) for spec in c.reward_funcs or []),
         "each of `reward_funcs` is `module:function` or `path/to/file.py:function`"),
    Rule(lambda c: not _stage(c).evaluates and (c.do_eval or c.eval_strategy != "no"),
         f"{stages_where(lambda s: not s.evaluates)} have no evaluation loss: remove `do_eval` and `eval_strategy`"),
    # What the ppo and grpo loop (training/rollout.py) cannot do; "{stage}" is filled in with the config's stage.
    Rule(lambda c: _stage(c).rollout and (not c.do_sample or c.num_beams > 1),
         "stage {stage} learns from sampled completions: set `do_sample: true` and `num_beams: 1`"),
    Rule(lambda c: _stage(c).rollout and c.streaming,
         "`streaming` is not supported by stage {stage}: its prompts are drawn from shuffled epochs"),
    Rule(lambda c: _stage(c).rollout and c.save_strategy == "best",
         "`save_strategy: best` needs an evaluation metric, which stage {stage} has not"),
    Rule(lambda c: _stage(c).rollout and bool(c.extra_training_args.get("fsdp")),
         "stage {stage} runs its own loop, on DDP or DeepSpeed: `fsdp` is not supported there; for a model that "
         "does not fit one device use `deepspeed: examples/deepspeed/ds_z3_config.json`"),
    Rule(lambda c: zero_stage(c) == 3 and c.quantization_bit is not None,
         "DeepSpeed ZeRO-3 cannot shard a bitsandbytes-quantized base model here (`quantization_bit`): use ZeRO-2 "
         "(ds_z2_config.json) for QLoRA, or LoRA on the float model under ZeRO-3"),
    Rule(lambda c: bool(c.extra_training_args.get("fsdp")) and c.quantization_bit is not None,
         "`fsdp` cannot shard a bitsandbytes-quantized base model here (`quantization_bit`): use DeepSpeed ZeRO-2 "
         "for QLoRA across devices, or LoRA on the float model under FSDP"),
    Rule(lambda c: bool(c.extra_training_args.get("fsdp")) and bool(c.extra_training_args.get("deepspeed")),
         "`fsdp` and `deepspeed` are two engines for the same job: keep one"),
    # transformers lists these choices but does not check them: another value would train in the default order.
    Rule(lambda c: c.extra_training_args.get("train_sampling_strategy", "random") not in SAMPLING_STRATEGIES,
         f"`train_sampling_strategy` must be one of {', '.join(SAMPLING_STRATEGIES)}"),
    Rule(lambda c: not _stage(c).next_token_loss and (c.packing or c.neat_packing),
         f"`packing` applies to {stages_where(lambda s: s.next_token_loss)}: the other stages score whole samples"),
    Rule(lambda c: not _stage(c).next_token_loss and c.padding_free,
         f"`padding_free` applies to {stages_where(lambda s: s.next_token_loss)}: the other stages score whole "
         "samples"),
    Rule(lambda c: c.dpo_label_smoothing > 0 and c.pref_loss != "sigmoid",
         "`dpo_label_smoothing` applies to `stage: dpo` with `pref_loss: sigmoid` only"),
    Rule(lambda c: c.pref_ftx > 0 and c.pref_loss == "orpo",
         "`pref_ftx` does not apply to orpo: its loss already holds the SFT term (weight 1), and `pref_beta` weighs "
         "the odds-ratio term against it"),
    Rule(lambda c: (c.kto_chosen_weight, c.kto_rejected_weight) != (1.0, 1.0) and c.stage != "kto",
         "`kto_chosen_weight` and `kto_rejected_weight` apply to `stage: kto` only"),
    # The training methods of method_options.py.
    Rule(lambda c: (c.use_rslora or c.use_dora or c.pissa_init or c.loraplus_lr_ratio is not None)
         and not c.uses_lora,
         "`use_rslora`, `use_dora`, `pissa_init` and `loraplus_lr_ratio` are LoRA variants: they need "
         "`finetuning_type: lora`"),
    Rule(lambda c: c.method == "oft" and (c.oft_rank == 0) == (c.oft_block_size == 0),
         "`finetuning_type: oft` takes exactly one of `oft_rank` and `oft_block_size` (the other 0): each fixes "
         "the other through the layer's width"),
    Rule(lambda c: c.pissa_convert and not c.pissa_init, "`pissa_convert` converts a PiSSA adapter: it needs "
         "`pissa_init: true`"),
    Rule(lambda c: c.pissa_init and _uses_reference(c),
         "`pissa_init` moves the principal part of the base weights into the adapter, so the base model without it "
         "cannot serve as this stage's reference: use plain LoRA, or a stage without a reference model"),
    Rule(lambda c: c.pissa_init and c.quantization_bit is not None,
         "`pissa_init` decomposes the float weights: it cannot run on a quantized base (`quantization_bit`)"),
    Rule(lambda c: c.pissa_convert and _stage(c).rollout,
         "stage {stage} saves through its own loop: `pissa_convert` is not supported there"),
    Rule(lambda c: c.pissa_convert and c.use_dora,
         "`pissa_convert` cannot convert a DoRA adapter (its magnitudes come from the PiSSA residual weights): "
         "remove `use_dora` or `pissa_convert`"),
    Rule(lambda c: c.module_dropout > 0 and c.method != "oft",
         "`module_dropout` applies to `finetuning_type: oft`"),
    Rule(lambda c: bool(_chosen(c, _OPTIMIZER_KEYS[:3])) and c.uses_adapter,
         "`use_galore`, `use_apollo` and `use_badam` optimize the base weights themselves: they need "
         "`finetuning_type: full` or `freeze`, not an adapter"),
    Rule(lambda c: len(_chosen(c, _OPTIMIZER_KEYS)) > 1,
         f"{', '.join(f'`{k}`' for k in _OPTIMIZER_KEYS)} each choose the optimizer: set one of them"),
    Rule(lambda c: (c.galore_layerwise and c.use_galore or c.apollo_layerwise and c.use_apollo
                    or c.use_badam) and _processes() > 1,
         "`galore_layerwise`, `apollo_layerwise` and `use_badam` train with one process only: layer-wise updates "
         "happen during the backward pass, where DDP has not averaged the gradients yet, and BAdam's ranks drift "
         "apart (the blocks it switches on after DDP wraps the model are not averaged)"),
    Rule(lambda c: (c.galore_layerwise and c.use_galore or c.apollo_layerwise and c.use_apollo)
         and c.gradient_accumulation_steps > 1,
         "`galore_layerwise` and `apollo_layerwise` update each layer as soon as its gradient exists: they need "
         "`gradient_accumulation_steps: 1`"),
    Rule(lambda c: c.use_badam and c.badam_mode == "layer" and c.badam_switch_mode == "fixed"
         and c.badam_start_block is None,
         "`badam_switch_mode: fixed` trains one block all run long: name it with `badam_start_block`"),
    Rule(lambda c: (c.use_galore or c.use_apollo or c.use_adam_mini or c.use_muon
                    or c.use_badam and c.badam_mode == "ratio") and c.optim != "adamw_torch",
         "`use_galore`, `use_apollo`, `use_adam_mini`, `use_muon` and BAdam's ratio mode bring their own optimizer: "
         "leave `optim` at adamw_torch"),
    Rule(lambda c: bool(_chosen(c, _OPTIMIZER_KEYS)) and bool(c.extra_training_args.get("fsdp")
                                                              or c.extra_training_args.get("deepspeed")),
         f"{', '.join(f'`{k}`' for k in _OPTIMIZER_KEYS)} build their optimizer on the unsharded model: they are not "
         "supported with `fsdp` or `deepspeed` yet"),
    Rule(lambda c: c.use_badam and c.method != "full",
         "`use_badam` switches blocks of the whole model on in turn: it needs `finetuning_type: full`"),
    Rule(lambda c: _stage(c).rollout and bool(_chosen(c, _OPTIMIZER_KEYS)),
         "stage {stage} builds its own optimizer from `optim`: "
         f"{', '.join(f'`{k}`' for k in _OPTIMIZER_KEYS)} are not supported there"),
    Rule(lambda c: c.use_llama_pro and c.method not in ("freeze", "lora"),
         "`use_llama_pro` trains the expanded blocks only: it needs `finetuning_type: freeze` or `lora`"),
    Rule(lambda c: c.use_llama_pro and c.freeze_trainable_layers < 0,
         "`use_llama_pro` needs a positive `freeze_trainable_layers`: the number of blocks the expansion added"),
    Rule(lambda c: bool(_chosen(c, _SFT_LOSS_KEYS)) and c.stage != "sft",
         "`use_dft_loss`, `use_asft_loss` and `use_eaft_loss` change the SFT loss: they apply to `stage: sft` only"),
    Rule(lambda c: c.pissa_init and c.use_asft_loss,
         "`pissa_init` moves the principal part of the base weights into the adapter, so the model with its adapter "
         "off is not the base model ASFT anchors to: use plain LoRA with `use_asft_loss`"),
    Rule(lambda c: c.moe_aux_loss_coef is not None and c.stage not in ("pt", "sft"),
         "`moe_aux_loss_coef` is applied by the pt and sft stages only: the other stages' losses do not add the "
         "router loss"),
    Rule(lambda c: len(_chosen(c, _SFT_LOSS_KEYS)) > 1,
         "`use_dft_loss`, `use_asft_loss` and `use_eaft_loss` are different losses: set one of them"),
    Rule(lambda c: c.image_max_pixels < c.image_min_pixels or c.video_max_pixels < c.video_min_pixels,
         "`image_max_pixels` / `video_max_pixels` cannot be smaller than `image_min_pixels` / `video_min_pixels`"),
    Rule(lambda c: c.pure_bf16 and c.fp16,
         "`pure_bf16` trains in bfloat16 throughout: it cannot run with `fp16`"),
    Rule(lambda c: (c.do_predict or c.predict_with_generate) and c.stage != "sft",
         "`do_predict` and `predict_with_generate` apply to `stage: sft` only"),
    Rule(lambda c: c.do_predict != c.predict_with_generate,
         "`do_predict` and `predict_with_generate` go together: prediction generates replies and scores them"),
    Rule(lambda c: c.do_predict and not _has_eval_data(c),
         "`do_predict` generates replies for the evaluation set: set `eval_dataset` or `val_size`"),
    Rule(lambda c: c.do_predict and not c.output_dir,
         "`do_predict` needs `output_dir` (where generated_predictions.jsonl goes)"),
)


def check_rules(config: Config) -> list[str]:
    """Messages of every rule the config breaks, in table order."""
    return [rule.message.replace("{stage}", config.stage) for rule in RULES if rule.violated(config)]
