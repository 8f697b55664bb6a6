"""The generation keys of a config (`do_sample`, `temperature`, `max_new_tokens`, ...) as a transformers
`GenerationConfig`: the one translation every generator shares (chat, API, prediction, PPO/GRPO rollouts, and the
`generation_config.json` an export writes), so a model decodes the same wherever it runs."""

from typing import TYPE_CHECKING, Any

from tunelab.config import Config

if TYPE_CHECKING:
    from transformers import GenerationConfig, PreTrainedTokenizerBase


def generation_config(config: Config, tokenizer: "PreTrainedTokenizerBase", stop_token_ids: list[int],
                      **overrides: Any) -> "GenerationConfig":
    """The config's generation keys, with `overrides` (e.g. a request's temperature) taking precedence.

    `stop_token_ids` end a reply (the template's end of turn and the eos). Sampling keys are left out under greedy
    decoding, where transformers would only warn about them. `max_new_tokens` wins over `max_length` when both are
    set, as in LLaMA-Factory; pass `max_new_tokens=None` to bound by `max_length` instead.
    """
    from transformers import GenerationConfig

    settings: dict[str, Any] = {
        "do_sample": config.do_sample, "temperature": config.temperature, "top_p": config.top_p,
        "top_k": config.top_k, "num_beams": config.num_beams, "max_new_tokens": config.max_new_tokens,
        "max_length": config.max_length, "repetition_penalty": config.repetition_penalty,
        "length_penalty": config.length_penalty}
    settings.update(overrides)
    if settings["max_new_tokens"] is not None:
        settings.pop("max_length")
    if not settings["do_sample"]:
        for key in ("temperature", "top_p", "top_k"):
            settings.pop(key)
    if settings["num_beams"] == 1:
        settings.pop("length_penalty")
    return GenerationConfig(**settings, eos_token_id=stop_token_ids, pad_token_id=tokenizer.pad_token_id,
                            bos_token_id=tokenizer.bos_token_id)
