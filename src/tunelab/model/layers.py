"""Finding the parts of a model that the methods name: its decoder layers, the layers that train, its embeddings.

    prefix = decoder_layers_prefix(model, n_layers)     # "model.layers" (llama, qwen), "transformer.h" (gpt2), ...
    trainable_layer_ids(config, n_layers)              # freeze_trainable_layers, or LLaMA Pro's spread-out blocks
"""

import re
from typing import TYPE_CHECKING

from tunelab.config import Config, ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# Module-name components of vision encoders and their projectors in multimodal models: LoRA/OFT `all` and the
# freeze layer search skip them, since tunelab trains the language model only (as LLaMA-Factory does by default).
VISION_PARTS = {"visual", "vision_tower", "vision_model", "vision_encoder", "image_encoder", "multi_modal_projector",
                "mm_projector"}


def num_layers(model: "PreTrainedModel") -> int:
    return model.config.get_text_config().num_hidden_layers


def trainable_layer_ids(config: Config, n_layers: int) -> list[int]:
    """The decoder layers `freeze_trainable_layers` N names: the last N (first |N| when negative), or with
    `use_llama_pro` N blocks spread evenly, the last of every L/N, which is where `expand_blocks` inserted its copies.
    """
    wanted = config.freeze_trainable_layers
    if config.use_llama_pro:
        if wanted <= 0:
            raise ConfigError(f"`use_llama_pro` needs a positive `freeze_trainable_layers` (the number of blocks the "
                              f"expansion added), not {wanted}")
        if n_layers % wanted:
            raise ConfigError(f"`use_llama_pro`: the model's {n_layers} layers cannot be split into "
                              f"`freeze_trainable_layers: {wanted}` equal groups; set it to the number of blocks the "
                              f"expansion added (`tunelab expand ... --num_expand N`)")
        stride = n_layers // wanted
        return list(range(stride - 1, n_layers, stride))
    if abs(wanted) > n_layers:
        raise ConfigError(f"`freeze_trainable_layers: {wanted}` asks for more layers than the model has ({n_layers})")
    return list(range(n_layers - wanted, n_layers)) if wanted > 0 else list(range(-wanted))


def decoder_layers_prefix(model: "PreTrainedModel", n_layers: int) -> str:
    """The dotted name of the decoder layer list (`model.layers`, `transformer.h`, ...), found by its length."""
    indices: dict[str, set[int]] = {}
    for name, _ in model.named_parameters():
        numbered = re.match(r"(.+?)\.(\d+)\.", name)
        if numbered and not VISION_PARTS.intersection(numbered[1].split(".")):
            indices.setdefault(numbered[1], set()).add(int(numbered[2]))
    candidates = [prefix for prefix, seen in indices.items() if seen == set(range(n_layers))]
    if len(candidates) != 1:
        raise ConfigError(f"cannot tell which module list holds the {n_layers} decoder layers of "
                          f"{type(model).__name__} (candidates: {', '.join(candidates) or 'none'})")
    return candidates[0]


def layer_pattern(prefix: str) -> "re.Pattern[str]":
    """Matches `<prefix>.<index>.<rest>` and captures the index and the rest."""
    return re.compile(rf"{re.escape(prefix)}\.(\d+)\.(.+)")


def embedding_names(model: "PreTrainedModel") -> list[str]:
    """Short names of the input embeddings and the output head, e.g. ["embed_tokens", "lm_head"]."""
    wanted = [model.get_input_embeddings(), model.get_output_embeddings()]
    return [name.rsplit(".", 1)[-1] for name, module in model.named_modules()
            if any(module is target for target in wanted)]


def names_module(full_name: str, module: str) -> bool:
    """Whether `module` (one or more dotted components) appears in `full_name` as whole components."""
    return f".{module}." in f".{full_name}."
