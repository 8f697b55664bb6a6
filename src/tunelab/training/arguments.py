"""Translate a tunelab Config into transformers' TrainingArguments.

Built before any model or dataset is loaded, so a value transformers rejects (a passthrough key of the wrong type,
an optimizer whose package is missing) stops the run at once with a ConfigError.
"""


from transformers import TrainingArguments

from tunelab.config import Config, ConfigError

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
        per_device_train_batch_size=config.per_device_train_batch_size,
        per_device_eval_batch_size=config.per_device_eval_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        bf16=config.bf16,
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
    if config.uses_lora or config.method == "freeze":
        # Frozen parameters never get gradients; without this DDP waits for them forever.
        values["ddp_find_unused_parameters"] = False
    values.update(config.extra_training_args)
    try:
        return TrainingArguments(**values)
    except (ValueError, TypeError, ImportError) as err:
        raise ConfigError(f"transformers refused the training arguments: {err}") from None
