"""A data file or folder named directly in `dataset:` (not registered in dataset_info.json): its format detected
from its first record.

    spec = spec_for_path("my_chats.jsonl")    # formatting sharegpt, openai or alpaca, its columns and tags

Only the standard library is imported (pyarrow inside the readers of parquet and arrow files).
"""

from dataclasses import replace
from pathlib import Path
from typing import Any

from tunelab.config.files import parse_json, read_text
from tunelab.data.spec import BUILDERS, READ_ERRORS, DataError, DatasetSpec, check_files, csv_records, unreadable

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
    check_files(spec, where)
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
    try:
        record = reader(path)
    except READ_ERRORS as err:
        raise unreadable(path, err) from None
    if record is None:
        raise DataError(f"{path}: holds no samples")
    if not isinstance(record, dict):
        raise DataError(f"{path}: sample 0 is not an object with named columns")
    return record


def _first_json(path: Path) -> Any:
    text = read_text(path, DataError)
    start = len(text) - len(text.lstrip())
    if start == len(text):
        return None
    if text.startswith("[", start):  # a JSON array of samples: decode its first element only
        start = len(text) - len(text[start + 1:].lstrip())
        if text.startswith("]", start):
            return None
    return parse_json(text, path, DataError, start=start)[0]


def _first_csv(path: Path) -> dict[str, Any] | None:
    with path.open(newline="", encoding="utf-8") as handle:
        records = (record for record in csv_records(handle) if record)  # a blank line is no record
        header, first = next(records, None), next(records, None)
    if header is None or first is None:
        return None
    return dict(zip(header, first + [None] * (len(header) - len(first))))  # as pandas reads a short record


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
