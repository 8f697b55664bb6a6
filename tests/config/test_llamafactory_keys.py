"""Every option of LLaMA-Factory's argument classes is either a tunelab key or refused by name with the reason;
none is "unknown". The names are LLaMA-Factory 0.9.5's (its hparams dataclasses, and the transformers 5.6
`Seq2SeqTrainingArguments` its TrainingArguments extends), listed as facts."""

import pytest

from tunelab.config import ConfigError, load_config

LLAMAFACTORY_KEYS = {
    "ModelArguments": """
        adapter_folder adapter_name_or_path add_special_tokens add_tokens audio_sampling_rate block_diag_attn
        cache_dir compute_dtype crop_to_patches device_map disable_gradient_checkpointing double_quantization
        enable_liger_kernel export_device export_dir export_hub_model_id export_legacy_format
        export_quantization_bit export_quantization_dataset export_quantization_maxlen export_quantization_nsamples
        export_size flash_attn hf_hub_token image_do_pan_and_scan image_max_pixels image_min_pixels infer_backend
        infer_dtype init_special_tokens kt_expert_checkpoint_path kt_lora_expert_intermediate_size
        kt_lora_expert_num kt_use_lora_experts kt_weight_path low_cpu_mem_usage mixture_of_depths model_max_length
        model_name_or_path model_revision moe_aux_loss_coef ms_hub_token new_special_tokens_config offload_folder
        om_hub_token print_param_status quantization_bit quantization_device_map quantization_method
        quantization_type resize_vocab rope_scaling sglang_config sglang_lora_backend sglang_maxlen
        sglang_mem_fraction sglang_tp_size shift_attn split_special_tokens train_from_scratch trust_remote_code
        upcast_layernorm upcast_lmhead_output use_audio_in_video use_fast_tokenizer use_kt use_kv_cache
        use_reentrant_gc use_unsloth use_unsloth_gc use_v1_kernels video_fps video_max_pixels video_maxlen
        video_min_pixels vllm_config vllm_enforce_eager vllm_gpu_util vllm_max_lora_rank vllm_maxlen""",
    "DataArguments": """
        buffer_size cutoff_len data_shared_file_system dataset dataset_dir default_system enable_thinking
        eval_dataset eval_num_beams eval_on_each_dataset ignore_pad_token_for_loss interleave_probs mask_history
        max_samples media_dir mix_strategy neat_packing overwrite_cache packing preprocessing_batch_size
        preprocessing_num_workers preserve_thinking streaming template tokenized_path tool_format train_on_prompt
        val_size""",
    "FinetuningArguments": """
        additional_target apollo_layerwise apollo_proj apollo_proj_type apollo_rank apollo_scale apollo_scale_front
        apollo_scale_type apollo_target apollo_update_interval asft_alpha badam_mask_mode badam_mode
        badam_start_block badam_switch_interval badam_switch_mode badam_update_ratio badam_verbose compute_accuracy
        create_new_adapter disable_shuffling dpo_label_smoothing eaft_alpha early_stopping_steps finetuning_type
        freeze_extra_modules freeze_language_model freeze_multi_modal_projector freeze_trainable_layers
        freeze_trainable_modules freeze_vision_tower galore_layerwise galore_proj_type galore_rank galore_scale
        galore_target galore_update_interval hyper_parallel_args include_effective_tokens_per_second
        kto_chosen_weight kto_rejected_weight ld_alpha lora_alpha lora_dropout lora_rank lora_target
        loraplus_lr_embedding loraplus_lr_ratio module_dropout oft_block_size oft_rank oft_target pissa_convert
        pissa_init pissa_iter plot_loss ppo_buffer_size ppo_epochs ppo_score_norm ppo_target ppo_whiten_rewards
        pref_bco_weight pref_beta pref_ftx pref_loss pure_bf16 ref_model ref_model_adapters
        ref_model_quantization_bit reward_model reward_model_adapters reward_model_quantization_bit
        reward_model_type simpo_gamma stage swanlab_api_key swanlab_lark_secret swanlab_lark_webhook_url
        swanlab_logdir swanlab_mode swanlab_project swanlab_run_name swanlab_workspace use_adam_mini use_apollo
        use_asft_loss use_badam use_dft_loss use_dora use_eaft_loss use_galore use_hyper_parallel use_llama_pro
        use_mca use_muon use_rslora use_swanlab""",
    "GeneratingArguments": """
        do_sample length_penalty max_length max_new_tokens num_beams repetition_penalty skip_special_tokens
        temperature top_k top_p""",
    "EvaluationArguments": """
        batch_size download_mode lang n_shot save_dir seed task task_dir""",
    "TrainingArguments (LLaMA-Factory's own)": """
        enable_torch_profiler fp8 fp8_backend fp8_enable_fsdp_float8_all_gather master_addr master_port
        overwrite_output_dir profile_modules profiler_active_steps profiler_output_dir profiler_profile_memory
        profiler_record_shapes profiler_repeat profiler_wait_steps profiler_warmup_steps profiler_with_stack
        ray_init_kwargs ray_num_workers""",
    "Seq2SeqTrainingArguments": """
        accelerator_config adam_beta1 adam_beta2 adam_epsilon auto_find_batch_size average_tokens_across_devices
        batch_eval_metrics bf16 bf16_full_eval data_seed dataloader_drop_last dataloader_num_workers
        dataloader_persistent_workers dataloader_pin_memory dataloader_prefetch_factor ddp_backend
        ddp_broadcast_buffers ddp_bucket_cap_mb ddp_find_unused_parameters ddp_static_graph ddp_timeout debug
        deepspeed disable_tqdm do_eval do_predict do_train enable_jit_checkpoint eval_accumulation_steps eval_delay
        eval_do_concat_batches eval_on_start eval_steps eval_strategy eval_use_gather_object fp16 fp16_full_eval
        fsdp fsdp_config full_determinism generation_config generation_max_length generation_num_beams
        gradient_accumulation_steps gradient_checkpointing gradient_checkpointing_kwargs greater_is_better
        hub_always_push hub_model_id hub_private_repo hub_revision hub_strategy hub_token ignore_data_skip
        include_for_metrics include_num_input_tokens_seen label_names label_smoothing_factor learning_rate
        length_column_name liger_kernel_config load_best_model_at_end local_rank log_level log_level_replica
        log_on_each_node logging_dir logging_first_step logging_nan_inf_filter logging_steps logging_strategy
        lr_scheduler_kwargs lr_scheduler_type max_grad_norm max_steps metric_for_best_model neftune_noise_alpha
        num_train_epochs optim optim_args optim_target_modules output_dir parallelism_config
        per_device_eval_batch_size per_device_train_batch_size predict_with_generate prediction_loss_only project
        push_to_hub remove_unused_columns report_to restore_callback_states_from_checkpoint resume_from_checkpoint
        run_name save_on_each_node save_only_model save_steps save_strategy save_total_limit seed
        skip_memory_metrics sortish_sampler tf32 torch_compile torch_compile_backend torch_compile_mode
        torch_empty_cache_steps trackio_bucket_id trackio_space_id trackio_static_space_id train_sampling_strategy
        use_cache use_cpu use_liger_kernel warmup_ratio warmup_steps weight_decay""",
}
ALL_KEYS = sorted({key for keys in LLAMAFACTORY_KEYS.values() for key in keys.split()})
BASE = {"model_name_or_path": "m", "do_train": True, "dataset": "identity", "output_dir": "out"}



@pytest.mark.parametrize("key", ALL_KEYS)
def test_no_llamafactory_key_is_unknown(key):
    for value in (True, "x", 1):
        try:
            load_config({**BASE, key: value})
        except ConfigError as err:
            assert "unknown key" not in str(err), str(err)


def test_an_unsupported_llamafactory_key_says_so_with_its_reason():
    with pytest.raises(ConfigError, match=r"`mixture_of_depths` is a LLaMA-Factory option tunelab does not support "
                                          r"\(a training method tunelab does not have yet\)"):
        load_config({**BASE, "mixture_of_depths": "convert"})
    load_config({**BASE, "mixture_of_depths": None, "crop_to_patches": None})   # unset: accepted


def test_keys_tunelab_covers_itself_are_accepted():
    load_config({**BASE, "include_num_input_tokens_seen": True, "remove_unused_columns": False})
    config = load_config({**BASE, "finetuning_type": "lora", "quantization_bit": 4, "quantization_method": "bnb"})
    assert config.quantization_bit == 4
    with pytest.raises(ConfigError, match="bitsandbytes only"):
        load_config({**BASE, "quantization_method": "hqq"})


def test_did_you_mean_only_for_a_close_key():
    with pytest.raises(ConfigError, match=r"unknown key `learning_rte` \(did you mean `learning_rate`\?\)"):
        load_config({**BASE, "learning_rte": 1e-4})
    with pytest.raises(ConfigError, match=r"unknown key `model` \(see `tunelab help keys`\)"):
        load_config({**BASE, "model": "m"})
