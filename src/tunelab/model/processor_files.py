"""The image and video processor files of a vision-language model, carried into every folder tunelab writes.

    copy_processor_files(config, output_dir)    # after a run saved its tokenizer; also an export, a checkpoint

A vision-language model folder needs more than the tokenizer: `preprocessor_config.json` says how images become
patches (patch size, pixel limits, normalisation), and the data side reads it with
`Qwen2VLImageProcessorPil.from_pretrained(folder)`. The tokenizer's `save_pretrained` does not write it, so without
this copy a run's output_dir, or an export, could not serve as a model folder again.

The chat template is deliberately not among the files: the run's tokenizer saves its own (`chat_template.jinja`, the
template it was trained with), and a copied legacy `chat_template.json` would take precedence over it in
transformers' processors, so a processor and a tokenizer loaded from the same folder would format prompts
differently.
"""

import logging
import shutil
from pathlib import Path

from tunelab.config import Config
from tunelab.model.loader import resolve_source

logger = logging.getLogger(__name__)

#: The processor files of a model folder (the video one and the combined processor config exist for some models).
PROCESSOR_FILES = ("preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json")


def copy_processor_files(config: Config, folder: str | Path) -> list[str]:
    """Copy the processor files of the model `config` names into `folder`; return the names copied (none for a
    text-only model). They come from the last adapter folder when it holds them (an earlier run's output_dir),
    else from the base model (a local folder, or the hub)."""
    found = {}
    for name in PROCESSOR_FILES:
        path = _find(config, name)
        if path is not None:
            found[name] = path
    target = Path(folder)
    for name, path in found.items():
        if path.resolve() != (target / name).resolve():
            shutil.copyfile(path, target / name)
    if found:
        logger.info("copied %s to %s", ", ".join(found), target)
    return sorted(found)


def _find(config: Config, name: str) -> Path | None:
    """Where the file `name` of the model is: the last adapter folder, else the base model's folder or hub repo."""
    adapters = config.adapter_name_or_path or []
    if adapters and Path(adapters[-1], name).is_file():
        return Path(adapters[-1], name)
    source = resolve_source(config)
    if source.is_local:
        path = Path(source.path, name)
        return path if path.is_file() else None
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(source.path, name, revision=config.model_revision, cache_dir=config.cache_dir,
                                    token=config.hf_hub_token))
    # Every hub error is an OSError: most often the repository simply has no such file (a text-only model).
    except OSError as err:
        logger.debug("no %s for %s: %s", name, source.path, err)
        return None
