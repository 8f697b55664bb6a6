"""Which datasets a run names, and where and in which format they are: `dataset_info.json` entries and data files.

    specs = resolve_datasets(["alpaca_en_demo", "my/data.jsonl"], "data", stage="sft")

A name is looked up in `{dataset_dir}/dataset_info.json`, whose schema is LLaMA-Factory's (its data/README.md), so a
user's file works as is. Beyond LLaMA-Factory, a name that is not registered may be the path of a data file or folder
(relative to the working directory or to `dataset_dir`); its format is then detected from its first sample
(`spec_for_path`). Hub datasets (`hf_hub_url`, `ms_hub_url`) are read by `read_hub_dataset`.

Only the standard library is imported here: tunelab checks dataset names and files before torch, transformers or
datasets load. pyarrow (parquet and arrow files) and datasets (hubs) are imported inside the functions that read them.
"""

import csv
import difflib
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tunelab.config import ConfigError

FORMATTINGS = ("alpaca", "sharegpt", "openai")

#: Keys a dataset entry may hold. Sources tunelab cannot read are recognised so that they fail with the reason.
ENTRY_KEYS = {"hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name", "file_name", "formatting",
              "ranking", "subset", "split", "folder", "num_samples", "columns", "tags"}
COLUMN_KEYS = {"prompt", "query", "response", "history", "messages", "system", "tools", "images", "videos", "audios",
               "chosen", "rejected", "kto_tag"}
TAG_KEYS = {"role_tag", "content_tag", "user_tag", "assistant_tag", "observation_tag", "function_tag", "system_tag"}

#: Column names a formatting reads when the entry has no `columns` object. As in LLaMA-Factory, a `columns` object
#: replaces these defaults (a column it does not name is not read), and a `tags` object replaces DEFAULT_TAGS.
DEFAULT_COLUMNS = {
    "alpaca": {"prompt": "instruction", "query": "input", "response": "output"},
    "sharegpt": {"messages": "conversations"},
    "openai": {"messages": "messages"},
}
#: Message keys and role names of the message formats when the entry has no `tags` object.
DEFAULT_TAGS = {
    "sharegpt": {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                 "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"},
    "openai": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
               "observation_tag": "tool", "function_tag": "function_call", "system_tag": "system"},
}

UNSUPPORTED_SOURCES = {
    "om_hub_url": "Modelers hub datasets are not supported",
    "script_url": "dataset loading scripts are not supported (datasets 4+ removed them)",
    "cloud_file_name": "cloud-storage datasets are not supported",
}
HUBS = {"hf": "Hugging Face hub", "ms": "ModelScope hub"}
#: Entry keys that only mean something for a hub repository.
HUB_ONLY_KEYS = ("subset", "folder")

#: File suffixes and the `datasets` builder that reads them.
BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text",
            ".arrow": "arrow"}

#: stage -> the kind of data its processing reads (the internal form of each is described in formats.py).
STAGE_KINDS = {"pt": "pt", "sft": "sft", "rm": "pairwise", "dpo": "pairwise", "orpo": "pairwise", "simpo": "pairwise",
               "kto": "kto", "ppo": "prompt", "grpo": "prompt"}
#: Dataset kinds (`DatasetSpec.kind`), as messages name them.
DATASET_KINDS = {"plain": "a dataset without `ranking` or `kto_tag`",
                 "preference": "a preference dataset (`ranking: true` with chosen and rejected columns)",
                 "kto": "a KTO dataset (a `kto_tag` column)"}
#: data kind -> the dataset kinds that provide it. Prompts can be taken from any chat dataset.
KIND_SOURCES = {"pt": ("plain",), "sft": ("plain",), "pairwise": ("preference",), "kto": ("kto",),
                "prompt": ("plain", "preference", "kto")}


class DataError(ConfigError):
    """A dataset that cannot be used; the message names the file or entry, the sample and the rule.

    A kind of ConfigError: both are the user's input, refused with a message and exit status 2, never a traceback."""


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset, resolved: a dataset_info.json entry, or a data file named directly (then `info_path` is None)."""

    name: str
    info_path: Path | None               # the dataset_info.json it came from, for messages
    formatting: str = "alpaca"
    ranking: bool = False
    path: Path | None = None             # local file or folder
    hub_url: str | None = None           # repository on the hub named by `hub`
    hub: str = "hf"
    subset: str | None = None
    split: str = "train"
    folder: str | None = None
    num_samples: int | None = None
    columns: dict[str, str] | None = None   # None: the entry has no `columns` object (DEFAULT_COLUMNS apply)
    tags: dict[str, str] | None = None      # None: no `tags` object (DEFAULT_TAGS apply)

    @property
    def where(self) -> str:
        """The file, folder or hub repository, as shown in messages."""
        return str(self.path) if self.path is not None else f"{self.hub}://{self.hub_url}"

    @property
    def kind(self) -> str:
        """plain, preference or kto (see DATASET_KINDS)."""
        return "preference" if self.ranking else "kto" if self.column("kto_tag") else "plain"

    @property
    def media_dir(self) -> Path | None:
        """Where relative image/video/audio paths start: dataset_dir, as in LLaMA-Factory, or a direct file's folder."""
        if self.info_path is not None:
            return self.info_path.parent
        if self.path is not None:
            return self.path if self.path.is_dir() else self.path.parent
        return None

    def column(self, key: str) -> str | None:
        """The column holding `key` (a `columns` key), or None when the dataset has none."""
        return (self.columns if self.columns is not None else DEFAULT_COLUMNS[self.formatting]).get(key)

    def tag(self, key: str) -> str | None:
        """A message key or role name (a `tags` key) of a message formatting, or None when the dataset has none."""
        return (self.tags if self.tags is not None else DEFAULT_TAGS[self.formatting]).get(key)

    def files(self) -> list[Path]:
        """The data files of a local dataset: the file itself, or the readable files directly in its folder."""
        if self.path is None:
            return []
        if self.path.is_file():
            return [self.path]
        return sorted(p for p in self.path.iterdir() if p.is_file() and p.suffix.lower() in BUILDERS)

    def builder(self) -> str:
        """The `datasets` builder that reads this dataset's files (json, csv, parquet, text, arrow)."""
        return BUILDERS[self.files()[0].suffix.lower()]


def read_dataset_info(dataset_dir: str | Path) -> tuple[Path, dict[str, Any]]:
    """Parse `{dataset_dir}/dataset_info.json`, naming the position of any syntax error."""
    path = Path(dataset_dir) / "dataset_info.json"
    if not path.is_file():
        raise DataError(f"{path}: not found (`dataset_dir` must be the folder holding dataset_info.json)")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise json_error(path, err) from None
    if not isinstance(info, dict):
        raise DataError(f"{path}: expected an object mapping dataset names to entries")
    return path, info


def resolve_datasets(names: list[str] | None, dataset_dir: str | Path, stage: str | None = None) -> list[DatasetSpec]:
    """A spec per name: its dataset_info.json entry, or the data file it names. With `stage`, each dataset must be
    of a kind the stage trains on. Every problem found is raised at once, as one DataError."""
    if not names:
        return []
    info_path = Path(dataset_dir) / "dataset_info.json"
    # Needed only for names that are not paths; then a missing file is one of the problems reported.
    info = read_dataset_info(dataset_dir)[1] if info_path.is_file() else {}
    problems: list[str] = []
    specs: list[DatasetSpec] = []
    for name in names:
        try:
            spec = _spec_for_name(name, info, info_path, Path(dataset_dir))
            if stage is not None:
                check_stage(spec, stage)
            specs.append(spec)
        except DataError as err:
            problems.append(str(err))
    if problems:
        raise DataError("\n".join(dict.fromkeys(problems)))  # an unknown stage is one problem, not one per name
    return specs


def check_stage(spec: DatasetSpec, stage: str) -> None:
    """Refuse a dataset whose kind the stage cannot train on (a preference dataset for sft, ...)."""
    if stage not in STAGE_KINDS:
        raise DataError(f"stage {stage!r} has no data format; expected one of {', '.join(STAGE_KINDS)}")
    accepted = KIND_SOURCES[STAGE_KINDS[stage]]
    if spec.kind not in accepted:
        wanted = " or ".join(DATASET_KINDS[kind] for kind in accepted)
        raise DataError(f"dataset {spec.name!r} ({spec.where}) is {DATASET_KINDS[spec.kind]}; stage {stage} "
                        f"trains on {wanted}")


def _spec_for_name(name: str, info: dict[str, Any], info_path: Path, dataset_dir: Path) -> DatasetSpec:
    if name in info:
        return _make_spec(name, info[name], info_path)
    for candidate in (Path(name), dataset_dir / name):
        if candidate.exists():
            return spec_for_path(candidate, name=name)
    if not info_path.is_file():
        raise DataError(f"dataset {name!r}: not a file or folder, and there is no {info_path} to look it up in "
                        f"(`dataset_dir` must be the folder holding dataset_info.json)")
    close = difflib.get_close_matches(name, list(info), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else \
        f"; registered: {', '.join(sorted(info)[:20])}"
    raise DataError(f"{info_path}: no dataset named {name!r} (and no such file){hint}")


def _make_spec(name: str, entry: Any, info_path: Path) -> DatasetSpec:
    where = f"{info_path}: dataset {name!r}"
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected an object with `file_name` or `hf_hub_url`")
    _check_keys(entry, ENTRY_KEYS, where, "key")
    columns, tags = entry.get("columns"), entry.get("tags")
    _check_keys({} if columns is None else columns, COLUMN_KEYS, where, "`columns` key")
    _check_keys({} if tags is None else tags, TAG_KEYS, where, "`tags` key")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in FORMATTINGS:
        raise DataError(f"{where}: `formatting: {formatting}` is not one of {', '.join(FORMATTINGS)}")
    ranking = entry.get("ranking", False)
    if not isinstance(ranking, bool):
        raise DataError(f"{where}: `ranking` must be true or false, got {ranking!r}")
    if ranking and not {"chosen", "rejected"} <= set(columns or {}):
        raise DataError(f"{where}: `ranking: true` needs `columns.chosen` and `columns.rejected` (the better and "
                        f"the worse reply)")
    if tags is not None and formatting != "alpaca" and not {"role_tag", "content_tag"} <= set(tags):
        raise DataError(f"{where}: `tags` needs `role_tag` and `content_tag` (a `tags` object replaces the default "
                        f"tags, as in LLaMA-Factory)")
    num_samples = entry.get("num_samples")
    if num_samples is not None and (not isinstance(num_samples, int) or num_samples < 1):
        raise DataError(f"{where}: `num_samples` must be a positive integer, got {num_samples!r}")
    common = dict(name=name, info_path=info_path, formatting=formatting, ranking=ranking, num_samples=num_samples,
                  columns=columns, tags=tags, subset=entry.get("subset"),
                  split=entry.get("split", "train"), folder=entry.get("folder"))

    hub = _pick_hub(entry)
    if hub is not None:
        return DatasetSpec(hub=hub, hub_url=entry[f"{hub}_hub_url"], **common)
    if not entry.get("file_name"):
        for key, reason in UNSUPPORTED_SOURCES.items():
            if entry.get(key):
                raise DataError(f"{where}: {reason} (`{key}`); download the data and point `file_name` at it")
        raise DataError(f"{where}: needs `file_name` (a file or folder inside {info_path.parent}) or `hf_hub_url`")
    for key in HUB_ONLY_KEYS:
        if entry.get(key):
            raise DataError(f"{where}: `{key}` applies to hub datasets; a local file has none")
    if common["split"] != "train":
        raise DataError(f"{where}: local files have only a `train` split, got `split: {common['split']}`")
    spec = DatasetSpec(path=info_path.parent / entry["file_name"], **common)
    _check_files(spec, where)
    return spec


def _pick_hub(entry: dict[str, Any]) -> str | None:
    """LLaMA-Factory's choice: ModelScope when USE_MODELSCOPE_HUB is set or it is the only hub, else Hugging Face."""
    if entry.get("ms_hub_url") and (_env_flag("USE_MODELSCOPE_HUB") or not entry.get("hf_hub_url")):
        return "ms"
    return "hf" if entry.get("hf_hub_url") else None


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def _check_keys(mapping: Any, known: set[str], where: str, what: str) -> None:
    if not isinstance(mapping, dict):
        raise DataError(f"{where}: expected an object of {what}s, got {type(mapping).__name__}")
    for key, value in mapping.items():
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
            hint = f" (did you mean `{close[0]}`?)" if close else f" (known: {', '.join(sorted(known))})"
            raise DataError(f"{where}: unknown {what} `{key}`{hint}")
        if what != "key" and not isinstance(value, str):
            raise DataError(f"{where}: {what} `{key}` must name a column or tag as a string, got {value!r}")


def _check_files(spec: DatasetSpec, where: str) -> None:
    """The path exists and holds data files of one readable type."""
    if not spec.path.exists():
        raise DataError(f"{where}: file not found: {spec.path}")
    files = spec.files()
    if not files:
        raise DataError(f"{where}: folder {spec.path} holds no data file ({', '.join(BUILDERS)})")
    kinds = {BUILDERS.get(f.suffix.lower()) for f in files}
    if None in kinds:
        raise DataError(f"{where}: cannot read {spec.path.suffix!r} files; use one of {', '.join(BUILDERS)}")
    if len(kinds) > 1:
        raise DataError(f"{where}: folder {spec.path} mixes file types ({', '.join(sorted(kinds))}); keep one")


# ---------------------------------------------------------------- data files named directly

#: Where the detection looks, in order: conversation columns, then the alpaca prompt and response columns.
MESSAGE_COLUMNS = ("conversations", "messages")
MESSAGE_STYLES = {("from", "value"): "sharegpt", ("role", "content"): "openai"}
PROMPT_COLUMNS = ("instruction", "prompt", "question")
RESPONSE_COLUMNS = ("output", "response", "completion", "answer")
TEXT_COLUMN = "text"
#: `columns` keys taken when a column of that name is present (`query` and `history` in the alpaca format only).
OPTIONAL_COLUMNS = {"system": "system", "tools": "tools", "images": "images", "videos": "videos", "audios": "audios"}
ALPACA_ONLY_COLUMNS = {"query": "input", "history": "history"}
KTO_COLUMNS = ("kto_tag", "label")


def spec_for_path(path: str | Path, name: str | None = None) -> DatasetSpec:
    """A spec for a data file or folder that is not in dataset_info.json, its format detected from its first sample:

    conversations/messages of from/value -> sharegpt, of role/content -> openai; instruction (or prompt, question)
    with output (or response, completion, answer) -> alpaca; text -> pre-training text. Besides: chosen + rejected
    -> a preference dataset; a boolean kto_tag or label -> KTO; system, tools, images, videos, audios columns by name.
    """
    path = Path(path)
    where = f"dataset {name or str(path)!r}"
    spec = DatasetSpec(name=name or str(path), info_path=None, path=path)
    _check_files(spec, where)
    first = first_record(spec.files()[0])
    formatting, columns = _detect(first, spec.files()[0])
    ranking = "chosen" in first and "rejected" in first
    if ranking:
        columns.update(chosen="chosen", rejected="rejected")
    kto = next((c for c in KTO_COLUMNS if isinstance(first.get(c), bool)), None)
    if kto is not None:
        columns["kto_tag"] = kto
    return replace(spec, formatting=formatting, columns=columns, ranking=ranking)


def _detect(first: dict[str, Any], path: Path) -> tuple[str, dict[str, str]]:
    optional = {**OPTIONAL_COLUMNS}
    messages = next((c for c in MESSAGE_COLUMNS if isinstance(first.get(c), list) and first[c]), None)
    prompt = next((c for c in PROMPT_COLUMNS if c in first), None)
    response = next((c for c in RESPONSE_COLUMNS if c in first), None)
    if messages is not None:
        message = first[messages][0]
        formatting = next((style for keys, style in MESSAGE_STYLES.items()
                           if isinstance(message, dict) and set(keys) <= set(message)), None)
        if formatting is None:
            raise DataError(f"{path}: sample 0: the messages in column {messages!r} have neither from/value "
                            f"(sharegpt) nor role/content (openai) keys; register the file in dataset_info.json "
                            f"with its `tags`")
        columns = {"messages": messages}
    elif prompt is not None and (response is not None or {"chosen", "rejected"} <= set(first)):
        formatting, columns = "alpaca", {"prompt": prompt}
        if response is not None:
            columns["response"] = response
        optional.update(ALPACA_ONLY_COLUMNS)
    elif TEXT_COLUMN in first:
        formatting, columns = "alpaca", {"prompt": TEXT_COLUMN}
    else:
        raise DataError(f"{path}: cannot tell the format from the columns of sample 0 ({', '.join(first)}): "
                        f"expected conversations or messages (sharegpt/openai), instruction and output (alpaca), "
                        f"or text (pre-training); or register the file in dataset_info.json with its `columns`")
    columns.update({key: column for key, column in optional.items() if column in first})
    return formatting, columns


def first_record(path: Path) -> dict[str, Any]:
    """The first sample of a data file, as `datasets` will read it (its columns and their values)."""
    reader = FIRST_RECORD_READERS[BUILDERS[path.suffix.lower()]]
    record = reader(path)
    if record is None:
        raise DataError(f"{path}: holds no samples")
    if not isinstance(record, dict):
        raise DataError(f"{path}: sample 0 is not an object with named columns")
    return record


def _first_json(path: Path) -> Any:
    text = path.read_text(encoding="utf-8")
    start = len(text) - len(text.lstrip())
    if start == len(text):
        return None
    if text.startswith("[", start):  # a JSON array of samples: decode its first element only
        start = len(text) - len(text[start + 1:].lstrip())
        if text.startswith("]", start):
            return None
    try:
        return json.JSONDecoder().raw_decode(text, start)[0]
    except json.JSONDecodeError as err:
        raise json_error(path, err) from None


def _first_csv(path: Path) -> dict[str, Any] | None:
    with path.open(newline="", encoding="utf-8") as handle:
        return next(csv.DictReader(handle), None)


def _first_text(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as handle:
        return {TEXT_COLUMN: handle.readline().rstrip("\n")}


def _first_parquet(path: Path) -> dict[str, Any] | None:
    import pyarrow.parquet as pq

    rows = next(pq.ParquetFile(path).iter_batches(batch_size=1), None)
    return rows.to_pylist()[0] if rows is not None and rows.num_rows else None


def _first_arrow(path: Path) -> dict[str, Any] | None:
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        table = pa.ipc.open_stream(source).read_all()  # `datasets` writes (and its arrow builder reads) streams
    return table.slice(0, 1).to_pylist()[0] if table.num_rows else None


#: builder -> how to read the first sample of one of its files.
FIRST_RECORD_READERS = {"json": _first_json, "csv": _first_csv, "text": _first_text, "parquet": _first_parquet,
                        "arrow": _first_arrow}


def json_error(path: Path, err: json.JSONDecodeError, line: int | None = None) -> DataError:
    """`file:line:column: invalid JSON: reason` of a document, or of one JSON line (then `line` is its number)."""
    if line is None:
        return DataError(f"{path}:{err.lineno}:{err.colno}: invalid JSON: {err.msg}")
    return DataError(f"{path}:{line}:{err.colno}: invalid JSON line: {err.msg}")


# ---------------------------------------------------------------- hubs


def read_hub_dataset(spec: DatasetSpec, cache_dir: str | None = None, token: str | None = None,
                     streaming: bool = False) -> Any:
    """The rows of a hub dataset (`datasets.Dataset`, or `IterableDataset` when streaming); DataError when the hub
    cannot be reached, saying why."""
    hub = HUBS[spec.hub]
    prefix = f"dataset {spec.name!r} is on the {hub} ({spec.hub_url})"
    if spec.hub == "ms":
        try:
            from modelscope import MsDataset
        except ImportError:
            raise DataError(f"{prefix}, which needs the `modelscope` package: install it, or give the entry an "
                            f"`hf_hub_url`") from None
        load, kwargs = MsDataset.load, dict(dataset_name=spec.hub_url, subset_name=spec.subset, use_streaming=streaming)
    else:
        offline = next((name for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if _env_flag(name)), None)
        if offline is not None:
            raise DataError(f"{prefix}, which is not reachable: {offline} is set. Download it and point `file_name` "
                            f"at the files, or unset {offline} on a machine with network access")
        from datasets import load_dataset

        load, kwargs = load_dataset, dict(path=spec.hub_url, name=spec.subset, streaming=streaming)
    try:
        rows = load(data_dir=spec.folder, split=spec.split, cache_dir=cache_dir, token=token, **kwargs)
    except Exception as err:  # connection errors come in many types (OSError, requests, huggingface_hub, ...)
        raise DataError(f"{prefix} and could not be loaded (hub not reachable, or no such dataset, subset or "
                        f"split): {err}") from err
    # ModelScope wraps a `datasets` dataset; everything after this point reads the `datasets` one.
    return rows.to_hf_dataset() if hasattr(rows, "to_hf_dataset") else rows
