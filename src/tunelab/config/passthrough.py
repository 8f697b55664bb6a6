"""Keys of transformers' `TrainingArguments` that tunelab forwards as they are.

The schema declares the training keys tunelab interprets; these others are accepted so that any LLaMA-Factory or
transformers config runs unchanged, and transformers validates their values when the run starts (before any model
is loaded). `tests/config/test_config.py` checks this table against the installed transformers.
"""

PASSTHROUGH_TRAINING_KEYS = frozenset("""
lr_scheduler_kwargs optim_args weight_decay adam_beta1 adam_beta2 adam_epsilon optim_target_modules
average_tokens_across_devices label_smoothing_factor bf16_full_eval fp16_full_eval tf32 gradient_checkpointing_kwargs
torch_compile torch_compile_backend torch_compile_mode use_liger_kernel liger_kernel_config neftune_noise_alpha
torch_empty_cache_steps auto_find_batch_size logging_strategy logging_first_step log_on_each_node
logging_nan_inf_filter log_level log_level_replica disable_tqdm run_name project eval_delay prediction_loss_only
eval_on_start eval_do_concat_batches eval_accumulation_steps save_on_each_node save_total_limit push_to_hub hub_token
hub_private_repo hub_model_id hub_strategy hub_always_push hub_revision load_best_model_at_end metric_for_best_model
greater_is_better ignore_data_skip full_determinism data_seed use_cpu accelerator_config dataloader_drop_last
dataloader_pin_memory dataloader_persistent_workers dataloader_prefetch_factor ddp_find_unused_parameters
ddp_bucket_cap_mb ddp_broadcast_buffers ddp_backend fsdp fsdp_config deepspeed skip_memory_metrics
local_rank train_sampling_strategy
""".split())

#: Keys transformers 5 removed that LLaMA-Factory configs still carry, and what tunelab does with each.
RENAMED_TRAINING_KEYS = {"evaluation_strategy": "eval_strategy", "no_cuda": "use_cpu"}
#: FSDP keys transformers 5 moved into `fsdp_config` (LLaMA-Factory's FSDP examples still set them at the top).
MOVED_INTO_FSDP_CONFIG = {"fsdp_transformer_layer_cls_to_wrap": "transformer_layer_cls_to_wrap",
                          "fsdp_min_num_params": "min_num_params"}
IGNORED_TRAINING_KEYS = {
    "logging_dir": "tensorboard logs go to output_dir/runs",
    "save_safetensors": "weights are always saved as safetensors",
}
