"""What a dataset is once resolved (`DatasetSpec`), the keys a dataset_info.json entry (or an entry of a
LLaMA-Factory v1 dataset yaml) may hold, and `DataError`.

A leaf of the data layer: the registry (dataset_info.json, v1 dataset yamls), the detection of data files named
directly and the readers all build on it. Only the standard library is imported (pyarrow inside the functions that
count the rows of parquet and arrow files).
"""

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from tunelab.config import ConfigError
from tunelab.config.files import os_problem, parse_json, read_text, utf8_problem

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

#: Keys of an entry of a LLaMA-Factory v1 dataset yaml (`name: {path: FILE, source: local, converter: alpaca}`).
V1_ENTRY_KEYS = ("path", "source", "converter", "split", "streaming", "size", "weight")
_V1_MEDIA = {"images": "images", "videos": "videos", "audios": "audios"}
#: v1 converter -> the columns it reads (`columns` key -> column), the one it cannot do without first. v1 reads
#: what a sample holds, so a file's columns among these are read. v1's sharegpt role names are DEFAULT_TAGS.
V1_CONVERTER_COLUMNS = {
    "alpaca": {"prompt": "instruction", "query": "input", "response": "output", "system": "system", **_V1_MEDIA},
    "sharegpt": {"messages": "conversations", "tools": "tools", **_V1_MEDIA},
}
V1_PAIR = ("v1's pair layout holds chosen and rejected as whole conversations; tunelab's preference data is a "
           "prompt with a chosen and a rejected reply")
V1_SPLIT = ("tunelab reads a local file's one split, train, and other splits of hub datasets in "
            "dataset_info.json")
V1_STREAMING = ("v1 cannot train on a stream: its batch generator raises 'Iterable dataset is not supported yet'; "
                "leave it out, and give tunelab's `streaming=true` to stream")

#: File suffixes and the `datasets` builder that reads them.
BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text",
            ".arrow": "arrow"}

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
    media_root: Path | None = None          # the config's `media_dir`, when set

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
        """Where relative image/video/audio paths start: the config's `media_dir`, else dataset_dir (as in
        LLaMA-Factory), or a direct file's folder."""
        if self.media_root is not None:
            return self.media_root
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


def unreadable(path: Path, err: Exception) -> DataError:
    """The DataError of a data file its reader failed on, naming the file and what is wrong with it."""
    if isinstance(err, DataError):
        return err
    if isinstance(err, UnicodeDecodeError):
        return DataError(utf8_problem(path) or f"{path}: not UTF-8 text ({err.reason})")
    if isinstance(err, OSError):
        return DataError(f"{path}: {os_problem(err)}")
    detail = " ".join(str(err).split()) or type(err).__name__
    return DataError(f"{path}: not a readable {BUILDERS.get(path.suffix.lower(), 'data')} file: {detail}")


#: What the readers of a damaged file raise: decoding and parse errors (ValueError, pyarrow's ArrowInvalid), the csv
#: module's, and a read that fails. `unreadable` turns each into a DataError.
READ_ERRORS = (OSError, ValueError, csv.Error, RecursionError)


def csv_records(handle: TextIO) -> Any:
    """A `csv.reader` of `handle` that takes fields of any length, as pandas (and so `datasets`) does: the csv module's
    default limit of 128 KiB per field refuses a long document."""
    csv.field_size_limit(2**31 - 1)  # the largest every platform's C long holds
    return csv.reader(handle)


def check_files(spec: DatasetSpec, where: str) -> None:
    """The path exists and holds data files of one readable type."""
    if not spec.path.exists():
        raise DataError(f"{where}: file not found: {spec.path}")
    try:
        files = spec.files()
        for path in files:  # opened now, while a refusal costs nothing: the cache key reads them before `datasets`
            path.open("rb").close()
    except OSError as err:  # a folder that cannot be listed, a file that cannot be read
        raise DataError(f"{where}: {err.filename}: {os_problem(err)}") from None
    if not files:
        raise DataError(f"{where}: folder {spec.path} holds no data file ({', '.join(BUILDERS)})")
    kinds = {BUILDERS.get(f.suffix.lower()) for f in files}
    if None in kinds:
        raise DataError(f"{where}: cannot read {spec.path.suffix!r} files; use one of {', '.join(BUILDERS)}")
    if len(kinds) > 1:
        raise DataError(f"{where}: folder {spec.path} mixes file types ({', '.join(sorted(kinds))}); keep one")


def count_rows(spec: DatasetSpec) -> int:
    """How many samples a local dataset holds, as `datasets` reads its files (a v1 `weight` scales it)."""
    total = 0
    for path in spec.files():
        try:
            total += ROW_COUNTERS[BUILDERS[path.suffix.lower()]](path)
        except READ_ERRORS as err:
            raise unreadable(path, err) from None
    return total


def _json_rows(path: Path) -> int:
    text = read_text(path, DataError)
    if text.lstrip().startswith("["):
        return len(parse_json(text, path, DataError))
    return sum(1 for line in text.splitlines() if line.strip())  # JSON lines


def _csv_rows(path: Path) -> int:
    with path.open(newline="", encoding="utf-8") as handle:
        records = csv_records(handle)
        next(records, None)  # the header
        return sum(1 for record in records if record)  # a blank line is no record


def _parquet_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def _arrow_rows(path: Path) -> int:
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_stream(source).read_all().num_rows


#: builder -> how many samples one of its files holds (text files have no column a v1 converter reads).
ROW_COUNTERS = {"json": _json_rows, "csv": _csv_rows, "parquet": _parquet_rows, "arrow": _arrow_rows}
