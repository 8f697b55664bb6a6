"""Read `dataset_info.json`: the table that maps dataset names to files (or hub repositories) and their format.

The schema is LLaMA-Factory's (see its `data/README.md`), so a user's existing `dataset_info.json` works as is.
This module is pure Python (json, difflib): `tunelab` validates dataset names and files with it before torch,
transformers or datasets are imported.
"""

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.config import ConfigError

FORMATTINGS = ("alpaca", "sharegpt", "openai")

#: Keys a dataset entry may hold. Hub and cloud sources are recognised so that they fail with a clear reason.
ENTRY_KEYS = {"hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name", "file_name", "formatting",
              "ranking", "subset", "split", "folder", "num_samples", "columns", "tags"}
COLUMN_KEYS = {"prompt", "query", "response", "history", "messages", "system", "tools", "images", "videos", "audios",
               "chosen", "rejected", "kto_tag"}
TAG_KEYS = {"role_tag", "content_tag", "user_tag", "assistant_tag", "observation_tag", "function_tag", "system_tag"}

#: Columns whose data tunelab cannot train on yet, and why.
UNSUPPORTED_COLUMNS = {
    "images": "multimodal (image) datasets are not supported yet",
    "videos": "multimodal (video) datasets are not supported yet",
    "audios": "multimodal (audio) datasets are not supported yet",
    "chosen": "preference datasets (chosen/rejected) need a preference stage, which tunelab does not have yet",
    "rejected": "preference datasets (chosen/rejected) need a preference stage, which tunelab does not have yet",
    "kto_tag": "KTO datasets need a KTO stage, which tunelab does not have yet",
}
UNSUPPORTED_SOURCES = {
    "ms_hub_url": "ModelScope hub datasets are not supported",
    "om_hub_url": "Modelers hub datasets are not supported",
    "script_url": "dataset loading scripts are not supported (datasets 4+ removed them)",
    "cloud_file_name": "cloud-storage datasets are not supported",
}

#: File suffixes and the `datasets` builder that reads them.
BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text",
            ".arrow": "arrow"}


class DataError(ConfigError):
    """A dataset that cannot be used; the message names the file or entry and what to change.

    A kind of ConfigError: both are the user's input, refused with a message and exit status 2, never a traceback."""


@dataclass(frozen=True)
class DatasetSpec:
    """One resolved entry of dataset_info.json."""

    name: str
    info_path: Path                      # the dataset_info.json it came from, for messages
    formatting: str = "alpaca"
    path: Path | None = None             # local file or folder
    hub_url: str | None = None           # Hugging Face hub repository
    subset: str | None = None
    split: str = "train"
    folder: str | None = None
    num_samples: int | None = None
    columns: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def where(self) -> str:
        """The file, folder or hub repository, as shown in messages."""
        return str(self.path) if self.path is not None else f"hf://{self.hub_url}"

    def files(self) -> list[Path]:
        """The data files of a local dataset: the file itself, or the readable files directly in its folder."""
        if self.path is None:
            return []
        if self.path.is_file():
            return [self.path]
        return sorted(p for p in self.path.iterdir() if p.is_file() and p.suffix in BUILDERS)


def read_dataset_info(dataset_dir: str | Path) -> tuple[Path, dict[str, Any]]:
    """Parse `{dataset_dir}/dataset_info.json`, naming the position of any syntax error."""
    path = Path(dataset_dir) / "dataset_info.json"
    if not path.is_file():
        raise DataError(f"{path}: not found (`dataset_dir` must be the folder holding dataset_info.json)")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}:{err.colno}: invalid JSON: {err.msg}") from None
    if not isinstance(info, dict):
        raise DataError(f"{path}: expected an object mapping dataset names to entries")
    return path, info


def resolve_datasets(names: list[str] | None, dataset_dir: str | Path) -> list[DatasetSpec]:
    """Look up each name in dataset_info.json and check its entry and its local file; raise DataError otherwise."""
    if not names:
        return []
    info_path, info = read_dataset_info(dataset_dir)
    problems: list[str] = []
    specs: list[DatasetSpec] = []
    for name in names:
        if name not in info:
            close = difflib.get_close_matches(name, list(info), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else \
                f"; registered: {', '.join(sorted(info)[:20])}"
            problems.append(f"{info_path}: no dataset named {name!r}{hint}")
            continue
        try:
            specs.append(_make_spec(name, info[name], info_path))
        except DataError as err:
            problems.append(str(err))
    if problems:
        raise DataError("\n".join(problems))
    return specs


def _make_spec(name: str, entry: Any, info_path: Path) -> DatasetSpec:
    where = f"{info_path}: dataset {name!r}"
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected an object with `file_name` or `hf_hub_url`")
    _check_keys(entry, ENTRY_KEYS, where, "key")
    columns = entry.get("columns") or {}
    tags = entry.get("tags") or {}
    _check_keys(columns, COLUMN_KEYS, where, "`columns` key")
    _check_keys(tags, TAG_KEYS, where, "`tags` key")
    for key, reason in UNSUPPORTED_COLUMNS.items():
        if key in columns:
            raise DataError(f"{where}: {reason} (`columns.{key}`)")
    if entry.get("ranking"):
        raise DataError(f"{where}: `ranking: true` marks a preference dataset; {UNSUPPORTED_COLUMNS['chosen']}")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in FORMATTINGS:
        raise DataError(f"{where}: `formatting: {formatting}` is not one of {', '.join(FORMATTINGS)}")
    num_samples = entry.get("num_samples")
    if num_samples is not None and (not isinstance(num_samples, int) or num_samples < 1):
        raise DataError(f"{where}: `num_samples` must be a positive integer, got {num_samples!r}")
    common = dict(name=name, info_path=info_path, formatting=formatting, num_samples=num_samples,
                  columns=dict(columns), tags=dict(tags), subset=entry.get("subset"),
                  split=entry.get("split", "train"), folder=entry.get("folder"))

    if entry.get("hf_hub_url"):
        return DatasetSpec(hub_url=entry["hf_hub_url"], **common)
    for key, reason in UNSUPPORTED_SOURCES.items():
        if entry.get(key):
            raise DataError(f"{where}: {reason} (`{key}`); download the data and point `file_name` at it")
    if not entry.get("file_name"):
        raise DataError(f"{where}: needs `file_name` (a file or folder inside {info_path.parent}) or `hf_hub_url`")
    path = info_path.parent / entry["file_name"]
    if not path.exists():
        raise DataError(f"{where}: file not found: {path}")
    spec = DatasetSpec(path=path, **common)
    files = spec.files()
    if not files:
        raise DataError(f"{where}: folder {path} holds no data file ({', '.join(BUILDERS)})")
    kinds = {BUILDERS.get(f.suffix) for f in files}
    if None in kinds:
        raise DataError(f"{where}: cannot read {path.suffix!r} files; use one of {', '.join(BUILDERS)}")
    if len(kinds) > 1:
        raise DataError(f"{where}: folder {path} mixes file types ({', '.join(sorted(kinds))}); keep one")
    if spec.split != "train":
        raise DataError(f"{where}: local files have only a `train` split, got `split: {spec.split}`")
    return spec


def _check_keys(mapping: Any, known: set[str], where: str, what: str) -> None:
    if not isinstance(mapping, dict):
        raise DataError(f"{where}: expected an object of {what}s, got {type(mapping).__name__}")
    for key in mapping:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
            hint = f" (did you mean `{close[0]}`?)" if close else f" (known: {', '.join(sorted(known))})"
            raise DataError(f"{where}: unknown {what} `{key}`{hint}")
