"""The cache of tokenized datasets: a key over everything that changes the tokens, and atomic saves.

    key = cache_key(config, kind=..., packing=..., specs=..., tokenizer=..., template=...)
    folder = cache_folder(config, key)            # {root}/{digest of key}
    saved = load_saved(folder)                    # SavedSplits, or None when nothing (complete) is there
    save_splits(folder, train, evaluation, meta)  # written to a temporary folder, then renamed into place

The key is a JSON document, stored beside the data as `key.json` so a person can see why two runs did or did not
share an entry. It holds:

* each data file: its resolved path, size and SHA-256 of its content. Files above `FULL_HASH_LIMIT` (256 MiB, about
  0.2 s of hashing here) are fingerprinted by size, modification time and the SHA-256 of their first and last MiB
  instead: an edit that keeps the size and the modification time of such a file goes unnoticed (`overwrite_cache`).
  A small file's modification time is left out on purpose: the content decides, so a `touch` or a fresh checkout
  does not re-tokenize. Hub datasets are keyed by repository, subset, split and folder (their content is not read).
* each dataset's resolved dataset_info.json entry (format, columns, tags, num_samples, ...);
* the tokenizer: a hash of its full serialization (vocabulary, merges, added tokens, normalizer, ...), its class and
  special tokens, and the ids of a probe text (which shows bos/eos insertion);
* the template: its class, every field of its definition and its Jinja text;
* the config keys that change tokens or rows (`TOKEN_KEYS`), the data kind and the resolved packing;
* with a vision-language model, its media processor: the family, the image processor's settings and the size limits
  (`image_max_pixels`, ...). The image and video files themselves are not hashed (a dataset may hold thousands):
  the collator checks every batch's token counts against its files, and names a file that changed;
* the source of every module of `tunelab.data` (its sub-packages included), tunelab's version and those of
  transformers and tokenizers, so new processing or tokenization code never reads old tokens.

Where: `cache_dir/tunelab/datasets` when `cache_dir` is set, else `$TUNELAB_CACHE/datasets`, else
`~/.cache/tunelab/datasets`. One entry per key; `overwrite_cache` replaces it. Entries are never removed by tunelab:
delete the folder to reclaim the space (a `.*.tmp` folder there is what a killed run was writing). A save that does
not fit on the disk is refused with the space it needs (`disk.room_for`, which checkpoints and exports use too).
"""

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import tunelab
from tunelab.data.disk import room_for

#: Config keys that change which rows there are or their tokens. The processors read cutoff_len, train_on_prompt and
#: mask_history; the rest choose, convert, mix, split and pack the rows. Batch size and workers are in because pt
#: chunking and packing work within a `datasets.map` batch (and workers split the data into contiguous shards).
TOKEN_KEYS = ("dataset", "eval_dataset", "cutoff_len", "train_on_prompt", "mask_history", "default_system",
              "enable_thinking", "tool_format", "max_samples", "val_size", "seed", "strict_data", "mix_strategy",
              "interleave_probs", "neat_packing", "preprocessing_batch_size", "preprocessing_num_workers", "stage")
FULL_HASH_LIMIT = 256 * 2**20
EDGE_BYTES = 2**20
META_FILE = "tunelab_meta.json"   # beside the datasets: what made them (kind, reports)
KEY_FILE = "key.json"


def cache_root(config: Any) -> Path:
    """The folder holding one sub-folder per cache key."""
    if config.cache_dir:
        return Path(config.cache_dir).expanduser() / "tunelab" / "datasets"
    return Path(os.environ.get("TUNELAB_CACHE") or Path.home() / ".cache" / "tunelab").expanduser() / "datasets"


def cache_key(config: Any, *, kind: str, packing: bool, specs: dict[str, list], tokenizer: Any,
              template: Any, media: Any = None) -> dict[str, Any]:
    """Everything that changes the tokenized data of this config (see the module docstring), as a JSON document.

    `specs` maps each split ("train", "eval") to its resolved `DatasetSpec`s; `media` is a vision-language model's
    `MediaProcessor` (None for a text model, whose key has no media entry).
    """
    key = {
        "config": {key: getattr(config, key) for key in TOKEN_KEYS},
        "kind": kind,
        "packing": packing,
        "datasets": {split: [_dataset_fingerprint(spec) for spec in group] for split, group in specs.items()},
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "template": template_fingerprint(template),
        "code": code_fingerprint(),
    }
    if media is not None:
        key["media"] = media.fingerprint()
    return key


def cache_folder(config: Any, key: dict[str, Any]) -> Path:
    return cache_root(config) / digest(key)


def digest(document: Any) -> str:
    """A short stable hash of a JSON-able document (other values, such as paths, as their text)."""
    text = json.dumps(document, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


def file_fingerprint(path: Path) -> dict[str, Any]:
    """Path, size and content hash of a data file (size, mtime and edge hashes for huge files)."""
    stat = path.stat()
    found = {"path": str(path.resolve()), "size": stat.st_size}
    with path.open("rb") as handle:
        if stat.st_size <= FULL_HASH_LIMIT:
            return {**found, "sha256": hashlib.file_digest(handle, "sha256").hexdigest()}
        edges = hashlib.sha256(handle.read(EDGE_BYTES))
        handle.seek(-EDGE_BYTES, os.SEEK_END)
        edges.update(handle.read(EDGE_BYTES))
    return {**found, "mtime_ns": stat.st_mtime_ns, "edges_sha256": edges.hexdigest()}


def _dataset_fingerprint(spec: Any) -> dict[str, Any]:
    return {"entry": asdict(spec), "files": [file_fingerprint(f) for f in spec.files()]}


def tokenizer_fingerprint(tokenizer: Any) -> dict[str, Any]:
    """What makes a tokenizer produce the ids it does."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        serialized = backend.to_str()
    else:  # a tokenizer without a `tokenizers` backend (sentencepiece, tiktoken): its vocabulary
        serialized = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return {
        "class": type(tokenizer).__qualname__,
        "serialized_sha256": hashlib.sha256(serialized.encode("utf-8")).hexdigest(),
        "special_tokens": {name: str(value) for name, value in sorted(tokenizer.special_tokens_map.items())},
        "probe": tokenizer("Probe text, 123.")["input_ids"],
    }


def template_fingerprint(template: Any) -> dict[str, Any] | None:
    """Every field of a template's definition and its Jinja text (None for stage pt, which uses no template)."""
    if template is None:
        return None
    return {"class": type(template).__qualname__, "fields": vars(template), "jinja": template.jinja}


def code_fingerprint() -> dict[str, str]:
    """Versions and a hash of the data layer's source: changed processing or tokenization never reads old tokens."""
    sha = hashlib.sha256()
    root = Path(__file__).parent
    for module in sorted(root.rglob("*.py")):
        sha.update(str(module.relative_to(root)).encode() + b"\0" + module.read_bytes())
    return {"tunelab": tunelab.__version__, "transformers": version("transformers"),
            "tokenizers": version("tokenizers"), "data_layer_sha256": sha.hexdigest()}


@dataclass
class SavedSplits:
    """Tokenized sets read back from disk, with the metadata saved beside them (empty for foreign folders)."""

    train: Any = None
    eval: Any = None
    meta: dict[str, Any] = field(default_factory=dict)


def save_splits(folder: Path, train: Any, evaluation: Any, meta: dict[str, Any],
                key: dict[str, Any] | None = None) -> None:
    """Save the sets as a `DatasetDict` ("train", "validation": LLaMA-Factory's layout) plus `meta`, atomically.

    Everything is written to a temporary sibling folder that is renamed into place only when complete, so a killed
    run leaves either no entry or a whole one. An existing folder (overwrite_cache) is replaced the same way.
    """
    from datasets import DatasetDict

    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.parent / f".{folder.name}.{uuid.uuid4().hex}.tmp"
    parts = {name: data for name, data in (("train", train), ("validation", evaluation)) if data is not None}
    needed = sum(data.data.nbytes for data in parts.values())
    then = "Free some space, or set `cache_dir` to a folder with more room, and run again."
    with room_for(folder.parent, "the tokenized data", needed, then):
        try:
            DatasetDict(parts).save_to_disk(str(staging))
            (staging / META_FILE).write_text(json.dumps(meta, ensure_ascii=False, indent=1))
            if key is not None:
                (staging / KEY_FILE).write_text(json.dumps(key, ensure_ascii=False, indent=1, default=str))
            if folder.exists():
                retired = folder.parent / f".{folder.name}.{uuid.uuid4().hex}.old"
                folder.rename(retired)
                shutil.rmtree(retired, ignore_errors=True)
            staging.rename(folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def load_saved(folder: Path) -> SavedSplits | None:
    """The sets saved in `folder` (by tunelab, or by LLaMA-Factory's `tokenized_path`), or None when it holds none."""
    from datasets import DatasetDict, load_from_disk

    # save_to_disk writes dataset_dict.json for a DatasetDict and state.json for a single Dataset.
    if not (folder / "dataset_dict.json").is_file() and not (folder / "state.json").is_file():
        return None
    saved = load_from_disk(str(folder))
    meta_path = folder / META_FILE
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    if isinstance(saved, DatasetDict):
        return SavedSplits(train=saved.get("train"), eval=saved.get("validation"), meta=meta)
    return SavedSplits(train=saved, meta=meta)
