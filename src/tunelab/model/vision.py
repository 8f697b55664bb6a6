"""Vision-language models: which modules are the vision tower and the projector, and what the three freeze_* keys
leave to train under each method.

    is_vision_language(model.config)            # the config has a vision part: load with AutoModelForImageTextToText
    apply_freeze_keys(model, config)            # full / freeze: the keys' parts on or off, after the method's choice
    adapter_leaves_alone(name, family, config)  # lora / oft: a linear layer the adapter must not touch

A vision-language model has three parts: the vision tower (turns image patches into features), the projector
(maps those features into the language model's width) and the language model (everything else, the head included).
Which modules are the tower and the projector is a column of the data layer's family table (`VisionFamily`).
The keys mean what LLaMA-Factory's `model_utils/visual.py` and `adapter.py` make them mean:

- full: every part the keys do not freeze (by default the language model only);
- freeze: the chosen decoder layers of the language model (none with `freeze_language_model: true`), plus the
  projector and the tower when their keys are false;
- lora, oft: adapters on the language model's linear layers (none with `freeze_language_model: true`) and, with
  `freeze_vision_tower: false`, on the tower's; the projector never gets an adapter.

Two choices differ from LLaMA-Factory, where its behaviour is a side effect rather than a meaning:
`freeze` with `freeze_vision_tower: false` trains the whole tower (LLaMA-Factory trains the tower blocks whose index
happens to equal a chosen decoder layer's, by substring match); `lora` with `freeze_multi_modal_projector: false`
trains the projector in full beside the adapter (LLaMA-Factory silently trains nothing there).
"""

import logging
from typing import TYPE_CHECKING, Any

from tunelab.config import Config, ConfigError
from tunelab.model.layers import names_module

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from tunelab.data.media.families import VisionFamily

logger = logging.getLogger(__name__)

TOWER, PROJECTOR, LANGUAGE = "vision tower", "projector", "language model"

def is_vision_language(model_config: Any) -> bool:
    """Whether a transformers config describes a model that reads images (it has a vision sub-config)."""
    return getattr(model_config, "vision_config", None) is not None

def vision_family(model: "PreTrainedModel") -> "VisionFamily | None":
    """The model's family row (data/media/families.py), which names its tower and projector modules; None for a
    text-only model. Refuses a vision-language family tunelab does not know, since training it would mean guessing
    which weights the freeze keys protect."""
    # Imported here: the data layer's package is slower to import than this module's callers need.
    from tunelab.data.media.families import VISION_FAMILIES, family_for

    if not is_vision_language(model.config):
        return None
    family = family_for(model.config.model_type)
    if family is None:
        raise ConfigError(f"`model_name_or_path`: {type(model).__name__} ({model.config.model_type}) is a "
                          f"vision-language model tunelab cannot train yet; supported: {', '.join(VISION_FAMILIES)}")
    return family

def part_of(name: str, family: "VisionFamily") -> str:
    """TOWER, PROJECTOR or LANGUAGE for a parameter or module name (peft's prefixes do not matter). Whatever is
    neither tower nor projector is the language model's: its layers, embeddings, norm and head."""
    if any(names_module(name, module) for module in family.vision_tower):
        return TOWER
    if any(names_module(name, module) for module in family.projector):
        return PROJECTOR
    return LANGUAGE

def apply_freeze_keys(model: "PreTrainedModel", config: Config) -> None:
    """full and freeze: after the method marked what trains, switch the tower and projector on or off as the keys
    say, and the whole language model off with `freeze_language_model`."""
    family = vision_family(model)
    if family is None:
        warn_if_keys_unused(config)
        return
    for name, param in model.named_parameters():
        part = part_of(name, family)
        if part == TOWER:
            param.requires_grad_(not config.freeze_vision_tower)
        elif part == PROJECTOR:
            param.requires_grad_(not config.freeze_multi_modal_projector)
        elif config.freeze_language_model:
            param.requires_grad_(False)
    log_frozen_parts(config)

def adapter_leaves_alone(name: str, family: "VisionFamily", config: Config) -> bool:
    """lora / oft: whether the linear layer `name` stays without an adapter. The projector never gets one (it
    trains in full instead when unfrozen: `projector_to_train`)."""
    part = part_of(name, family)
    if part == TOWER:
        return config.freeze_vision_tower
    if part == PROJECTOR:
        return True
    return config.freeze_language_model

def projector_to_train(model: "PreTrainedModel", config: Config) -> list[str]:
    """lora / oft: the projector's full module names, to train in full beside the adapter (peft's
    modules_to_save), when `freeze_multi_modal_projector: false`; else none."""
    family = vision_family(model)
    if family is None or config.freeze_multi_modal_projector:
        return []
    return [name for name, _ in model.named_modules()
            if any(name == module or name.endswith(f".{module}") for module in family.projector)]

def warn_if_keys_unused(config: Config) -> None:
    """A text-only model has no tower or projector: say so when the keys ask for something other than the default."""
    changed = [f"{key}: {str(getattr(config, key)).lower()}" for key, default in
               (("freeze_vision_tower", True), ("freeze_multi_modal_projector", True),
                ("freeze_language_model", False)) if getattr(config, key) != default]
    if changed:
        logger.warning("%s: %s has no vision part, so these keys change nothing; every part trains as "
                       "`finetuning_type: %s` says", ", ".join(changed), config.model_name_or_path,
                       config.finetuning_type)

def log_frozen_parts(config: Config) -> None:
    state = {TOWER: config.freeze_vision_tower, PROJECTOR: config.freeze_multi_modal_projector,
             LANGUAGE: config.freeze_language_model}
    logger.info("vision-language model: %s frozen by the freeze_* keys",
                ", ".join(part for part, frozen in state.items() if frozen) or "no part")
