"""Setting a model up to answer rather than to train: the tokenizer with its chat template applied, and the device.

The inference engines and `tunelab eval` share these, so a benchmark prompts the model exactly as chat does.
"""

from typing import Any

from tunelab.config import Config


def load_tokenizer_and_template(config: Config) -> tuple[Any, Any]:
    """The tokenizer and chat template to prompt with, the template applied to the tokenizer (eos, pad) as in
    training; the tokenizer comes from the last adapter folder when it holds one (with the trained template)."""
    from tunelab.data import get_template
    from tunelab.model.loader import load_tokenizer

    tokenizer = load_tokenizer(config)
    template = get_template(config, tokenizer)
    template.prepare_tokenizer(tokenizer)
    return tokenizer, template


def to_inference_device(model: Any, config: Config) -> Any:
    """The model on the GPU when there is one (a quantized model is already placed where bitsandbytes put it)."""
    import torch

    if config.quantization_bit is None and torch.cuda.is_available():
        return model.to("cuda")
    return model
