"""Frozen companions of the trained policy: the reference model (dpo, kto, ppo, grpo) and a full reward model (ppo,
grpo with `reward_model_type: full`).

    reference = load_reference_model(config, tokenizer)   # None: use the policy with its adapter switched off
    scorer = load_full_reward_model(config, tokenizer)     # ValueHeadModel in eval mode, its head loaded
"""

import logging
from dataclasses import replace
from typing import TYPE_CHECKING

from tunelab.config import Config, ConfigError
from tunelab.model.loader import load_model
from tunelab.model.value_head import ValueHeadModel, has_value_head

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


def adapter_off_is_reference(config: Config) -> bool:
    """Whether the policy with its adapter disabled equals the starting policy, so no second copy is needed.

    True for a fresh LoRA or OFT adapter. A continued adapter (`adapter_name_or_path` without `create_new_adapter`)
    starts from its trained weights, so switching it off would compare against the wrong model. (PiSSA moves part of
    the weights into its adapter, so it is refused with a reference model: `config/rules.py`.)
    """
    return config.uses_adapter and (not config.adapter_name_or_path or config.create_new_adapter)


def load_reference_model(config: Config, tokenizer: "PreTrainedTokenizerBase") -> "PreTrainedModel | None":
    """The frozen model the policy is kept close to, or None when the policy with its adapter off serves as one."""
    if config.ref_model is not None:
        logger.info("reference model: %s", config.ref_model)
        ref_config = replace(config, model_name_or_path=config.ref_model,
                             adapter_name_or_path=config.ref_model_adapters,
                             quantization_bit=config.ref_model_quantization_bit, finetuning_type="lora")
        return load_model(ref_config, tokenizer, trainable=False)
    if adapter_off_is_reference(config):
        logger.info("reference model: the policy with its %s adapter disabled (no second copy in memory)",
                    config.method.upper())
        return None
    logger.info("reference model: a frozen copy of the starting policy")
    # config.method is the finetuning_type with qlora read as lora (the quantization_bit stays as it is).
    return load_model(replace(config, finetuning_type=config.method), tokenizer, trainable=False)


def load_full_reward_model(config: Config, tokenizer: "PreTrainedTokenizerBase") -> ValueHeadModel:
    """`reward_model_type: full`: a separate model folder saved by the rm stage (weights and value_head), frozen.

    The folder may also be a base model with the rm stage's adapter in `reward_model_adapters`; the head is then read
    from the last adapter folder.
    """
    head_folder = (config.reward_model_adapters or [config.reward_model])[-1]
    if not has_value_head(head_folder):
        raise ConfigError(f"`reward_model`: {head_folder} has no value_head.safetensors; train one with `stage: rm`")
    reward_config = replace(config, model_name_or_path=config.reward_model,
                            adapter_name_or_path=config.reward_model_adapters,
                            quantization_bit=config.reward_model_quantization_bit, finetuning_type="lora")
    scorer = ValueHeadModel(load_model(reward_config, tokenizer, trainable=False))
    scorer.load_value_head(head_folder)
    scorer.requires_grad_(False)
    return scorer.eval()
