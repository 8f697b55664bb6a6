"""LLaMA-Factory's options that tunelab's schema does not hold, each with what tunelab does about it.

Every field of LLaMA-Factory's argument classes (ModelArguments, DataArguments, FinetuningArguments,
GeneratingArguments, EvaluationArguments and its TrainingArguments) is a schema key, a passed-through
`TrainingArguments` key (passthrough.py), or listed here, so no LLaMA-Factory key is ever "unknown"
(`tests/config/test_config.py` checks it against the list of their names). Two kinds:

* `DECIDED_BY_TUNELAB`: accepted and left to tunelab, which sets these itself (a LLaMA-Factory config carries
  them, often at their default);
* `UNSUPPORTED`: accepted when unset (null, false, 0, empty), refused with the reason otherwise.
"""

#: key -> how tunelab covers it; the key's value in a config changes nothing.
DECIDED_BY_TUNELAB = {
    **dict.fromkeys("include_num_input_tokens_seen include_effective_tokens_per_second".split(),
                    "tunelab always counts the input tokens (trainer_log.jsonl, all_results.json)"),
    **dict.fromkeys("remove_unused_columns label_names length_column_name use_cache".split(),
                    "set by tunelab for each stage's data"),
    **dict.fromkeys("compute_dtype device_map low_cpu_mem_usage quantization_device_map offload_folder".split(),
                    "tunelab places and types the weights itself (bf16/fp16, the GPUs torchrun gives it)"),
    "gradient_checkpointing": "on by default; `disable_gradient_checkpointing: true` turns it off",
    "use_reentrant_gc": "tunelab uses non-reentrant gradient checkpointing",
    "print_param_status": "tunelab logs the trainable parameters of every run",
    "ignore_pad_token_for_loss": "padding never counts in tunelab's losses",
    "data_shared_file_system": "the main process tokenizes first and the others read its cache",
    "download_mode": "tunelab reads local files; hub datasets use `datasets`' own cache",
}

_GROUPS = {
    "audio models, and the image tiling of Gemma 3 and InternVL, are not supported yet": """
        image_do_pan_and_scan crop_to_patches audio_sampling_rate use_audio_in_video""",
    "a training method tunelab does not have yet": """
        pref_bco_weight ld_alpha mixture_of_depths shift_attn init_special_tokens new_special_tokens_config
        split_special_tokens""",
    "a GPU kernel or accelerator stack tunelab does not integrate": """
        use_v1_kernels use_kt kt_weight_path kt_expert_checkpoint_path kt_use_lora_experts kt_lora_expert_num
        kt_lora_expert_intermediate_size use_hyper_parallel hyper_parallel_args hyper_parallel_cp_size
        block_diag_attn""",
    "Megatron-Core training (use_mca, use_megatron_bridge) is not integrated: tunelab scales with DDP, DeepSpeed "
    "and FSDP": """
        use_mca use_megatron_bridge megatron_bridge_args tensor_model_parallel_size pipeline_model_parallel_size
        virtual_pipeline_model_parallel_size context_parallel_size expert_model_parallel_size sequence_parallel
        use_distributed_optimizer overlap_param_gather overlap_grad_reduce bias_activation_fusion apply_rope_fusion
        moe_grouped_gemm moe_token_dispatcher_type recompute_granularity mixed_precision use_packed_sequences
        export_hf_on_finish""",
    "inference engines other than huggingface and vllm, and engine configs, are not supported": """
        sglang_maxlen sglang_mem_fraction sglang_tp_size sglang_config sglang_lora_backend vllm_config use_kv_cache
        adapter_folder""",
    "quantized export (GPTQ) is not supported yet": """
        export_quantization_bit export_quantization_dataset export_quantization_nsamples export_quantization_maxlen
        export_legacy_format""",
    "trackers other than report_to's (tensorboard, wandb, ...), profilers and Ray are not integrated": """
        use_swanlab swanlab_project swanlab_workspace swanlab_run_name swanlab_mode swanlab_api_key swanlab_logdir
        swanlab_lark_webhook_url swanlab_lark_secret enable_torch_profiler profile_modules profiler_output_dir
        profiler_wait_steps profiler_warmup_steps profiler_active_steps profiler_repeat profiler_record_shapes
        profiler_profile_memory profiler_with_stack ray_num_workers ray_init_kwargs trackio_space_id
        trackio_bucket_id trackio_static_space_id""",
    "torchrun reads the address of the first node from MASTER_ADDR and MASTER_PORT": "master_addr master_port",
    "ModelScope and Modelers hub tokens are not used: tunelab reads the Hugging Face hub (hf_hub_token)":
        "ms_hub_token om_hub_token",
    "tunelab quantizes on the fly with bitsandbytes only (`quantization_method: bnb`): transformers 5 cannot train "
    "through HQQ, EETQ needs a CUDA GPU, and GPTQ/AWQ/AQLM models are quantized already (load them without "
    "`quantization_method`)": "quantization_method",
    "not supported yet": """
        compute_accuracy disable_shuffling early_stopping_steps eval_num_beams eval_on_each_dataset preserve_thinking
        model_max_length batch_eval_metrics ddp_static_graph debug enable_jit_checkpoint eval_use_gather_object
        generation_config generation_max_length generation_num_beams include_for_metrics parallelism_config
        restore_callback_states_from_checkpoint sortish_sampler""",
}
#: key -> why tunelab refuses it when set.
UNSUPPORTED = {key: reason for reason, keys in _GROUPS.items() for key in keys.split()}
#: Values of an unsupported key that ask for what tunelab does anyway.
SAME_AS_TUNELAB = {"quantization_method": ("bnb", "bitsandbytes")}
