"""Bad data, generated: whatever a data file, a row or a dataset_info.json entry holds, reading, checking and
tokenizing it (the whole data path before a model loads) either gives datasets or raises one DataError, on one line,
naming the file; through `tunelab data preview`, exit status 2 and no traceback. Beside the properties, the known
cases each have a test with the exact message.

    .venv/bin/python -m pytest tests/data/test_bad_data_properties.py -q --hypothesis-show-statistics

Examples are derandomized (the `ci` profile of tests/conftest.py) and budgeted per test (about 20 s in all).
"""

import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from tunelab.config import load_config
from tunelab.data import DataError, get_template, load_datasets, resolve_datasets
from tunelab.data.spec import BUILDERS

#: Values of every JSON kind, nested a little; text of any characters (NUL and lone surrogates too), or a few words.
TEXT = st.text(st.characters(codec="utf-8"), max_size=8) | st.sampled_from(["", "Hi", "a b"])
VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
                      lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                      max_leaves=5)
MISSING = object()
ALPACA_FIELDS = ("instruction", "input", "output", "system", "history")


@pytest.fixture(scope="module")
def tools(tiny_model_dir):
    """The tiny model's tokenizer and its chat template (what `tunelab data preview` loads instead of weights)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = load_config({"model_name_or_path": str(tiny_model_dir), "template": "chatml"})
    template = get_template(config, tokenizer)
    template.prepare_tokenizer(tokenizer)
    return tiny_model_dir, tokenizer, template


def load(tools, folder: Path, dataset: str = "d", **keys):
    """The data path of a run up to the model: the config, its datasets resolved (as `tunelab train` does before
    torch loads), then read, checked and tokenized (as `tunelab data preview` does)."""
    model, tokenizer, template = tools
    config = load_config({"model_name_or_path": str(model), "stage": "sft", "dataset": dataset,
                          "dataset_dir": str(folder), "template": "chatml", "cutoff_len": 64,
                          "cache_dir": str(folder / "cache"), **keys})
    resolve_datasets(config.dataset, config.dataset_dir, config.stage)
    return load_datasets(config, tokenizer, template)


def outcome(tools, folder: Path, named: Path, **keys) -> str | None:
    """None when the data loads; else the DataError's message, which must be one line naming `named`."""
    try:
        load(tools, folder, **keys)
    except DataError as err:
        message = str(err)
        event(f"refused: {message.split(': ')[-1][:40] if 'appears twice' not in message else 'key twice'}")
        assert str(named) in message, message
        assert "\n" not in message, message
        return message
    event("loaded")
    return None


def folder_with(folder: Path, name: str, data: bytes, entry: dict | None = None) -> tuple[Path, Path]:
    """`folder` as a dataset_dir holding data file `name`, registered as dataset `d` (with `entry`'s keys)."""
    (folder / name).write_bytes(data)
    (folder / "dataset_info.json").write_text(json.dumps({"d": {"file_name": name, **(entry or {})}}))
    return folder, folder / name


def encoded(rows: list, suffix: str) -> bytes:
    """JSON lines, or a JSON array of the rows; either way row i on line i + 1."""
    lines = [json.dumps(row) for row in rows]
    return ("".join(line + "\n" for line in lines) if suffix == ".jsonl" else "[" + ",\n".join(lines) + "]\n").encode()


# ---------------------------------------------------------------- generated rows, files and entries, in process


ROWS = st.lists(st.fixed_dictionaries({}, optional={field: VALUES for field in ALPACA_FIELDS}), min_size=1, max_size=4)


@settings(max_examples=40)
@given(rows=ROWS, suffix=st.sampled_from([".json", ".jsonl"]), strict=st.booleans())
def test_rows_of_any_types_load_or_are_refused_naming_the_file(rows, suffix, strict, tools, tmp_path_factory):
    folder, path = folder_with(tmp_path_factory.mktemp("data"), f"d{suffix}", encoded(rows, suffix))
    message = outcome(tools, folder, path, strict_data=strict)
    if message is not None and strict and "strict_data" in message:
        assert f"{path}, sample " in message  # the first invalid sample is named


MESSAGE = st.fixed_dictionaries({}, optional={"role": st.sampled_from(["user", "assistant", "system", "tool", "x"])
                                              | VALUES, "content": VALUES | TEXT, "tool_calls": VALUES})
CONVERSATIONS = st.lists(st.fixed_dictionaries({}, optional={"messages": st.lists(MESSAGE, max_size=4) | VALUES}),
                         min_size=1, max_size=3)


@settings(max_examples=30)
@given(rows=CONVERSATIONS)
def test_conversations_of_any_shape_load_or_are_refused_naming_the_file(rows, tools, tmp_path_factory):
    tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
            "system_tag": "system", "observation_tag": "tool"}
    folder, path = folder_with(tmp_path_factory.mktemp("data"), "d.json", encoded(rows, ".json"),
                               {"formatting": "sharegpt", "columns": {"messages": "messages"}, "tags": tags})
    outcome(tools, folder, path)


GOOD = [{"instruction": "Say hi", "input": "", "output": "Hi"}, {"instruction": "Count", "output": "1 2 3"}]


@settings(max_examples=40)
@given(data=st.binary(max_size=120) | st.builds(lambda cut, junk, at: encoded(GOOD, ".jsonl")[:cut] + junk
                                                + encoded(GOOD, ".jsonl")[at:], st.integers(0, 120),
                                                st.binary(max_size=3), st.integers(0, 120)),
       suffix=st.sampled_from(sorted(BUILDERS)), direct=st.booleans())
def test_any_bytes_in_a_data_file_load_or_are_refused_naming_the_file(data, suffix, direct, tools, tmp_path_factory):
    """Random bytes, and good JSON lines cut and spliced with random bytes, in a file of every readable type, named
    in dataset_info.json or directly by its path."""
    folder, path = folder_with(tmp_path_factory.mktemp("data"), f"d{suffix}", data)
    keys = {"dataset": str(path)} if direct else {}
    outcome(tools, folder, path, **keys)


#: How good JSON rows are broken: (kind, where, the change).
BROKEN_JSON = st.one_of(
    st.tuples(st.just("cut"), st.integers(1, 100), st.none()),
    st.tuples(st.just("bytes"), st.integers(0, 100), st.binary(min_size=1, max_size=3)),
    st.tuples(st.just("key twice"), st.integers(0, 1), st.sampled_from(["instruction", "output"])),
    st.tuples(st.just("deep nesting"), st.integers(0, 1), st.sampled_from([3, 200, 20000])),
    st.tuples(st.just("long number"), st.integers(0, 1), st.sampled_from([10, 5000])),
)


def broken_json(kind: str, where, change, suffix: str) -> bytes:
    """GOOD as a .json or .jsonl file, broken as BROKEN_JSON says (`where`: a byte offset, or a row)."""
    data = encoded(GOOD, suffix)
    if kind == "cut":
        return data[:where]
    if kind == "bytes":
        return data[:where] + change + data[where:]
    row = json.dumps(GOOD[where])
    if kind == "key twice":
        added = f'"{change}": "again"'
    else:
        added = f'"extra": {"[" * change + "]" * change if kind == "deep nesting" else "7" * change}'
    return data.replace(row.encode(), f"{row[:-1]}, {added}}}".encode())


@settings(max_examples=40)
@given(broken=BROKEN_JSON, suffix=st.sampled_from([".json", ".jsonl"]))
def test_broken_json_is_refused_by_file_and_line(broken, suffix, tools, tmp_path_factory):
    kind, where, change = broken
    event(kind)
    data = broken_json(kind, where, change, suffix)
    folder, path = folder_with(tmp_path_factory.mktemp("data"), f"d{suffix}", data)
    message = outcome(tools, folder, path)
    if kind == "key twice":
        assert f"{path}:{1 + where}:" in message and f'key "{change}" appears twice in one object' in message
    elif kind == "deep nesting" and change == 20000:
        assert "levels deep, more than can be read" in message
    elif kind == "long number" and change == 5000:
        assert f"{path}:{1 + where}:" in message and "a number of more than 4300 digits" in message
    elif kind == "bytes":
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as err:
            assert f"at byte offset {err.start} cannot be decoded" in message


ENTRY_KEYS = ["file_name", "formatting", "ranking", "columns", "tags", "num_samples", "split", "subset", "folder",
              "hf_hub_url", "ms_hub_url", "script_url", "something_else"]


@settings(max_examples=60)
@given(entry=st.dictionaries(st.sampled_from(ENTRY_KEYS), VALUES | st.just("d.json"), max_size=4),
       raw=st.none() | st.binary(max_size=60))
def test_any_dataset_info_entry_resolves_or_is_refused_naming_dataset_info(entry, raw, tmp_path_factory):
    folder = tmp_path_factory.mktemp("info")
    (folder / "d.json").write_text(json.dumps(GOOD))
    info = folder / "dataset_info.json"
    info.write_bytes(raw if raw is not None else json.dumps({"d": entry}).encode())
    try:
        resolve_datasets(["d"], folder, "sft")
    except DataError as err:
        event("refused")
        assert str(info) in str(err), str(err)
        return
    event("resolved")


# ---------------------------------------------------------------- the real command line, a few examples


@settings(max_examples=2)  # about 7 s each: a process that imports torch and transformers and reads a tokenizer
@given(broken=BROKEN_JSON)
def test_data_preview_exits_2_with_one_message_and_no_traceback(broken, tools, tmp_path_factory):
    folder, path = folder_with(tmp_path_factory.mktemp("data"), "d.jsonl", broken_json(*broken, ".jsonl"))
    try:
        load(tools, folder)
        return  # the change left valid data
    except DataError:
        pass
    config = folder / "cfg.yaml"
    config.write_text(f"model_name_or_path: {tools[0]}\nstage: sft\ndataset: d\ndataset_dir: {folder}\n"
                      f"template: chatml\ncache_dir: {folder / 'cache'}\n")
    result = subprocess.run([sys.executable, "-m", "tunelab", "data", "preview", str(config)], capture_output=True,
                            text=True, errors="replace", timeout=300)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("tunelab: error: ")]
    assert len(error) == 1 and str(path) in error[0], result.stderr


# ---------------------------------------------------------------- the known cases, with their messages


NOT_UTF8 = (r"not UTF-8 text: byte 0xff at byte offset {} cannot be decoded \(invalid start byte\); save the file as "
            r"UTF-8")


@pytest.mark.parametrize("name, data, line, offset", [
    ("d.json", b'[{"instruction": "hi", "output": "h\xffello"}]', 1, 35),
    ("d.jsonl", b'{"instruction": "hi", "output": "hello"}\n{"instruction": "\xff", "output": "x"}\n', 2, 58),
    ("d.csv", b"instruction,output\nhi,hello\nho,h\xffllo\n", 3, 32),
    ("d.txt", b"one document\nanother \xff one\n", 2, 21),
])
@pytest.mark.parametrize("direct", [False, True])
def test_bytes_that_are_not_utf8_are_named_by_file_line_and_byte_offset(name, data, line, offset, direct, tools,
                                                                        tmp_path):
    folder, path = folder_with(tmp_path, name, data)
    stage = "pt" if name.endswith(".txt") else "sft"
    with pytest.raises(DataError, match=rf"{path}:{line}: {NOT_UTF8.format(offset)}$"):
        load(tools, folder, dataset=str(path) if direct else "d", stage=stage)


@pytest.mark.parametrize("name, data, message", [
    ("d.json", "[" * 100000 + "]" * 100000, r":1:100000: JSON nested 100000 levels deep, more than can be read"),
    ("d.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": ' + "[" * 5000 + "]" * 5000 + "}\n",
     r":2:5016: JSON nested 5001 levels deep, more than can be read"),
    ("d.json", '[{"instruction": "a",\n  "output": "b",\n  "instruction": "c"}]',
     r':3:3: key "instruction" appears twice in one object \(first at line 1\): keep one$'),
    ("d.jsonl", '{"instruction": "a", "output": "b"}\n{"output": "b", "output": "c", "instruction": "a"}\n',
     r':2:17: key "output" appears twice in one object \(first at line 2\): keep one$'),
    ("d.json", "", r": holds no samples$"),
    ("d.json", "[]", r": holds no samples$"),
    ("d.csv", "instruction,output\n", r": holds no samples$"),
    ("d.csv", "instruction,input,output\nhi,,hello,extra,more\n",
     r":2: the first record has 5 fields, but the header names 3 columns: pandas would read the extra fields as row "
     r"labels and shift every column"),
])
def test_a_data_file_datasets_would_misread_or_refuse_is_named(name, data, message, tools, tmp_path):
    folder, path = folder_with(tmp_path, name, data.encode())
    with pytest.raises(DataError, match=rf"^dataset 'd': {path}{message}"):
        load(tools, folder)


def test_an_empty_text_file_holds_no_samples(tools, tmp_path):
    folder, path = folder_with(tmp_path, "d.txt", b"")
    with pytest.raises(DataError, match=rf"^dataset 'd': {path}: holds no samples$"):
        load(tools, folder, stage="pt")


@pytest.mark.parametrize("name, data, message", [
    ("d.parquet", b"PAR1 not a parquet file", r"not a readable parquet file: .*magic bytes"),
    ("d.arrow", b"not an arrow stream" * 4, r"not a readable arrow file: "),
    ("d.json", b"[" * 100000 + b"]" * 100000, r"1:100000: JSON nested 99999 levels deep"),
])
def test_a_damaged_file_named_directly_is_refused_by_name(name, data, message, tools, tmp_path):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(DataError, match=rf"^{tmp_path / name}:? ?{message}"):
        load(tools, tmp_path, dataset=str(tmp_path / name))


@pytest.mark.parametrize("info, message", [
    ('{"d": {"file_name": "d.json"},\n "d": {"file_name": "e.json"}}',
     r':2:2: key "d" appears twice in one object \(first at line 1\): keep one$'),
    ('{"d": {"file_name": "d.json",\n       "file_name": "e.json"}}',
     r':2:8: key "file_name" appears twice in one object \(first at line 1\): keep one$'),
    ('{"d": {"file_name": 5}}', r": dataset 'd': `file_name` must be a string, got 5$"),
    ('{"d": {"file_name": "d.json", "num_samples": true}}',
     r": dataset 'd': `num_samples` must be a positive integer, got True$"),
    (b'{"d": {"file_name": "d\xff.json"}}', r":1: " + NOT_UTF8.format(22) + "$"),
])
def test_dataset_info_errors_are_named_by_file_line_and_key(info, message, tmp_path):
    (tmp_path / "d.json").write_text(json.dumps(GOOD))
    path = tmp_path / "dataset_info.json"
    path.write_bytes(info if isinstance(info, bytes) else info.encode())
    with pytest.raises(DataError, match=rf"^{path}{message}"):
        resolve_datasets(["d"], tmp_path, "sft")


def test_a_v1_dataset_yaml_with_a_key_twice_is_refused_by_line(tmp_path):
    path = tmp_path / "data.yaml"
    path.write_text("d:\n  path: d.json\n  converter: alpaca\n  path: e.json\n")
    with pytest.raises(DataError, match=rf"^{path}:4:3: key `path` appears twice in one mapping \(first at line 2\)"):
        resolve_datasets([str(path)], tmp_path, "sft")


def test_a_file_or_folder_that_cannot_be_read_is_named(tools, tmp_path, monkeypatch):
    folder, path = folder_with(tmp_path, "d.json", json.dumps(GOOD).encode())
    real_open = Path.open

    def refusing_open(self, *args, **kwargs):  # as for a file without read permission (the tests may run as root)
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", refusing_open)
    with pytest.raises(DataError, match=rf"^{folder / 'dataset_info.json'}: dataset 'd': {path}: cannot be read: "
                                        r"permission denied$"):
        load(tools, folder)


def test_a_number_where_text_belongs_is_read_as_text_with_one_warning(tools, tmp_path, caplog):
    rows = [{"instruction": 7, "output": 42}, {"instruction": "Say 8", "output": 8.5}, {"instruction": "a",
                                                                                       "output": "b"}]
    folder, path = folder_with(tmp_path, "d.json", json.dumps(rows, indent=1).encode())
    caplog.set_level(logging.WARNING, logger="tunelab.data")
    splits = load(tools, folder)
    assert len(splits.train) == 3
    warnings = [r.getMessage() for r in caplog.records if "number where text belongs" in r.getMessage()]
    assert warnings == [f"dataset 'd': 2 of 3 samples hold a number where text belongs (the response: 2, the "
                        f"instruction: 1; first at {path}, sample 0 (line 2)): each was read as its text, 42 as "
                        f'"42"']
    tokenizer = tools[1]
    assert "42" in tokenizer.decode(splits.train[0]["input_ids"])


def test_a_csv_column_of_numbers_is_read_as_text_with_one_warning(tools, tmp_path, caplog):
    folder, path = folder_with(tmp_path, "d.csv", b"instruction,output\nOne?,1\nTwo?,2\n")
    caplog.set_level(logging.WARNING, logger="tunelab.data")
    assert len(load(tools, folder).train) == 2
    assert f"2 of 2 samples hold a number where text belongs (the response: 2; first at {path}, sample 0 (line 2))" \
           in caplog.text


def test_a_parquet_file_of_any_rows_loads_or_is_refused(tools, tmp_path):
    """Arrow tables hold one type per column: a number column becomes text, a list column is refused by rule."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.table({"instruction": [["a"], ["b"]], "output": [1, 2]}), buffer)
    folder, path = folder_with(tmp_path, "d.parquet", buffer.getvalue())
    with pytest.raises(DataError, match=rf"dataset 'd' \({path}\): none of its 2 samples is usable .* 2 not text"):
        load(tools, folder)
