"""The one typed schema of every key a tunelab config may hold.

Key names are LLaMA-Factory's: its users bring their YAML unchanged. Each key is a dataclass field declared with
`option()`, which records its help text and the values it allows; the loader (`config/load.py`), the cross-field
rules (`config/rules.py`), the CLI and the docs all read this one declaration.

Keys of transformers' `TrainingArguments` that tunelab passes through untouched (`weight_decay`, `adam_beta2`, ...)
are listed in `config/passthrough.py` rather than redeclared here.
"""

from dataclasses import dataclass, field, fields
from typing import Any, Literal

from tunelab.config.method_options import (AdapterVariantOptions, LayerAndLossOptions, OptimizerOptions,
                                           PrecisionOptions)
from tunelab.config.multimodal_options import MultimodalOptions
from tunelab.config.option import option
from tunelab.config.stages import STAGE_SPECS, STAGES

#: Preference losses of the dpo stage; `stage: orpo` and `stage: simpo` are shorthands for dpo with that loss.
PREFERENCE_LOSSES = ("sigmoid", "hinge", "ipo", "orpo", "simpo")
#: Losses that compare the policy with a reference model (orpo and simpo need none).
REFERENCE_LOSSES = ("sigmoid", "hinge", "ipo")
METHODS = ("full", "freeze", "lora", "qlora", "oft")


@dataclass
class ModelOptions:
    model_name_or_path: str | None = option(None, "Hub id, local directory, or local .gguf file of the base model.")
    adapter_name_or_path: list[str] | None = option(
        None, "LoRA adapters to load (comma list): all but the last are merged, the last one is trained on.")
    cache_dir: str | None = option(None, "Where downloaded models and datasets are cached.")
    model_revision: str = option("main", "Branch, tag or commit of the model on the hub.")
    hf_hub_token: str | None = option(None, "Token for private hub models.")
    trust_remote_code: bool = option(False, "Allow running the model repository's own Python code.")
    use_fast_tokenizer: bool = option(True, "Use the tokenizers-backed (Rust) tokenizer.")
    infer_dtype: Literal["auto", "float16", "bfloat16", "float32"] = option(
        "auto", "Weights dtype when neither bf16 nor fp16 is set.")
    flash_attn: Literal["auto", "disabled", "sdpa", "eager", "fa2", "fa3"] = option(
        "auto", "Attention implementation (disabled = eager).")
    train_from_scratch: bool = option(False, "Initialise the weights randomly from the model's config.")
    resize_vocab: bool = option(False, "Resize the embeddings to the tokenizer (after adding tokens).")
    add_special_tokens: list[str] | None = option(None, "Special tokens to add to the tokenizer (comma list).")
    add_tokens: list[str] | None = option(None, "Ordinary tokens to add to the tokenizer (comma list).")
    rope_scaling: Literal["linear", "dynamic", "yarn", "llama3"] | None = option(
        None, "Stretch RoPE so the model reaches cutoff_len beyond its trained context.")
    quantization_bit: Literal[4, 8] | None = option(None, "Load the base model in 4 or 8 bits (QLoRA).")
    quantization_type: Literal["nf4", "fp4"] = option("nf4", "4-bit data type.")
    double_quantization: bool = option(True, "Quantize the 4-bit quantization constants too.")


@dataclass
class DataOptions:
    dataset: list[str] | None = option(None, "Training datasets: names in dataset_info.json (comma list).")
    eval_dataset: list[str] | None = option(None, "Evaluation datasets: names in dataset_info.json (comma list).")
    dataset_dir: str = option("data", "Folder holding dataset_info.json and the dataset files.")
    template: str | None = option(
        None, "Chat template: a name (llama3, qwen, ...), a .yaml or .jinja file; omitted: the tokenizer's own.")
    cutoff_len: int = option(2048, "Maximum tokens per sample (prompt and response together).", minimum=1)
    max_samples: int | None = option(None, "Use at most this many samples of each dataset.", minimum=1)
    val_size: float = option(0.0, "Held-out share (< 1) or count (>= 1) of the training data for evaluation.",
                             minimum=0)
    overwrite_cache: bool = option(False, "Tokenize again even when a cached copy exists.")
    preprocessing_num_workers: int | None = option(
        None, "Processes used for tokenization (default: one per 10,000 samples, at most one per core; pt, kto and "
              "packing: one).", minimum=1)
    preprocessing_batch_size: int = option(1000, "Samples per tokenization batch.", minimum=1)
    train_on_prompt: bool = option(False, "Train on the prompt tokens too (SFT).")
    mask_history: bool = option(False, "Train only on the last assistant turn (SFT).")
    default_system: str | None = option(None, "System prompt used when a sample has none.")
    enable_thinking: bool = option(True, "Let reasoning templates (qwen3, ...) think.")
    tool_format: str | None = option(
        None, "How tools and tool calls are written: qwen, llama3, glm4 or mistral (default: the template's own).")
    strict_data: bool = option(False, "Refuse the whole dataset at its first invalid sample instead of skipping it.")
    packing: bool | None = option(None, "Pack several samples into each cutoff_len row (default: on for pt only).")
    neat_packing: bool = option(False, "Pack without attention across samples (position ids restart per sample).")
    padding_free: bool | None = option(
        None, "Run each step's samples back to back without padding, in forward passes of up to "
              "per_device_train_batch_size x the longest sample's tokens, attention kept within each sample (sft, "
              "pt on text): the same loss, no work on pad tokens. Default: on for sft on text where it applies (a "
              "transformers model class; FlashAttention, or sdpa on rows of up to 16,384 tokens).")
    mix_strategy: Literal["concat", "interleave_under", "interleave_over"] = option(
        "concat", "How several datasets are mixed: one after another, or interleaved until the shortest/longest ends.")
    interleave_probs: list[float] | None = option(
        None, "Sampling probability of each dataset when interleaving (comma list, one per dataset).")
    streaming: bool = option(False, "Read datasets lazily instead of loading them whole (needs max_steps).")
    buffer_size: int = option(16384, "Shuffle buffer of a streamed dataset.", minimum=1)
    tokenized_path: str | None = option(
        None, "Save the tokenized data here, or load it from here when it exists (then dataset is not read).")


@dataclass
class MethodOptions:
    stage: Literal[STAGES] = option("sft", "Training stage.")
    finetuning_type: Literal[METHODS] = option("lora", "Which weights are trained.")
    freeze_trainable_layers: int = option(
        2, "freeze: train the last N layers (or the first N when negative).")
    freeze_trainable_modules: list[str] = option(
        ["all"], "freeze: module names inside the trainable layers to train (comma list, or all).")
    freeze_extra_modules: list[str] | None = option(
        None, "freeze: modules outside the layers to train as well, e.g. embed_tokens,lm_head.")
    lora_rank: int = option(8, "LoRA rank r.", minimum=1)
    lora_alpha: float | None = option(None, "LoRA scaling alpha (default: 2 x lora_rank).", minimum=0,
                                      exclusive_minimum=True)
    lora_dropout: float = option(0.0, "Dropout on the LoRA input.", minimum=0, maximum=1)
    lora_target: list[str] = option(["all"], "Modules that get LoRA (comma list, or all linear layers).")
    additional_target: list[str] | None = option(
        None, "Modules trained in full and saved beside the adapter, e.g. embed_tokens,lm_head.")
    use_rslora: bool = option(False, "Rank-stabilised LoRA scaling (alpha / sqrt(r)).")
    use_dora: bool = option(False, "Weight-decomposed LoRA (DoRA).")
    create_new_adapter: bool = option(False, "Merge every loaded adapter and train a fresh one on top.")
    plot_loss: bool = option(False, "Save loss curves as PNG files in output_dir.")
    disable_gradient_checkpointing: bool | None = option(
        None, "Default: checkpointing on with a GPU, off on CPU (where it costs about 25% speed).")


@dataclass
class PreferenceOptions:
    pref_beta: float = option(0.1, "dpo/kto: beta, how far the policy may move from the reference (orpo: lambda).",
                              minimum=0, exclusive_minimum=True)
    pref_ftx: float = option(0.0, "dpo/kto: weight of an added SFT loss on the chosen replies.", minimum=0)
    pref_loss: Literal[PREFERENCE_LOSSES] | None = option(
        None, "dpo: the loss (default sigmoid; orpo and simpo for those stages).")
    dpo_label_smoothing: float = option(0.0, "dpo sigmoid: assumed share of flipped preference labels (cDPO).",
                                        minimum=0, maximum=0.5)
    simpo_gamma: float = option(0.5, "simpo: target reward margin.", minimum=0)
    kto_chosen_weight: float = option(1.0, "kto: loss weight of desirable samples.", minimum=0)
    kto_rejected_weight: float = option(1.0, "kto: loss weight of undesirable samples.", minimum=0)
    ref_model: str | None = option(
        None, "dpo/kto/ppo/grpo: reference model (default: the base model, or with LoRA the policy without adapter).")
    ref_model_adapters: list[str] | None = option(None, "Adapters merged into ref_model (comma list).")
    ref_model_quantization_bit: Literal[4, 8] | None = option(None, "Load ref_model in 4 or 8 bits.")


@dataclass
class RewardOptions:
    reward_model: str | None = option(
        None, "ppo/grpo: the reward model: an adapter folder (lora), a model folder (full) or a URL (api).")
    reward_model_adapters: list[str] | None = option(None, "reward_model_type full: adapters merged into it.")
    reward_model_quantization_bit: Literal[4, 8] | None = option(None, "Load a full reward model in 4 or 8 bits.")
    reward_model_type: Literal["lora", "full", "api"] = option(
        "lora", "lora: an rm adapter on the policy's base; full: a separate model; api: an HTTP endpoint.")
    reward_funcs: list[str] | None = option(
        None, "grpo: reward functions as `module:function` or `path/file.py:function` (comma list).")
    ppo_buffer_size: int = option(1, "ppo: batches generated before each round of updates.", minimum=1)
    ppo_epochs: int = option(4, "ppo: passes over each round of rollouts.", minimum=1)
    ppo_score_norm: bool = option(False, "ppo: normalise the scores by their running mean and std.")
    ppo_target: float = option(6.0, "ppo: KL the adaptive KL coefficient steers towards.", minimum=0,
                               exclusive_minimum=True)
    ppo_whiten_rewards: bool = option(False, "ppo: whiten the per-token rewards before computing advantages.")
    num_generations: int = option(4, "grpo: completions generated per prompt (the group).", minimum=2)
    grpo_beta: float = option(0.04, "grpo: weight of the KL penalty to the reference (0: no reference).", minimum=0)
    grpo_epsilon: float = option(0.2, "grpo: clipping range of the probability ratio.", minimum=0,
                                 exclusive_minimum=True)
    grpo_iterations: int = option(1, "grpo: updates per batch of generations.", minimum=1)


@dataclass
class GenerationOptions:
    do_sample: bool = option(True, "Sample (true) or decode greedily (false).")
    temperature: float = option(0.95, "Sampling temperature.", minimum=0, exclusive_minimum=True)
    top_p: float = option(0.7, "Nucleus sampling: keep the smallest set of tokens reaching this probability.",
                          minimum=0, maximum=1, exclusive_minimum=True)
    top_k: int = option(50, "Sample among the k most likely tokens (0: no limit).", minimum=0)
    num_beams: int = option(1, "Beam search width (1: none).", minimum=1)
    max_length: int = option(1024, "Longest prompt plus reply (max_new_tokens wins when set).", minimum=1)
    max_new_tokens: int = option(1024, "Longest reply, in tokens.", minimum=1)
    repetition_penalty: float = option(1.0, "Penalty on repeated tokens (1: none).", minimum=0,
                                       exclusive_minimum=True)
    length_penalty: float = option(1.0, "Beam search: exponent on the length when scoring beams.")
    skip_special_tokens: bool = option(True, "Leave special tokens out of decoded text.")


@dataclass
class InferenceOptions:
    infer_backend: Literal["huggingface", "vllm"] = option(
        "huggingface", "chat/api/webchat engine: transformers (any machine) or vLLM (GPU, needs the vllm package).")
    vllm_maxlen: int = option(4096, "vllm: longest prompt plus reply the engine holds.", minimum=1)
    vllm_gpu_util: float = option(0.9, "vllm: share of GPU memory the engine may take.", minimum=0, maximum=1,
                                  exclusive_minimum=True)
    vllm_enforce_eager: bool = option(False, "vllm: skip CUDA graphs (less memory, slower).")
    vllm_max_lora_rank: int = option(32, "vllm: the largest LoRA rank it must serve.", minimum=1)


@dataclass
class ExportOptions:
    export_dir: str | None = option(None, "tunelab export: folder the merged model is written to.")
    export_size: int = option(5, "tunelab export: largest safetensors shard, in GB.", minimum=1)
    export_device: Literal["cpu", "auto"] = option(
        "cpu", "tunelab export: merge on the CPU, or on the GPU when there is one (auto).")
    export_hub_model_id: str | None = option(None, "tunelab export: also push the merged model to this hub repo.")


@dataclass
class EvaluationOptions:
    task: str | None = option(
        None, "tunelab eval: benchmark and split, e.g. mmlu_test, ceval_validation, cmmlu_test, sample_test.")
    task_dir: str = option("evaluation", "tunelab eval: folder holding the benchmarks (one subfolder per task).")
    batch_size: int = option(4, "tunelab eval: questions scored per forward pass.", minimum=1)
    n_shot: int = option(5, "tunelab eval: solved examples shown before each question.", minimum=0)
    lang: Literal["en", "zh"] = option("en", "tunelab eval: language of the prompt around the questions.")
    save_dir: str | None = option(None, "tunelab eval: folder for the per-question answers and the scores.")


@dataclass
class TrainingOptions:
    output_dir: str | None = option(None, "Where checkpoints, weights, logs and plots are written.")
    overwrite_output_dir: bool = option(False, "Start over in a non-empty output_dir (its old results are removed).")
    resume_from_checkpoint: str | None = option(None, "Checkpoint folder to resume from.")
    do_train: bool = option(False, "Train.")
    do_eval: bool = option(False, "Evaluate on the evaluation set.")
    do_predict: bool = option(False, "sft: generate replies for the evaluation set and score them (BLEU, ROUGE).")
    predict_with_generate: bool = option(
        False, "sft with do_predict: generate the replies (written to generated_predictions.jsonl).")
    learning_rate: float = option(5e-5, "Peak learning rate.", minimum=0, exclusive_minimum=True)
    num_train_epochs: float = option(3.0, "Passes over the training data.", minimum=0, exclusive_minimum=True)
    max_steps: int = option(-1, "Stop after this many optimizer steps (overrides num_train_epochs when > 0).")
    lr_scheduler_type: Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                               "constant_with_warmup", "inverse_sqrt", "reduce_lr_on_plateau",
                               "cosine_with_min_lr", "warmup_stable_decay"] = option("linear", "Learning-rate curve.")
    warmup_ratio: float = option(0.0, "Share of the steps spent warming up the learning rate.", minimum=0, maximum=1)
    warmup_steps: int = option(0, "Warm-up steps (wins over warmup_ratio when > 0).", minimum=0)
    max_grad_norm: float = option(1.0, "Gradient clipping threshold.", minimum=0)
    optim: str = option("adamw_torch", "Optimizer name as transformers knows it (adamw_torch, sgd, adamw_bnb_8bit...).")
    per_device_train_batch_size: int = option(8, "Samples per device per forward pass.", minimum=1)
    per_device_eval_batch_size: int = option(8, "Evaluation samples per device per forward pass.", minimum=1)
    gradient_accumulation_steps: int = option(1, "Forward passes per optimizer step.", minimum=1)
    bf16: bool = option(False, "Train in bfloat16 mixed precision.")
    fp16: bool = option(False, "Train in float16 mixed precision.")
    logging_steps: float = option(500, "Log every N steps (or this share of the run when < 1).", minimum=0,
                                  exclusive_minimum=True)
    save_steps: float = option(500, "Save a checkpoint every N steps (or this share of the run when < 1).",
                               minimum=0, exclusive_minimum=True)
    save_strategy: Literal["no", "steps", "epoch", "best"] = option("steps", "When checkpoints are saved.")
    save_only_model: bool = option(False, "Checkpoints hold only the weights (no optimizer state: cannot resume).")
    eval_strategy: Literal["no", "steps", "epoch"] = option("no", "When the evaluation set is scored.")
    eval_steps: float | None = option(None, "Evaluate every N steps (default: logging_steps).", minimum=0,
                                      exclusive_minimum=True)
    seed: int = option(42, "Random seed for weights, data order and dropout.")
    dataloader_num_workers: int = option(0, "Worker processes feeding batches.", minimum=0)
    ddp_timeout: int = option(1800, "Seconds a distributed process waits for the others.", minimum=1)
    report_to: list[str] = option(["none"], "Experiment trackers (none, tensorboard, wandb, ...).")


@dataclass
class Config(ModelOptions, DataOptions, MultimodalOptions, MethodOptions, AdapterVariantOptions, OptimizerOptions,
             LayerAndLossOptions, PrecisionOptions, PreferenceOptions, RewardOptions, GenerationOptions,
             InferenceOptions, ExportOptions, EvaluationOptions, TrainingOptions):
    """Everything one tunelab run needs. Build it with `tunelab.config.load_config`, which validates it."""

    #: Keys of transformers' TrainingArguments that tunelab forwards without interpreting them.
    extra_training_args: dict[str, Any] = field(default_factory=dict, metadata={"internal": True})

    def __post_init__(self) -> None:
        # Defaults that depend on other keys are filled here, so every layer reads one resolved value.
        if self.lora_alpha is None:
            self.lora_alpha = 2.0 * self.lora_rank
        if self.finetuning_type == "qlora" and self.quantization_bit is None:
            self.quantization_bit = 4
        if self.pref_loss is None and self.stage in STAGE_SPECS:
            self.pref_loss = STAGE_SPECS[self.stage].pref_loss

    @property
    def method(self) -> str:
        """The adapter method behind finetuning_type: qlora is LoRA on a quantized base."""
        return "lora" if self.finetuning_type == "qlora" else self.finetuning_type

    @property
    def uses_lora(self) -> bool:
        return self.method == "lora"

    @property
    def sft_loss_variant(self) -> bool:
        """Whether sft trains with a token-weighted loss (DFT, EAFT, ASFT) instead of the cross-entropy."""
        return self.use_dft_loss or self.use_eaft_loss or self.use_asft_loss

    @property
    def uses_adapter(self) -> bool:
        """Whether training adds a peft adapter (LoRA or OFT) to a frozen base."""
        return self.method in ("lora", "oft")


def public_fields() -> list:
    """The config keys users write, in declaration order."""
    return [f for f in fields(Config) if not f.metadata.get("internal")]
