"""LLaMA Pro's block expansion: insert copies of decoder blocks that change nothing, to be trained on new knowledge.

    tunelab expand MODEL OUTPUT_DIR --num_expand N
    expand_blocks("meta-llama/Meta-Llama-3-8B-Instruct", "models/llama3-8b-pro", num_expand=8)

With L layers and N new blocks, a copy of every (L/N)-th block is inserted right after it. A block adds its attention
and MLP outputs to the residual stream through their output projections (o_proj, down_proj); the copies get those
zeroed, so each copy adds exactly 0 and the expanded model computes what the original did (checked on a probe
before saving). Training it with `use_llama_pro: true` and `freeze_trainable_layers: N` (freeze or lora) then trains
only the copies: with L + N layers, the last of every (L + N) / N, which is where the copies sit.
"""

import copy
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from tunelab.config import Config, ConfigError
from tunelab.model.layers import decoder_layers_prefix, num_layers
from tunelab.model.loader import forget_gguf_origin, hub_kwargs, resolve_source

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

#: Names of the projections through which a block writes to the residual stream (llama/qwen/mistral/gemma, phi,
#: gpt2, MoE experts): zeroing them in a copy makes it an identity. An architecture that writes through anything else
#: fails the probe check instead of being saved wrong.
OUTPUT_PROJECTIONS = {"o_proj", "down_proj", "out_proj", "dense", "fc2", "c_proj"}


def expand_blocks(model_name_or_path: str, output_dir: str | Path, num_expand: int, *, trust_remote_code: bool = False,
                  max_shard_size: str = "5GB") -> Path:
    """Save `model_name_or_path` with `num_expand` identity blocks inserted evenly, and its tokenizer, to
    `output_dir`; return that folder. The weights keep the checkpoint's dtype."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output = Path(output_dir).expanduser()
    if output.exists() and any(output.iterdir()):
        raise ConfigError(f"expand: the output folder {output} is not empty; choose a new or empty folder")
    config = Config(model_name_or_path=model_name_or_path, trust_remote_code=trust_remote_code)
    source = resolve_source(config)
    tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file, **hub_kwargs(config))
    model = AutoModelForCausalLM.from_pretrained(source.path, gguf_file=source.gguf_file, dtype="auto",
                                                 **hub_kwargs(config)).eval()
    if source.gguf_file:
        forget_gguf_origin(model)
    n_layers = num_layers(model)
    if num_expand <= 0 or n_layers % num_expand:
        raise ConfigError(f"expand: --num_expand must divide the model's {n_layers} layers evenly (LLaMA Pro inserts "
                          f"one block after every L/N), not {num_expand}")

    probe = torch.arange(min(16, model.config.get_text_config().vocab_size)).unsqueeze(0)
    with torch.no_grad():
        before = model(probe, use_cache=False).logits
    insert_identity_blocks(model, num_expand)
    with torch.no_grad():
        after = model(probe, use_cache=False).logits
    if not torch.allclose(before, after, rtol=0, atol=1e-5):
        raise ConfigError(f"expand: {type(model).__name__}'s blocks write to the residual stream through other layers "
                          f"than {', '.join(sorted(OUTPUT_PROJECTIONS))}, so tunelab cannot make the copies identities "
                          f"(largest logit change {(before - after).abs().max():.3g}); this architecture cannot be "
                          f"expanded")

    model.save_pretrained(output, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(output)
    logger.info("expanded %s from %d to %d layers into %s; train it with `use_llama_pro: true` and "
                "`freeze_trainable_layers: %d`", model_name_or_path, n_layers, n_layers + num_expand, output,
                num_expand)
    return output


def insert_identity_blocks(model: "PreTrainedModel", num_expand: int) -> None:
    """In place: after every (L / num_expand)-th decoder block, a copy of it whose output projections are zero."""
    from torch import nn

    text_config = model.config.get_text_config()
    n_layers = num_layers(model)
    prefix = decoder_layers_prefix(model, n_layers)
    _refuse_other_per_layer_settings(text_config, n_layers)
    stride = n_layers // num_expand
    blocks: list[nn.Module] = []
    layer_types = getattr(text_config, "layer_types", None)
    new_types = []
    for index, block in enumerate(model.get_submodule(prefix)):
        blocks.append(block)
        new_types.append(layer_types[index] if layer_types else None)
        if (index + 1) % stride == 0:
            blocks.append(_identity_copy(block))
            new_types.append(layer_types[index] if layer_types else None)
    for index, block in enumerate(blocks):
        # Attention modules know their index (for the KV cache and per-layer settings); renumber them.
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = index
    parent, _, name = prefix.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, nn.ModuleList(blocks))
    text_config.num_hidden_layers = len(blocks)
    if layer_types:
        text_config.layer_types = new_types


def _identity_copy(block: "torch.nn.Module") -> "torch.nn.Module":
    import torch

    clone = copy.deepcopy(block)
    zeroed = 0
    with torch.no_grad():
        for name, param in clone.named_parameters():
            if OUTPUT_PROJECTIONS.intersection(name.split(".")):
                param.zero_()
                zeroed += 1
    if not zeroed:
        raise ConfigError(f"expand: {type(block).__name__} has none of the output projections "
                          f"{', '.join(sorted(OUTPUT_PROJECTIONS))}; this architecture cannot be expanded")
    return clone


def _refuse_other_per_layer_settings(text_config: object, n_layers: int) -> None:
    """A config list with one entry per layer (other than layer_types, which is extended) would no longer line up
    with the layers after the expansion, and tunelab cannot tell what the copies' entries should be."""
    for key, value in vars(text_config).items():
        if key != "layer_types" and isinstance(value, (list, tuple)) and len(value) == n_layers and n_layers > 1:
            raise ConfigError(f"expand: the model config's `{key}` has one entry per layer; tunelab cannot tell what "
                              f"the inserted blocks' entries should be, so this model cannot be expanded")
