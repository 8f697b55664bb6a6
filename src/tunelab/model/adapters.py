"""peft adapters on a frozen base: LoRA (with PiSSA initialisation) and OFT; continuing, merging and loading them.

    model = add_adapter(model, config, vocab_resized)     # finetuning_type lora/qlora/oft: a trainable PeftModel
    model = load_adapters_for_inference(model, config)   # adapter_name_or_path merged in (any peft type)

Both methods share one path: earlier adapters are merged, then the last is continued or a fresh one is created on the
targets `lora_target` / `oft_target` name (`all`: every linear layer but the head and the vision tower; with
`use_llama_pro`, only those of the blocks LLaMA Pro trains), with `additional_target` trained in full beside it. On a
vision-language model the freeze_* keys decide which parts an adapter may touch (`vision.py`).
"""

import logging
from typing import TYPE_CHECKING

from tunelab.config import Config, ConfigError
from tunelab.model.layers import (VISION_PARTS, decoder_layers_prefix, embedding_names, layer_pattern, names_module,
                                  num_layers, trainable_layer_ids)
from tunelab.model.vision import (adapter_leaves_alone, log_frozen_parts, projector_to_train, vision_family,
                                  warn_if_keys_unused)

if TYPE_CHECKING:
    from peft import PeftConfig
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)


def add_adapter(model: "PreTrainedModel", config: Config, vocab_resized: bool) -> "PreTrainedModel":
    """lora / oft: merge earlier adapters, then continue the last one or create a fresh adapter."""
    from peft import get_peft_model

    adapters = config.adapter_name_or_path or []
    if adapters and not config.create_new_adapter:
        model = _merge_adapters(model, adapters[:-1], config)
        model = _load_adapter(model, adapters[-1], config, trainable=True)
        kind = model.peft_config["default"].peft_type.value.lower()
        if kind != config.method:
            raise ConfigError(f"`adapter_name_or_path`: {adapters[-1]} is an adapter of type {kind.upper()}, which "
                              f"`finetuning_type: {config.finetuning_type}` cannot train further; set "
                              f"`create_new_adapter: true` to merge it and train a fresh {config.method.upper()} "
                              f"adapter on top")
        if config.pissa_init:
            logger.warning("pissa_init applies to a new adapter only: %s goes on as it was initialised", adapters[-1])
        logger.info("training the adapter %s further (its own rank and targets apply)", adapters[-1])
        return model

    model = _merge_adapters(model, adapters, config)
    targets, excluded = _adapter_targets(model, config)
    modules_to_save = list(config.additional_target or []) + projector_to_train(model, config)
    if vocab_resized:
        modules_to_save += [name for name in embedding_names(model) if name not in modules_to_save]
        logger.info("the vocab was resized: %s train in full beside the adapter", ", ".join(modules_to_save))
    module_names = [name for name, _ in model.named_modules()]
    for name in modules_to_save:
        if not any(names_module(full, name) for full in module_names):
            raise ConfigError(f"`additional_target`: {name} matches no module of the model")

    build = _lora_config if config.method == "lora" else _oft_config
    return get_peft_model(model, build(config, targets, excluded, modules_to_save or None))


def load_adapters_for_inference(model: "PreTrainedModel", config: Config) -> "PreTrainedModel":
    """Apply `adapter_name_or_path` for inference: merged into the weights, or kept apart on a quantized base."""
    adapters = config.adapter_name_or_path or []
    if config.quantization_bit is not None and adapters:
        if len(adapters) > 1:
            raise ConfigError("`adapter_name_or_path`: a quantized base (quantization_bit) takes one adapter; "
                              "merge the others into a float model first")
        return _load_adapter(model, adapters[0], config, trainable=False)
    return _merge_adapters(model, adapters, config)


def pissa_init_value(config: Config) -> str:
    """peft's `init_lora_weights` for `pissa_init`: the exact SVD, or the fast randomized one with pissa_iter steps."""
    return "pissa" if config.pissa_iter == -1 else f"pissa_niter_{config.pissa_iter}"


def _lora_config(config: Config, targets: list[str], excluded: list[str] | None,
                 modules_to_save: list[str] | None) -> "PeftConfig":
    from peft import LoraConfig

    init: bool | str = True
    if config.pissa_init:
        # PiSSA starts A and B at the principal singular vectors of each weight and leaves the residual in the base,
        # so the model computes the same function at step 0 but learns along the weights' main directions.
        init = pissa_init_value(config)
        if config.use_dora and config.pissa_convert:
            raise ConfigError("`pissa_convert` cannot convert a DoRA adapter (its magnitudes are taken from the "
                              "PiSSA residual weights); remove `use_dora` or `pissa_convert`")
        if not config.pissa_convert:
            logger.warning("pissa_init without pissa_convert: the saved adapter is in PiSSA form and applies to the "
                           "PiSSA residual model only (the base minus the adapter's starting value), not to %s "
                           "itself; peft rebuilds that residual when it loads the adapter, exactly only with the "
                           "exact SVD (pissa_iter: -1). Set `pissa_convert: true` to save a plain LoRA adapter for "
                           "the original model", config.model_name_or_path)
        logger.info("PiSSA: initialising the adapter from the weights' singular vectors (%s)", init)
    return LoraConfig(
        task_type="CAUSAL_LM", r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=targets, exclude_modules=excluded, use_rslora=config.use_rslora, use_dora=config.use_dora,
        modules_to_save=modules_to_save, init_lora_weights=init,
    )


def _oft_config(config: Config, targets: list[str], excluded: list[str] | None,
                modules_to_save: list[str] | None) -> "PeftConfig":
    from peft import OFTConfig

    # peft takes exactly one of the two, r blocks of in_features / r or blocks of oft_block_size, and derives the
    # other from each layer's width; config/rules.py refuses a config with both or neither.
    return OFTConfig(task_type="CAUSAL_LM", r=config.oft_rank, oft_block_size=config.oft_block_size,
                     module_dropout=config.module_dropout, target_modules=targets, exclude_modules=excluded,
                     modules_to_save=modules_to_save)


def _adapter_targets(model: "PreTrainedModel", config: Config) -> tuple[list[str], list[str] | None]:
    """(target_modules, exclude_modules) for peft from `lora_target` or `oft_target`: `all` means every linear layer
    but the head and the parts an adapter leaves alone (the vision tower, or what the freeze_* keys say on a
    vision-language model). With `use_llama_pro`, the full names of the chosen modules inside the blocks LLaMA Pro
    trains, so the adapter touches nothing else."""
    from torch import nn

    key = "lora_target" if config.method == "lora" else "oft_target"
    requested = getattr(config, key)
    family = vision_family(model)
    if family is None:
        warn_if_keys_unused(config)
    else:
        log_frozen_parts(config)

    def left_alone(name: str) -> bool:
        if family is None:
            return bool(VISION_PARTS.intersection(name.split(".")))
        return adapter_leaves_alone(name, family, config)

    head = model.get_output_embeddings()
    module_names = [name for name, _ in model.named_modules()]
    # bitsandbytes' Linear4bit and Linear8bitLt subclass nn.Linear, so quantized models are covered too.
    allowed = [name for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and module is not head and not left_alone(name)]
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in allowed})
    if family is not None and not allowed:
        raise ConfigError(f"`{key}`: no linear layer is left for the adapter: the freeze_* keys freeze every part "
                          f"of {config.model_name_or_path} that has one")
    everything = requested == ["all"]
    if not everything:
        for target in requested:
            if not any(names_module(name, target) for name in module_names):
                raise ConfigError(f"`{key}`: {target} matches no module; the linear layers are: "
                                  f"{', '.join(suffixes)} (or use `all`)")
            if not any(names_module(name, target) for name in module_names if not left_alone(name)):
                raise ConfigError(f"`{key}`: {target} is only found in a part the freeze_* keys freeze")

    if not config.use_llama_pro:
        # Short names keep adapter_config.json readable. peft matches a short name against the end of every module
        # name, so the modules elsewhere that share one are excluded by full name: the head, a frozen tower's
        # gate_proj (Qwen2.5-VL's blocks have the language model's names), Qwen2-VL's patch embedding (a
        # convolution named `proj`, like the tower's attention output). A target named explicitly may be the head.
        if everything:
            clashes = [name for name in module_names if name.rsplit(".", 1)[-1] in suffixes and name not in allowed]
            return suffixes, clashes or None
        clashes = [name for name in module_names if left_alone(name)
                   and any(name == target or name.endswith(f".{target}") for target in requested)]
        return list(requested), clashes or None

    n_layers = num_layers(model)
    chosen = set(trainable_layer_ids(config, n_layers))
    in_layer = layer_pattern(decoder_layers_prefix(model, n_layers))
    names = []
    for name in (allowed if everything else module_names):
        found = in_layer.fullmatch(name)
        if not found or int(found[1]) not in chosen or left_alone(name):
            continue
        # peft's own rule for a listed target: the module's name is it, or ends with `.<target>`.
        if everything or any(found[2] == target or found[2].endswith(f".{target}") for target in requested):
            names.append(name)
    logger.info("LLaMA Pro: the adapter goes on layers %s only (%d modules)", sorted(chosen), len(names))
    return names, None


def _merge_adapters(model: "PreTrainedModel", paths: list[str], config: Config) -> "PreTrainedModel":
    """Load each adapter and fold it into the weights, in order (peft merges LoRA and OFT alike)."""
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
