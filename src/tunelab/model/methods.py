"""The fine-tuning methods, one function each: which weights train (full, freeze, lora, oft).

`apply_method` is the one entry point for training; `METHODS` maps `config.method` to its function (the adapters,
LoRA and OFT, live in `adapters.py`). Every method leaves its trainable weights in float32 (see
`loader._weights_dtype` for why), or in bfloat16 with `pure_bf16`, and the model in train mode; `precision.py`
then applies `upcast_layernorm` and `upcast_lmhead_output`.
"""

import logging
from typing import TYPE_CHECKING, Callable

from tunelab.config import Config, ConfigError
from tunelab.model.adapters import add_adapter
from tunelab.model.fused_lora import fuse_lora_layers
from tunelab.model.gated_mlp import fuse_gated_mlps
from tunelab.model.layers import (decoder_layers_prefix, embedding_names, layer_pattern, names_module, num_layers,
                                  trainable_layer_ids)
from tunelab.model.precision import set_trainable_dtype, upcast_layernorm, upcast_lmhead_output
from tunelab.model.vision import apply_freeze_keys, is_vision_language

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)


def apply_method(model: "PreTrainedModel", config: Config, vocab_resized: bool = False) -> "PreTrainedModel":
    """Mark what `config.method` trains, set up gradient checkpointing, and return the model (maybe wrapped by peft).

    `vocab_resized` says the embeddings just got new rows: they then train too, since mean-initialised rows for
    new tokens are useless until learned.
    """
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
    if count_parameters(model)[0] == 0:
        keys = (" with freeze_vision_tower, freeze_multi_modal_projector and freeze_language_model as set"
                if is_vision_language(model.config) else "")
        raise ConfigError(f"nothing left to train: `finetuning_type: {config.finetuning_type}`{keys} freezes every "
                          f"weight of {config.model_name_or_path}")
    set_trainable_dtype(model, config)
    if config.method == "lora":
        fuse_lora_layers(model)
    fuse_gated_mlps(model)
    if config.upcast_layernorm:
        upcast_layernorm(model)
    if config.upcast_lmhead_output:
        upcast_lmhead_output(model)
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


def _train_all(model: "PreTrainedModel", config: Config, vocab_resized: bool) -> "PreTrainedModel":
    """full: every weight, except the parts of a vision-language model its freeze_* keys freeze."""
    model.requires_grad_(True)
    apply_freeze_keys(model, config)
    return model


def _train_some_layers(model: "PreTrainedModel", config: Config, vocab_resized: bool) -> "PreTrainedModel":
    """freeze: train the last N decoder layers of the language model (first |N| when negative; with
    `use_llama_pro`, N blocks spread evenly), optionally only some of their modules."""
    n_layers = num_layers(model)
    chosen = trainable_layer_ids(config, n_layers)
    in_layer = layer_pattern(decoder_layers_prefix(model, n_layers))
    inside = [] if "all" in config.freeze_trainable_modules else config.freeze_trainable_modules
    extra = list(config.freeze_extra_modules or [])
    if vocab_resized:
        extra += [name for name in embedding_names(model) if name not in extra]
        logger.info("the vocab was resized: %s train too", ", ".join(extra))

    model.requires_grad_(False)
    in_layer_names: set[str] = set()
    outside_names: set[str] = set()
    matched: set[str] = set()
    # remove_duplicate=False shows a tied weight under both names, so `lm_head` finds a head tied to the embeddings.
    for name, param in model.named_parameters(remove_duplicate=False):
        layer = in_layer.fullmatch(name)
        if layer:
            in_layer_names.update(layer[2].split(".")[:-1])
        else:
            outside_names.update(name.split(".")[:-1])
        if layer and int(layer[1]) in chosen:
            hits = [m for m in inside if names_module(layer[2], m)]
            matched.update(hits)
            if hits or not inside:
                param.requires_grad_(True)
        hits = [m for m in extra if names_module(name, m)]
        if hits:
            matched.update(hits)
            param.requires_grad_(True)

    for key, names, available in (("freeze_trainable_modules", inside, in_layer_names),
                                  ("freeze_extra_modules", extra, outside_names)):
        missing = [m for m in names if m not in matched]
        if missing:
            raise ConfigError(f"`{key}`: {', '.join(missing)} matches no module; modules there: "
                              f"{', '.join(sorted(n for n in available if not n.isdigit()))}")
    logger.info("freeze: training layers %s of %d%s", chosen, n_layers,
                f" (modules: {', '.join(inside)})" if inside else "")
    # The layers above are the language model's (layers.py skips the vision tower's blocks); a vision-language
    # model's tower and projector then train or not as their keys say.
    apply_freeze_keys(model, config)
    return model


#: config.method -> the function that marks what trains.
METHODS: dict[str, Callable[["PreTrainedModel", Config, bool], "PreTrainedModel"]] = {
    "full": _train_all,
    "freeze": _train_some_layers,
    "lora": add_adapter,
    "oft": add_adapter,
}


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
