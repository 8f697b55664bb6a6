"""The fine-tuning methods, one function each: which weights train (full, freeze, lora), plus LoRA adapter loading.

`apply_method` is the one entry point for training; `METHODS` maps `config.method` to its function. Every method
leaves its trainable weights in float32 (see `loader._weights_dtype` for why) and the model in train mode.
"""

import logging
import re
from typing import TYPE_CHECKING, Callable

from tunelab.config import Config, ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

# Module-name components of vision encoders and their projectors in multimodal models: LoRA `all` and the freeze
# layer search skip them, since tunelab trains the language model only (as LLaMA-Factory does by default).
_VISION_PARTS = {"visual", "vision_tower", "vision_model", "vision_encoder", "image_encoder", "multi_modal_projector",
                 "mm_projector"}


def apply_method(model: "PreTrainedModel", config: Config, vocab_resized: bool = False) -> "PreTrainedModel":
    """Mark what `config.method` trains, set up gradient checkpointing, and return the model (maybe wrapped by peft).

    `vocab_resized` says the embeddings just got new rows: they then train too, since mean-initialised rows for
    new tokens are useless until learned.
    """
    import torch

    checkpointing = _use_gradient_checkpointing(config)
    if config.quantization_bit is not None:
        from peft import prepare_model_for_kbit_training

        # Freezes the quantized base, casts norms to float32 for stable training, and enables checkpointing itself.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif checkpointing:
        _enable_gradient_checkpointing(model, config)
    # The KV cache only serves generation; in training it holds memory for nothing.
    model.config.use_cache = False

    model = METHODS[config.method](model, config, vocab_resized)
    # Updates to half-precision weights would round away (see loader._weights_dtype); frozen ones may stay half.
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    model.train()
    return model


def count_parameters(model: "PreTrainedModel") -> tuple[int, int]:
    """(trainable, total) parameter counts, counting each shared (tied) weight once."""
    import torch

    trainable = total = 0
    for param in model.parameters():
        # Under DeepSpeed ZeRO-3 a parameter is a 0-element shard; ds_numel is its real size.
        count = getattr(param, "ds_numel", 0) or param.numel()
        if param.__class__.__name__ == "Params4bit":
            # bitsandbytes packs two 4-bit weights into each byte of its storage dtype.
            count *= 2 * getattr(param, "quant_storage", torch.uint8).itemsize
        total += count
        if param.requires_grad:
            trainable += count
    return trainable, total


def load_adapters_for_inference(model: "PreTrainedModel", config: Config) -> "PreTrainedModel":
    """Apply `adapter_name_or_path` for inference: merged into the weights, or kept apart on a quantized base."""
    adapters = config.adapter_name_or_path or []
    if config.quantization_bit is not None and adapters:
        if len(adapters) > 1:
            raise ConfigError("`adapter_name_or_path`: a quantized base (quantization_bit) takes one adapter; "
                              "merge the others into a float model first")
        return _load_adapter(model, adapters[0], config, trainable=False)
    return _merge_adapters(model, adapters, config)


def _train_all(model: "PreTrainedModel", config: Config, vocab_resized: bool) -> "PreTrainedModel":
    model.requires_grad_(True)
    return model


def _train_some_layers(model: "PreTrainedModel", config: Config, vocab_resized: bool) -> "PreTrainedModel":
    """freeze: train the last N decoder layers (first |N| when negative), optionally only some of their modules."""
    n_layers = model.config.get_text_config().num_hidden_layers
    wanted = config.freeze_trainable_layers
    if abs(wanted) > n_layers:
        raise ConfigError(f"`freeze_trainable_layers: {wanted}` asks for more layers than the model has ({n_layers})")
    chosen = range(n_layers - wanted, n_layers) if wanted > 0 else range(-wanted)
    prefix = _decoder_layers_prefix(model, n_layers)
    inside = [] if "all" in config.freeze_trainable_modules else config.freeze_trainable_modules
    extra = list(config.freeze_extra_modules or [])
    if vocab_resized:
        extra += [name for name in _embedding_names(model) if name not in extra]
        logger.info("the vocab was resized: %s train too", ", ".join(extra))

    model.requires_grad_(False)
    layer_pattern = re.compile(rf"{re.escape(prefix)}\.(\d+)\.(.+)")
    in_layer_names: set[str] = set()
    outside_names: set[str] = set()
    matched: set[str] = set()
    # remove_duplicate=False shows a tied weight under both names, so `lm_head` finds a head tied to the embeddings.
    for name, param in model.named_parameters(remove_duplicate=False):
        layer = layer_pattern.fullmatch(name)
        if layer:
            in_layer_names.update(layer[2].split(".")[:-1])
        else:
            outside_names.update(name.split(".")[:-1])
        if layer and int(layer[1]) in chosen:
            hits = [m for m in inside if _names_module(layer[2], m)]
            matched.update(hits)
            if hits or not inside:
                param.requires_grad_(True)
        hits = [m for m in extra if _names_module(name, m)]
        if hits:
            matched.update(hits)
            param.requires_grad_(True)

    for key, names, available in (("freeze_trainable_modules", inside, in_layer_names),
                                  ("freeze_extra_modules", extra, outside_names)):
        missing = [m for m in names if m not in matched]
        if missing:
            raise ConfigError(f"`{key}`: {', '.join(missing)} matches no module; modules there: "
                              f"{', '.join(sorted(n for n in available if not n.isdigit()))}")
    logger.info("freeze: training layers %s of %d%s", list(chosen), n_layers,
                f" (modules: {', '.join(inside)})" if inside else "")
    return model


def _add_lora(model: "PreTrainedModel", config: Config, vocab_resized: bool) -> "PreTrainedModel":
    """lora: merge earlier adapters, then continue the last one or create a fresh adapter."""
    from peft import LoraConfig, get_peft_model

    adapters = config.adapter_name_or_path or []
    if adapters and not config.create_new_adapter:
        model = _merge_adapters(model, adapters[:-1], config)
        model = _load_adapter(model, adapters[-1], config, trainable=True)
        logger.info("training the adapter %s further (its own rank and targets apply)", adapters[-1])
        return model

    model = _merge_adapters(model, adapters, config)
    target_modules, exclude_modules = _lora_targets(model, config.lora_target)
    modules_to_save = list(config.additional_target or [])
    if vocab_resized:
        modules_to_save += [name for name in _embedding_names(model) if name not in modules_to_save]
        logger.info("the vocab was resized: %s train in full beside the adapter", ", ".join(modules_to_save))
    module_names = [name for name, _ in model.named_modules()]
    for name in modules_to_save:
        if not any(_names_module(full, name) for full in module_names):
            raise ConfigError(f"`additional_target`: {name} matches no module of the model")

    lora = LoraConfig(
        task_type="CAUSAL_LM", r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=target_modules, exclude_modules=exclude_modules, use_rslora=config.use_rslora,
        use_dora=config.use_dora, modules_to_save=modules_to_save or None,
    )
    return get_peft_model(model, lora)


#: config.method -> the function that marks what trains.
METHODS: dict[str, Callable[["PreTrainedModel", Config, bool], "PreTrainedModel"]] = {
    "full": _train_all,
    "freeze": _train_some_layers,
    "lora": _add_lora,
}


def _lora_targets(model: "PreTrainedModel", requested: list[str]) -> tuple[list[str], list[str] | None]:
    """(target_modules, exclude_modules) for peft: `all` means every linear layer but the head and vision tower."""
    from torch import nn

    # bitsandbytes' Linear4bit and Linear8bitLt subclass nn.Linear, so quantized models are covered too.
    linears = {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    head = model.get_output_embeddings()
    excluded = sorted(name for name, module in linears.items()
                      if module is head or _VISION_PARTS.intersection(name.split(".")))
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in linears if name not in excluded})
    if requested == ["all"]:
        # Short names keep adapter_config.json readable; the exclusions guard against a head or vision layer that
        # shares one of them.
        return suffixes, excluded or None
    module_names = [name for name, _ in model.named_modules()]
    for target in requested:
        if not any(_names_module(name, target) for name in module_names):
            raise ConfigError(f"`lora_target`: {target} matches no module; the linear layers are: "
                              f"{', '.join(suffixes)} (or use `all`)")
    return list(requested), None


def _merge_adapters(model: "PreTrainedModel", paths: list[str], config: Config) -> "PreTrainedModel":
    """Load each adapter and fold it into the weights, in order."""
    if paths and config.quantization_bit is not None:
        raise ConfigError("`adapter_name_or_path`: adapters cannot be merged into a quantized base "
                          "(quantization_bit); give a single adapter and no `create_new_adapter`")
    for path in paths:
        model = _load_adapter(model, path, config, trainable=False).merge_and_unload()
        logger.info("merged the adapter %s into the weights", path)
    return model


def _load_adapter(model: "PreTrainedModel", path: str, config: Config, trainable: bool) -> "PreTrainedModel":
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, path, is_trainable=trainable, token=config.hf_hub_token,
                                         cache_dir=config.cache_dir)
    except (OSError, ValueError) as err:
        raise ConfigError(f"`adapter_name_or_path`: cannot load the adapter {path}: {err}") from err


def _use_gradient_checkpointing(config: Config) -> bool:
    if config.disable_gradient_checkpointing is None:
        import torch

        # On CPU it costs about 25% of the step time (STACK.md) and memory is rarely what runs out.
        return torch.cuda.is_available()
    return not config.disable_gradient_checkpointing


def _enable_gradient_checkpointing(model: "PreTrainedModel", config: Config) -> None:
    if not model.supports_gradient_checkpointing:
        logger.warning("%s does not support gradient checkpointing: training without it", type(model).__name__)
        return
    # transformers 5.23 renamed gradient_checkpointing_enable; earlier 5.x releases only have the old name.
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": False})
    if config.method != "full":
        # With frozen embeddings nothing entering a checkpointed layer requires grad; reentrant checkpointing (which
        # some remote-code models force) would then drop the layer's gradients.
        model.enable_input_require_grads()
    logger.info("gradient checkpointing: on")


def _decoder_layers_prefix(model: "PreTrainedModel", n_layers: int) -> str:
    """The dotted name of the decoder layer list (`model.layers`, `transformer.h`, ...), found by its length."""
    indices: dict[str, set[int]] = {}
    for name, _ in model.named_parameters():
        numbered = re.match(r"(.+?)\.(\d+)\.", name)
        if numbered and not _VISION_PARTS.intersection(numbered[1].split(".")):
            indices.setdefault(numbered[1], set()).add(int(numbered[2]))
    candidates = [prefix for prefix, seen in indices.items() if seen == set(range(n_layers))]
    if len(candidates) != 1:
        raise ConfigError(f"`finetuning_type: freeze`: cannot tell which module list holds the {n_layers} decoder "
                          f"layers of {type(model).__name__} (candidates: {', '.join(candidates) or 'none'})")
    return candidates[0]


def _embedding_names(model: "PreTrainedModel") -> list[str]:
    """Short names of the input embeddings and the output head, e.g. ["embed_tokens", "lm_head"]."""
    wanted = [model.get_input_embeddings(), model.get_output_embeddings()]
    return [name.rsplit(".", 1)[-1] for name, module in model.named_modules()
            if any(module is target for target in wanted)]


def _names_module(full_name: str, module: str) -> bool:
    """Whether `module` (one or more dotted components) appears in `full_name` as whole components."""
    return f".{module}." in f".{full_name}."
