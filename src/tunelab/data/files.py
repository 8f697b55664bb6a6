"""A dataset's files, read safely: its rows through `datasets` after tunelab's own checks, its JSON samples, and the
line each sample starts on, for messages.

    raw = read_rows(spec, config)                   # datasets.Dataset
    raw = read_rows(spec, config, streaming=True)   # IterableDataset: read as training consumes it, unchecked
    SampleLocator(spec)(17)                         # "data/x.json, sample 17 (line 19)"
    for line, sample in json_samples(path): ...     # the samples of a .json/.jsonl file, a line at a time

Before `datasets` reads local files (not a stream, which is read only as training goes), tunelab reads the JSON files
itself (`find_json_error`): a syntax error, a byte that is not UTF-8, a key twice in one sample (`datasets` keeps the
last), nesting too deep, a sample that is not an object, and strings Arrow cannot store (a key holding NUL, half of a
UTF-16 surrogate pair: `datasets` drops them without a word) are named by file and line. Of a csv file, the first
record is compared with the header: pandas takes the extra fields of a longer first record for row labels and shifts
every column. When `datasets` fails anyway, the message names the file and why: bytes that are not UTF-8 (line and
byte offset), no samples, or the reason `datasets` gives.

Samples count from 0, as `dataset[i]` does; lines count from 1, as editors do.
"""

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tunelab.config.files import decode_utf8, os_problem, parse_json, read_text, utf8_problem
from tunelab.data.registry import read_hub_dataset
from tunelab.data.spec import READ_ERRORS, DataError, DatasetSpec, csv_records, unreadable

#: builders whose files are text (checked for UTF-8 when `datasets` fails on them).
TEXT_BUILDERS = ("json", "csv", "text")
#: JSON escapes of what Arrow cannot store as it is: NUL (in a column name) and the halves of UTF-16 surrogate pairs.
_RISKY_ESCAPES = re.compile(r"\\u(?:0000|[dD][89a-fA-F])")
_SURROGATE = re.compile("[\ud800-\udfff]")


def read_rows(spec: DatasetSpec, config: Any, streaming: bool = False) -> Any:
    """The raw rows of one dataset: a `datasets.Dataset` (an `IterableDataset` when streaming)."""
    from datasets import load_dataset

    if spec.hub_url is not None:
        return read_hub_dataset(spec, config.cache_dir, config.hf_hub_token, streaming)
    files = spec.files()
    builder = spec.builder()
    if not streaming:
        problem = find_json_error(files) if builder == "json" else _csv_shift(files) if builder == "csv" else None
        if problem:
            raise DataError(f"dataset {spec.name!r}: {problem}")
    try:
        return load_dataset(builder, data_files=[str(f) for f in files], split="train", cache_dir=config.cache_dir,
                            streaming=streaming)
    except Exception as err:  # datasets wraps parse errors in DatasetGenerationError without the position
        cause = err.__cause__ or err
        reason = " ".join(str(cause).split()) or type(cause).__name__
        problem = _why_unreadable(spec, builder) or (f"{spec.where}: cannot be read by the {builder} builder of "
                                                     f"`datasets`: {reason}")
        raise DataError(f"dataset {spec.name!r}: {problem}") from err


def _csv_shift(files: list[Path]) -> str | None:
    """`file:line: ...` of a csv file whose first record has more fields than its header names columns."""
    for path in files:
        try:
            with path.open(newline="", encoding="utf-8") as handle:
                reader = csv_records(handle)
                records = (record for record in reader if record)  # pandas skips blank lines
                header, first = next(records, None), next(records, None)
                line = reader.line_num
        except READ_ERRORS as err:
            return str(unreadable(path, err))
        if header is not None and first is not None and len(first) > len(header):
            return (f"{path}:{line}: the first record has {len(first)} fields, but the header names {len(header)} "
                    f"columns: pandas would read the extra fields as row labels and shift every column. Give each "
                    f"record one field per column (quote a field that holds a comma)")
    return None


def _why_unreadable(spec: DatasetSpec, builder: str) -> str | None:
    """Why `datasets` could not read the files, where tunelab can say it better: bytes that are not UTF-8, a file
    that cannot be opened, no samples at all, or JSON samples without a column. None otherwise."""
    samples, columns = 0, False
    for path in spec.files():
        try:
            problem = utf8_problem(path) if builder in TEXT_BUILDERS else None
            if problem:
                return problem
            if builder == "json":
                records = [record for _, record in json_samples(path)]
                samples, columns = samples + len(records), columns or any(records)
            else:
                samples, columns = samples + len(RECORD_LINES[builder](path)), True
        except OSError as err:
            return f"{path}: {os_problem(err)}"
        except READ_ERRORS:
            return None  # damaged in a way `datasets` explains best
    if not samples:
        return f"{spec.where}: holds no samples"
    return None if columns else f"{spec.where}: its samples are empty objects, without a single column"


# ---------------------------------------------------------------- samples and their lines


class SampleLocator:
    """Names sample `index` of a dataset: its file (in a folder, the files in order), its index there, its line."""

    def __init__(self, spec: DatasetSpec) -> None:
        self.spec = spec
        self._files: list[tuple[Path, list[int | None]]] | None = None  # each file with the line of each sample

    def __call__(self, index: int) -> str:
        if self.spec.path is None:
            return f"{self.spec.where} (split {self.spec.split}), sample {index}"
        if self._files is None:  # read the files only once a sample must be named
            self._files = [(path, RECORD_LINES[self.spec.builder()](path)) for path in self.spec.files()]
        for path, lines in self._files:
            if index < len(lines):
                return f"{path}, sample {index}" + (f" (line {lines[index]})" if lines[index] else "")
            index -= len(lines)
        # `datasets` counted more rows than we did (a file changed since it was read): name the folder at least.
        return f"{self.spec.where}, sample {index}"


def json_records(path: Path) -> list[tuple[int, Any]]:
    """Every sample of a .json or .jsonl file with the line it starts on (see `json_samples`)."""
    return list(json_samples(path))


def json_samples(path: Path) -> Iterator[tuple[int, Any]]:
    """Each sample of a .json or .jsonl file with the line it starts on. DataError names the file and line of a syntax
    error, a byte that is not UTF-8, a key twice in one object, nesting too deep to follow, and a string Arrow cannot
    store as it is (`_check_storable`).

    A file starting with `[` is an array of samples. Otherwise it is JSON lines, read a line at a time (a file of any
    size in little memory), or one sample written over several lines when its first line is no JSON value.
    """
    try:
        with path.open("rb") as handle:
            offset, first = 0, True
            for number, raw in enumerate(handle, 1):  # lines end at b"\n" only: JSON strings may hold U+2028
                line = decode_utf8(raw, path, DataError, offset=offset, line=number)
                offset += len(raw)
                if not line.strip():
                    continue
                if first and line.lstrip().removeprefix("\ufeff").startswith("["):
                    yield from _document_samples(path)
                    return
                try:
                    sample = parse_json(line.removeprefix("\ufeff"), path, DataError, line=number)
                except DataError as line_error:
                    if not first:
                        raise
                    try:
                        samples = _document_samples(path)
                    except DataError:
                        raise line_error from None  # neither one document nor JSON lines: the first line says why
                    yield from samples
                    return
                first = False
                if _RISKY_ESCAPES.search(line):
                    _check_storable(sample, path, number)
                yield number, sample
    except OSError as err:
        raise unreadable(path, err) from None


def _document_samples(path: Path) -> list[tuple[int, Any]]:
    """The samples of a file holding one JSON document: an array of samples, or one sample."""
    text = read_text(path, DataError)
    document = parse_json(text, path, DataError)
    if isinstance(document, list):
        samples = list(zip(_element_lines(text), document))
    else:
        samples = [(1 + text[:len(text) - len(text.lstrip())].count("\n"), document)]
    if _RISKY_ESCAPES.search(text):
        for line, sample in samples:
            _check_storable(sample, path, line)
    return samples


def _check_storable(sample: Any, path: Path, line: int) -> None:
    """Refuse what `datasets` would change without a word: a key holding NUL (Arrow's column names end there, so its
    value is lost) and half of a UTF-16 surrogate pair (no character; dropped)."""
    pending: list[tuple[Any, bool]] = [(sample, False)]
    while pending:  # a loop, not recursion: a sample may nest as deep as the JSON reader follows
        value, is_key = pending.pop()
        if isinstance(value, dict):
            pending += [(key, True) for key in value] + [(item, False) for item in value.values()]
        elif isinstance(value, list):
            pending += [(item, False) for item in value]
        elif isinstance(value, str) and is_key and "\x00" in value:
            raise DataError(f"{path}:{line}: the key {value!r} holds a NUL character (\\u0000), which `datasets` "
                            f"cannot keep in a column name")
        elif isinstance(value, str) and _SURROGATE.search(value):
            raise DataError(f"{path}:{line}: {value!r:.60} holds half of a UTF-16 surrogate pair (an escape between "
                            f"\\ud800 and \\udfff without its other half), which is no character")


_GAP = re.compile(r"[\s,]*")


def _element_lines(text: str) -> list[int]:
    """The line each element of a valid JSON array starts on."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    line, lines = 1 + text.count("\n", 0, pos), []
    while True:
        start = _GAP.match(text, pos).end()
        if text.startswith("]", start):
            return lines
        end = decoder.raw_decode(text, start)[1]
        line += text.count("\n", pos, start)
        lines.append(line)
        line += text.count("\n", start, end)
        pos = end


def find_json_error(files: list[Path]) -> str | None:
    """`file:line:column: problem` of the first .json/.jsonl file `datasets` cannot read or would misread: a syntax
    error, a byte that is not UTF-8, a key twice in one sample, nesting too deep, a string Arrow cannot store, or a
    sample that is not an object. None when every file is fine."""
    for path in files:
        if _plain_array(path):
            continue
        try:
            for index, (line, record) in enumerate(json_samples(path)):
                if not isinstance(record, dict):
                    return (f"{path}:{line}: sample {index} is {type(record).__name__}, not an object: every sample "
                            f"must be an object of named columns")
        except DataError as err:
            return str(err)
    return None


def _plain_array(path: Path) -> bool:
    """Whether a file is one JSON array of objects that `datasets` stores as it is: then `find_json_error` has
    nothing to report and skips finding each sample's line (a second pass over the text, about half its time on
    50,000 samples). False whenever there may be something to report, which `json_samples` then names by line."""
    with path.open("rb") as handle:
        if not handle.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
            return False
    try:
        text = read_text(path, DataError)
        document = parse_json(text, path, DataError)
    except DataError:
        return False
    return isinstance(document, list) and all(isinstance(sample, dict) for sample in document) \
        and not _RISKY_ESCAPES.search(text)


def _text_lines(path: Path) -> list[int | None]:
    with path.open(encoding="utf-8") as handle:
        return list(range(1, sum(1 for _ in handle) + 1))


def _csv_lines(path: Path) -> list[int | None]:
    """The line each csv record starts on (a quoted field may span lines); blank lines are no records."""
    lines, start = [], 1
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv_records(handle)
        for record in reader:
            if record:
                lines.append(start)
            start = reader.line_num + 1
    return lines[1:]  # the header


def _parquet_lines(path: Path) -> list[int | None]:
    import pyarrow.parquet as pq

    return [None] * pq.ParquetFile(path).metadata.num_rows


def _arrow_lines(path: Path) -> list[int | None]:
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        return [None] * pa.ipc.open_stream(source).read_all().num_rows


#: builder -> the line each sample of one of its files starts on (None where a file has no lines).
RECORD_LINES = {"json": lambda path: [line for line, _ in json_records(path)], "text": _text_lines,
                "csv": _csv_lines, "parquet": _parquet_lines, "arrow": _arrow_lines}
