"""Which family the configured model belongs to, and its `MediaProcessor`, built without loading any weights.

    media = load_media_processor(config, tokenizer)   # None for a text-only model

The family comes from the `model_type` in the model's config.json (a local folder's file, or the hub's); the image
processor from the model's preprocessor_config.json, through the family's torchvision-free processor class. A GGUF
file or an embedded `tunelab:` model is a text-only model.
"""

import json
from pathlib import Path
from typing import Any

from tunelab.config import ConfigError
from tunelab.data.media.families import VISION_FAMILIES, family_for
from tunelab.data.media.processor import MediaLimits, MediaProcessor


def load_media_processor(config: Any, tokenizer: Any) -> MediaProcessor | None:
    """The media processor of `config.model_name_or_path` with the config's size limits, or None when the model is
    not a vision-language model of a family in `VISION_FAMILIES`."""
    family = family_for(model_type(config))
    if family is None:
        return None
    import transformers

    processor_class = getattr(transformers, family.image_processor)
    try:
        image_processor = processor_class.from_pretrained(config.model_name_or_path, **_hub_kwargs(config))
    except OSError as err:
        raise ConfigError(f"`model_name_or_path`: {config.model_name_or_path} is a {family.name} model, but its image "
                          f"processor (preprocessor_config.json) cannot be read: {err}") from err
    return MediaProcessor(family, image_processor, tokenizer, MediaLimits.from_config(config))


def model_type(config: Any) -> str | None:
    """The `model_type` of the configured model's config.json; None when it has none (or the hub cannot be reached:
    then loading the model reports why)."""
    return model_config_values(config).get("model_type")


def model_config_values(config: Any) -> dict[str, Any]:
    """The configured model's config.json as a dict; empty for a .gguf file, an embedded model, or a model whose
    config.json cannot be read (loading the model then reports why)."""
    name = str(config.model_name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        file = path / "config.json"
        return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}
    if path.exists() or name.startswith("tunelab:"):  # a .gguf file, or an embedded model: text only
        return {}
    from transformers import PretrainedConfig

    try:
        values, _ = PretrainedConfig.get_config_dict(name, **_hub_kwargs(config))
    except (OSError, ValueError):
        return {}
    return values


def not_a_vision_model(config: Any) -> str:
    """Why the configured model cannot take images or videos, for messages."""
    found = model_type(config)
    kind = f"its model_type is {found!r}" if found else "no config.json with a model_type was found for it"
    return (f"the model {config.model_name_or_path} is not a vision-language model tunelab can feed ({kind}; tunelab "
            f"feeds {', '.join(t for family in VISION_FAMILIES.values() for t in family.model_types)})")


def _hub_kwargs(config: Any) -> dict[str, Any]:
    return {"cache_dir": config.cache_dir, "revision": config.model_revision, "token": config.hf_hub_token}
