"""`tunelab export CONFIG`: merge the adapters into the base model and write a folder any engine serves as is.

    tunelab export examples/quickstart_export.yaml
    export_model(load_config("cfg.yaml"))          # -> the export folder

`export_dir` then holds what `from_pretrained`, vLLM, TGI and Ollama read:

* the merged weights as safetensors shards of at most `export_size` GB (with an index when there are several), in
  `infer_dtype` (auto: the base model's own dtype; a GGUF base loads as float32 and stays so);
* the tokenizer, padding left for batched generation, with the run's chat template (default_system and
  enable_thinking baked in), so a server formats prompts exactly as training did;
* for a vision-language model, the image and video processor configs (`processor_files.py`), so the folder is a
  model folder again (`AutoModelForImageTextToText` loads the weights);
* `generation_config.json` from the generation keys, ending replies at the template's stop tokens;
* an Ollama `Modelfile` whose template and stop words match (`data/template/ollama.py`);
* for `stage: rm`, `value_head.safetensors`, so the folder is a reward model `reward_model_type: full` loads;
* `tunelab_export.json`, which marks the folder as an export, so a later export may replace it.

Every mistake the config can hold is refused before any weights load. An `export_dir` holding other files is never
written to; replacing an earlier export removes only the files that export wrote. The export is written to a
temporary folder beside `export_dir` and moved into place only once complete, so a stopped or failed export leaves
the earlier one (and the user's files) as they were; one that does not fit on the disk is refused with the space it
needs. With `export_hub_model_id` the folder is pushed to the hub once it is complete.
"""

import json
import logging
import os
import shutil
import uuid
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from tunelab import __version__
from tunelab.config import Config, ConfigError
from tunelab.data import prepare_template
from tunelab.data.disk import room_for, tensor_bytes
from tunelab.data.template import modelfile
from tunelab.model.generation import generation_config
from tunelab.model.loader import hub_kwargs, load_model, load_tokenizer, resolve_source
from tunelab.model.adapters import load_adapters_for_inference
from tunelab.model.processor_files import copy_processor_files
from tunelab.model.value_head import VALUE_HEAD_FILE, has_value_head
from tunelab.model.vision import is_vision_language

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

MARKER = "tunelab_export.json"


def export_model(config: Config) -> Path:
    """Write the merged model, its tokenizer, generation config and Modelfile to `export_dir`; return that folder."""
    return _export(config, max_shard_size=f"{config.export_size}GB")


def _export(config: Config, max_shard_size: str) -> Path:
    """`export_model` with the largest shard given as transformers takes it ("5GB", "200KB")."""
    export_dir = _check(config)
    head_folder = _value_head_folder(config)
    tokenizer = load_tokenizer(config)
    template = prepare_template(config, tokenizer)
    # Batched generation appends to the end of each row, so rows are padded on the left. transformers writes to
    # tokenizer_config.json only the tokenizer's init arguments, so the side is recorded as one.
    tokenizer.padding_side = tokenizer.init_kwargs["padding_side"] = "left"
    ollama = modelfile(template, tokenizer)
    if template is not None:
        stops = template.stop_token_ids(tokenizer)
    else:
        stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    model = _merged_model(config, tokenizer)
    model.generation_config = generation_config(config, tokenizer, stops)

    earlier, kept = _earlier_export(export_dir)
    # Beside export_dir, so that it is renamed into place; inside it when export_dir is a mount point or a link, whose
    # parent may be another filesystem (and renaming a link would not replace what it points to).
    swappable = not export_dir.is_mount() and not export_dir.is_symlink()
    staging = (export_dir.parent if swappable else export_dir) / f".{export_dir.name}.{uuid.uuid4().hex}.tmp"
    then = (f"{export_dir} was not changed: free some space, or choose another `export_dir`, and export again "
            f"(an earlier export there is replaced only once the new one is complete).")
    with room_for(staging.parent, "the export", tensor_bytes(model.state_dict().values()), then):
        try:
            model.save_pretrained(staging, max_shard_size=max_shard_size)
            tokenizer.save_pretrained(staging)
            processor_files = copy_processor_files(config, staging)
            (staging / "Modelfile").write_text(ollama, encoding="utf-8")
            if head_folder is not None:
                shutil.copyfile(head_folder / VALUE_HEAD_FILE, staging / VALUE_HEAD_FILE)
            written = sorted(p.name for p in staging.iterdir())
            _write_marker(staging, config, kept=kept, files=written)
            _move_into_place(staging, export_dir, earlier, kept, swap=swappable and not kept)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    if is_vision_language(model.config) and "preprocessor_config.json" not in processor_files:
        logger.warning("%s reads images, but neither the base model nor the adapter folder has a "
                       "preprocessor_config.json to copy: add the base model's to %s before serving it",
                       type(model).__name__, export_dir)
    logger.info("exported %s to %s (%s)", type(model).__name__, export_dir, ", ".join(written))

    if config.export_hub_model_id:
        _push(config, export_dir)
    return export_dir


def _check(config: Config) -> Path:
    """The export folder, once everything the config could get wrong has been ruled out (no weights loaded yet)."""
    if not config.export_dir:
        raise ConfigError("`export_dir` is required: the folder `tunelab export` writes the merged model to")
    if config.quantization_bit is not None:
        raise ConfigError(
            "`quantization_bit`: adapters cannot be merged into a quantized base: the merged weights would be "
            "rounded to the quantized grid and lose most of what the adapter learned. Export from the float base "
            "with the same adapter: remove `quantization_bit` (and use `finetuning_type: lora` rather than qlora)")
    export_dir = Path(config.export_dir).expanduser()
    if export_dir.exists() and not export_dir.is_dir():
        raise ConfigError(f"`export_dir`: {export_dir} is a file; expected a folder")
    source = resolve_source(config)
    inputs = [("model_name_or_path", source.path)] if source.is_local else []
    inputs += [("adapter_name_or_path", path) for path in config.adapter_name_or_path or []]
    for key, path in inputs:
        if export_dir.resolve() == Path(path).expanduser().resolve():
            raise ConfigError(f"`export_dir` {export_dir} is the folder of `{key}`: the export would overwrite the "
                              f"model it reads; choose another folder")
    if export_dir.is_dir() and any(export_dir.iterdir()) and not (export_dir / MARKER).is_file():
        raise ConfigError(f"`export_dir` {export_dir} is not empty and holds no earlier tunelab export; choose an "
                          f"empty or new folder (an export never writes among other files)")
    return export_dir


def _value_head_folder(config: Config) -> Path | None:
    """For `stage: rm`, the folder whose value head the reward model keeps: the last adapter's, or the model's."""
    if config.stage != "rm":
        return None
    key = "adapter_name_or_path" if config.adapter_name_or_path else "model_name_or_path"
    folder = Path((config.adapter_name_or_path or [resolve_source(config).path])[-1])
    if not has_value_head(folder):
        raise ConfigError(f"`{key}`: `stage: rm` exports a reward model, but {folder} has no {VALUE_HEAD_FILE}; name "
                          f"the output of an rm run there")
    return folder


def _merged_model(config: Config, tokenizer: "PreTrainedTokenizerBase") -> "PreTrainedModel":
    """The base model with every adapter merged in, in the export dtype, on the device `export_device` picks.

    bf16/fp16/pure_bf16 are training switches; `infer_dtype` alone decides the export's dtype.
    """
    import torch

    dtype = getattr(torch, config.infer_dtype) if config.infer_dtype != "auto" else _own_dtype(config)
    device = "cuda" if config.export_device == "auto" and torch.cuda.is_available() else "cpu"
    base = load_model(replace(config, adapter_name_or_path=None, bf16=False, fp16=False, pure_bf16=False), tokenizer,
                      trainable=False)
    # On the CPU the base loads in float32 (loader._weights_dtype): the adapters merge at full precision and the sum
    # is rounded once, when cast to the export dtype.
    model = load_adapters_for_inference(base.to(device), config)
    logger.info("merged %d adapter(s) on %s; saving in %s", len(config.adapter_name_or_path or []), device, dtype)
    return model.to(dtype)


def _own_dtype(config: Config) -> "torch.dtype":
    """The dtype the base checkpoint is stored in (float32 when it does not say, as for GGUF files)."""
    import torch
    from transformers import AutoConfig

    source = resolve_source(config)
    model_config = AutoConfig.from_pretrained(source.path, gguf_file=source.gguf_file, **hub_kwargs(config))
    dtype = getattr(model_config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return dtype or torch.float32


def _earlier_export(export_dir: Path) -> tuple[list[str], list[str]]:
    """The names of the files an earlier export in export_dir wrote, and of the other files there, which stay."""
    marker = export_dir / MARKER
    if not marker.is_file():
        return [], []
    earlier = json.loads(marker.read_text(encoding="utf-8"))
    present = {p.name for p in export_dir.iterdir()} - {MARKER}
    # An export that stopped halfway never listed its files: everything but the files kept then is its own.
    ours = earlier["files"] if earlier.get("files") is not None else present - set(earlier.get("kept", []))
    # Names only, never paths out of the folder.
    ours = {Path(name).name for name in ours} & present
    return sorted(ours), sorted(present - ours)


def _move_into_place(staging: Path, export_dir: Path, earlier: list[str], kept: list[str], swap: bool) -> None:
    """Replace export_dir by the complete export in `staging`. With `swap` (a folder of exported files only) it is
    swapped whole, by two renames: a kill between them leaves both folders, hidden, beside it. Otherwise the files
    move in one by one, each whole, and the marker, moved last, says until then that the export is unfinished, so
    that the next export clears it."""
    if swap:
        if export_dir.exists():
            retired = export_dir.with_name(f".{export_dir.name}.{uuid.uuid4().hex}.old")
            export_dir.rename(retired)
            staging.rename(export_dir)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(export_dir)
        return
    clashes = sorted(set(kept) & {p.name for p in staging.iterdir()})
    if clashes:
        raise ConfigError(f"`export_dir` {export_dir}: the export would overwrite {', '.join(clashes)}, which it did "
                          f"not write; move them away or choose another `export_dir`")
    unfinished = staging / f"{MARKER}.unfinished"
    record = json.loads((staging / MARKER).read_text(encoding="utf-8"))
    unfinished.write_text(json.dumps({**record, "files": None}, indent=2) + "\n", encoding="utf-8")
    os.replace(unfinished, export_dir / MARKER)
    for name in earlier:
        path = export_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    for path in sorted(staging.iterdir(), key=lambda p: p.name == MARKER):
        os.replace(path, export_dir / path.name)


def _write_marker(export_dir: Path, config: Config, kept: list[str], files: list[str] | None) -> None:
    """Mark the folder as an export: `files` (None while writing) are removed by the next export, `kept` are not."""
    record = {"tunelab_version": __version__, "model_name_or_path": config.model_name_or_path,
              "adapter_name_or_path": config.adapter_name_or_path, "template": config.template,
              "stage": config.stage, "files": files, "kept": kept}
    (export_dir / MARKER).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def _push(config: Config, export_dir: Path) -> None:
    """Upload the finished folder to `export_hub_model_id` (created private when it does not exist)."""
    from huggingface_hub import HfApi

    repo_id = config.export_hub_model_id
    api = HfApi(token=config.hf_hub_token)
    try:
        api.create_repo(repo_id, private=True, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(export_dir), ignore_patterns=[MARKER])
    # The hub client raises OSError subclasses (offline mode, HTTP errors) and its HTTP library's own errors.
    except Exception as err:
        raise ConfigError(f"`export_hub_model_id`: cannot push to {repo_id}: {err}. The local export at {export_dir} "
                          f"is complete; push it later with `hf upload {repo_id} {export_dir}`") from err
    logger.info("pushed %s to the hub as %s", export_dir, repo_id)
