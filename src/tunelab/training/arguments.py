"""Translate a tunelab Config into transformers' TrainingArguments.

Built before any model or dataset is loaded, so a value transformers rejects (a passthrough key of the wrong type,
an optimizer whose package is missing) stops the run at once with a ConfigError.

GaLore and APOLLO go through transformers' own integration (`optim: galore_adamw`, `apollo_adamw`, their
`optim_target_modules` and `optim_args`); the other optimizer methods need the model and are attached to the Trainer
in `optimizers.py`.
"""

import logging
from typing import Any

from transformers import TrainingArguments

from tunelab.config import Config, ConfigError
from tunelab.model.precision import cpu_bf16_speedup
from tunelab.model.segment_attention import wants_padding_free
from tunelab.training.engines import engine_arguments

logger = logging.getLogger(__name__)

#: Output heads by the names model families give them (lm_head; output_layer in ChatGLM; output in InternLM2;
#: embed_out in GPT-NeoX; score and v_head for the reward and value heads). GaLore's and APOLLO's `all` leaves them
#: to plain AdamW, as LLaMA-Factory does: `all` means every linear layer but the head.
OUTPUT_HEADS = ("lm_head", "output_layer", "output", "embed_out", "score", "v_head")
#: `all` for `optim_target_modules`. The arguments exist before the model, so its module names are not known yet:
#: a regex that transformers matches against every module name (`re.fullmatch`), keeping only nn.Linear ones, and
#: refusing the names whose last component is an output head. (transformers' own `all-linear` would include the head.)
ALL_LINEAR_BUT_HEADS = rf"(?!(?:.*\.)?(?:{'|'.join(OUTPUT_HEADS)})$).*"


def build_training_arguments(config: Config) -> TrainingArguments:
    import torch

    # No CUDA: say so, or transformers refuses bf16/fp16 on the CPU (mixed precision still runs there).
    on_cpu = not torch.cuda.is_available()
    values = dict(
        output_dir=config.output_dir,
        do_train=config.do_train,
        do_eval=config.do_eval or config.eval_strategy != "no",
        learning_rate=config.learning_rate,
        num_train_epochs=config.num_train_epochs,
        max_steps=config.max_steps,
        lr_scheduler_type=config.lr_scheduler_type,
        # transformers 5 folded warmup_ratio into warmup_steps: a float below 1 is a share of the total steps.
        warmup_steps=config.warmup_steps if config.warmup_steps > 0 else config.warmup_ratio,
        max_grad_norm=config.max_grad_norm,
        optim=config.optim,
        **step_layout(config),
        per_device_eval_batch_size=config.per_device_eval_batch_size,
        # pure_bf16 holds the weights in bfloat16 already; mixed precision (autocast) would only add casts.
        bf16=config.bf16 and not config.pure_bf16,
        fp16=config.fp16,
        logging_steps=config.logging_steps,
        save_strategy=config.save_strategy,
        save_steps=config.save_steps,
        save_only_model=config.save_only_model,
        eval_strategy=config.eval_strategy,
        eval_steps=config.eval_steps,
        seed=config.seed,
        dataloader_num_workers=config.dataloader_num_workers,
        ddp_timeout=config.ddp_timeout,
        report_to=config.report_to,
        include_num_input_tokens_seen="non_padding",
        # The model layer switches checkpointing on itself (it must also make LoRA inputs require grads).
        gradient_checkpointing=False,
        # Our datasets hold only model inputs; the default would drop columns by the forward signature.
        remove_unused_columns=False,
        use_cpu=on_cpu,
    )
    if config.uses_adapter or config.method == "freeze":
        # Frozen parameters never get gradients; without this DDP waits for them forever.
        values["ddp_find_unused_parameters"] = False
    values.update(low_rank_optimizer_arguments(config))
    values.update(_gpu_only_features(config, on_cpu))
    if on_cpu and config.do_train and not config.fp16:
        _note_cpu_bf16(config)
    values.update(config.extra_training_args)
    values.update(engine_arguments(config, on_cpu))
    try:
        return TrainingArguments(**values)
    except (ValueError, TypeError, ImportError) as err:
        raise ConfigError(f"transformers refused the training arguments: {err}") from None


def step_layout(config: Config) -> dict[str, int]:
    """The Trainer's per_device_train_batch_size and gradient_accumulation_steps.

    With `padding_free` a step's micro-batches come as one batch (accumulation 1), which SFTTrainer runs in as few
    forward passes as hold per_device_train_batch_size x the longest sample's tokens each (the run's largest padded
    micro-batch), split as evenly as the samples allow (collator.split_padding_free): batch 1 x accumulation 8 over
    samples of ~250 tokens, the longest 1,000, becomes 2 passes of ~1,000 tokens instead of 8 of ~250, each matmul with
    more rows. The gradients and losses are those of the micro-batches, as the loss is a sum over the step's tokens
    divided by their count. Not under DeepSpeed or FSDP, which count the accumulated micro-steps themselves."""
    batch, steps = config.per_device_train_batch_size, config.gradient_accumulation_steps
    engine = config.extra_training_args.get("deepspeed") or config.extra_training_args.get("fsdp")
    if wants_padding_free(config) and steps > 1 and not engine:
        logger.info("padding_free: the %d samples of a step come as one batch, run in forward passes of up to %d x "
                    "the longest sample's tokens (per_device_train_batch_size)", batch * steps, batch)
        batch, steps = batch * steps, 1
    return {"per_device_train_batch_size": batch, "gradient_accumulation_steps": steps}


def padding_multiple(config: Config, args: TrainingArguments) -> int | None:
    """What a padded batch's length is rounded up to. On a GPU, 8 (tensor cores). On a CPU in bfloat16, 64: oneDNN
    compiles a matmul kernel for each new shape there, so a batch length of its own at every step costs a compile
    per matmul (measured: a linear layer's forward and backward over 300 random lengths took 3x the time of
    lengths rounded to 64, and ~0.5 GB more memory). In float32 on a CPU, none: padding would only add work."""
    if not args.use_cpu:
        return 8
    return 64 if config.bf16 or config.pure_bf16 else None


def low_rank_optimizer_arguments(config: Config) -> dict[str, Any]:
    """`optim`, `optim_target_modules` and `optim_args` for GaLore or APOLLO; nothing for the other methods."""
    if config.use_galore:
        name, layerwise, target = "galore_adamw", config.galore_layerwise, config.galore_target
        settings = {"rank": config.galore_rank, "update_proj_gap": config.galore_update_interval,
                    "scale": config.galore_scale, "proj_type": config.galore_proj_type}
    elif config.use_apollo:
        # apollo_scale_front is an argument of the optimizer itself, not of a parameter group, so optim_args cannot
        # carry it: optimizers.py sets it once transformers has built the optimizer.
        name, layerwise, target = "apollo_adamw", config.apollo_layerwise, config.apollo_target
        settings = {"rank": config.apollo_rank, "proj": config.apollo_proj, "scale_type": config.apollo_scale_type,
                    "update_proj_gap": config.apollo_update_interval, "scale": config.apollo_scale,
                    "proj_type": config.apollo_proj_type}
    else:
        return {}
    return {
        "optim": f"{name}_layerwise" if layerwise else name,
        # A list is matched by transformers as substrings of the module names, as LLaMA-Factory matches it.
        "optim_target_modules": ALL_LINEAR_BUT_HEADS if target == ["all"] else list(target),
        "optim_args": ",".join(f"{key}={value}" for key, value in settings.items()),
    }


def _note_cpu_bf16(config: Config) -> None:
    """One line when bf16 would change the speed of a CPU run: it is 2-4x faster where the CPU multiplies bfloat16
    natively (AVX-512 bf16, AMX) and slower than float32 where it is emulated."""
    speedup = cpu_bf16_speedup()
    wants_bf16 = config.bf16 or config.pure_bf16
    if wants_bf16 and speedup < 1.0:
        logger.warning("bf16 on this CPU: its bfloat16 matmuls run %.1fx slower than float32 ones (no AVX-512 bf16 "
                       "or AMX), so this run would be faster without `bf16`", 1 / speedup)
    elif not wants_bf16 and speedup >= 1.5:
        logger.info("This CPU multiplies bfloat16 %.1fx faster than float32 (AVX-512 bf16 or AMX): `bf16: true` "
                    "would train faster", speedup)


def _gpu_only_features(config: Config, on_cpu: bool) -> dict[str, Any]:
    """Liger kernels where a GPU runs them; a plain warning for the speed-ups tunelab does not integrate."""
    values: dict[str, Any] = {}
    if config.enable_liger_kernel:
        if on_cpu:
            logger.warning("`enable_liger_kernel` needs a CUDA GPU (Liger's kernels are Triton kernels): "
                           "training without it")
        else:
            values["use_liger_kernel"] = True
    if config.use_unsloth:
        logger.warning("`use_unsloth`: tunelab does not integrate unsloth's kernels; training without them")
    if config.use_unsloth_gc:
        logger.warning("`use_unsloth_gc`: tunelab does not integrate unsloth's offloaded checkpointing; training with "
                       "its own gradient checkpointing instead")
    if config.fp8:
        precision = "bf16 mixed precision" if config.bf16 else "fp16 mixed precision" if config.fp16 else "fp32"
        logger.warning("`fp8`: tunelab does not integrate FP8 training; training in %s as the config says", precision)
    return values

