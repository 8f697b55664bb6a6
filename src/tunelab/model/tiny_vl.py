"""Tiny random vision-language models (Qwen2-VL, Qwen2.5-VL) around a real tokenizer and image processor config.

    .venv/bin/python -c "from tunelab.model.tiny_vl import build_tiny_vl_model as b; \
        print(b('/tmp/tiny-qwen2-vl', '../shared/tokenizers/qwen2-vl-instruct', 'qwen2_vl'))"

The weights are random (seeded) and small: two decoder layers 64 wide, a two-block vision tower 32 wide. What
surrounds them is the real model's: the tokenizer, chat template and `preprocessor_config.json` are copied unchanged
from `source_dir` (a folder such as `../shared/tokenizers/qwen2.5-vl-instruct`), and the config keeps the real
architecture's token ids, patch and merge sizes and multimodal RoPE, so an image gets as many tokens as it would in
the real model. The embedding and the head (151k tokens x 64) are most of the 20M parameters; a training step on an
image takes well under a second on two CPU cores. The folder reloads offline with `AutoModelForImageTextToText`.
"""

import shutil
from pathlib import Path

#: family -> (config class, model class) names in transformers, imported when a model is built.
FAMILIES = {
    "qwen2_vl": ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration"),
    "qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration"),
}

# Files of the source folder that describe the real model's size, not its tokenizer or processor: never copied.
_NOT_COPIED = {"config.json", "model.safetensors", "model.safetensors.index.json"}

_HIDDEN, _HEADS = 64, 4
# Multimodal RoPE splits each head's rotary dimensions among time, height and width. The real models use
# [16, 24, 24] of 64 (head_dim 128); the same proportions for head_dim 16 are [2, 3, 3].
_MROPE_SECTION = [2, 3, 3]


def build_tiny_vl_model(out_dir: str | Path, source_dir: str | Path, family: str = "qwen2_vl") -> Path:
    """Save a random tiny `family` model with the tokenizer and processor files of `source_dir`; return the folder."""
    import torch
    import transformers
    from transformers import AutoTokenizer

    if family not in FAMILIES:
        raise ValueError(f"unknown tiny vision-language family {family!r}; expected one of: {', '.join(FAMILIES)}")
    source = Path(source_dir)
    if not (source / "preprocessor_config.json").is_file():
        raise FileNotFoundError(f"{source} has no preprocessor_config.json: expected a real model's tokenizer and "
                                f"processor files")
    config_name, model_name = FAMILIES[family]
    tokenizer = AutoTokenizer.from_pretrained(source)
    text = {
        "vocab_size": len(tokenizer), "hidden_size": _HIDDEN, "intermediate_size": 2 * _HIDDEN,
        "num_hidden_layers": 2, "num_attention_heads": _HEADS, "num_key_value_heads": 2,
        "max_position_embeddings": 4096, "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
        "pad_token_id": tokenizer.pad_token_id,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": _MROPE_SECTION},
        # About 1/sqrt(hidden), as in tiny.py: with the default 0.02 a 64-wide model's logits are nearly flat and
        # LoRA barely moves its loss.
        "initializer_range": 0.1,
    }
    config = getattr(transformers, config_name)(
        text_config=text, vision_config=_vision_config(family), tie_word_embeddings=False)

    out = Path(out_dir)
    # Fork the RNG so building a model does not change the caller's random stream.
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = getattr(transformers, model_name)(config)
    model.save_pretrained(out)
    for path in source.iterdir():
        if path.is_file() and path.name not in _NOT_COPIED:
            shutil.copyfile(path, out / path.name)
    return out


def _vision_config(family: str) -> dict:
    """A two-block tower with the real patch (14), temporal patch (2) and merge (2) sizes, so token counts match."""
    if family == "qwen2_vl":
        # `hidden_size` is what the merger outputs: the language model's width.
        return {"depth": 2, "embed_dim": 32, "num_heads": 2, "mlp_ratio": 2, "hidden_size": _HIDDEN}
    # Qwen2.5-VL attends within windows of 112 pixels except in the `fullatt_block_indexes` blocks: one of each.
    return {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": _HIDDEN,
            "window_size": 112, "fullatt_block_indexes": [1], "tokens_per_second": 2}
