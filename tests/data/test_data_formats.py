"""Dataset registry, formats and validation: dataset_info.json entries, data files named directly, every format into
the internal form, every validation rule named by file, sample and line, strict mode, JSON errors, hubs offline.

    .venv/bin/python -m pytest tests/data/test_data_formats.py -q

Files are read with `datasets` and converted with `convert_batch` exactly as the loader does, without tokenizing.
LLaMA-Factory's demo data comes from ../shared/lf_data and is skipped without it.
"""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from unittest.mock import ANY

import pytest

from tunelab.data.formats import NUMBERS_COLUMN, check_columns, convert_batch, features
from tunelab.data.detect import spec_for_path
from tunelab.data.registry import check_stage, read_hub_dataset, resolve_datasets
from tunelab.data.spec import DataError, DatasetSpec
from tunelab.data.files import SampleLocator, find_json_error, json_records
from tunelab.data.validation import RULES, RuleCount, check_dataset
from helpers import LF_DATA

needs_lf_data = pytest.mark.skipif(not LF_DATA.is_dir(), reason="../shared/lf_data is not present")


def write(folder: Path, files: dict[str, object], info: dict | None = None) -> Path:
    """Data files (JSON values are dumped; a list to a .jsonl file is one line per row) and a dataset_info.json."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in {**files, **({"dataset_info.json": info} if info is not None else {})}.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, str):
            path.write_text(content, encoding="utf-8")
        elif name.endswith(".jsonl"):
            path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in content), encoding="utf-8")
        else:
            path.write_text(json.dumps(content, ensure_ascii=False, indent=1), encoding="utf-8")
    return folder


def convert(rows: list[dict], formatting: str = "alpaca", stage: str = "sft", **entry) -> list[dict]:
    """convert_batch on rows in memory; each output row with its `_rule`."""
    spec = DatasetSpec(name="t", info_path=Path("dataset_info.json"), formatting=formatting, path=Path("t.json"),
                       columns=entry.get("columns"), tags=entry.get("tags"), ranking=entry.get("ranking", False))
    batch = {key: [row.get(key) for row in rows] for key in {k: 0 for row in rows for k in row}}
    out = convert_batch(batch, spec=spec, stage=stage)
    return [dict(zip(out, values)) for values in zip(*out.values())]


def read_and_convert(spec: DatasetSpec, stage: str, tmp_path: Path, strict: bool = False):
    """The loader's path for one local dataset: read with `datasets`, convert, check. Returns (converted, report)."""
    from datasets import load_dataset

    raw = load_dataset(spec.builder(), data_files=[str(f) for f in spec.files()], split="train",
                       cache_dir=str(tmp_path / "cache"))
    converted = raw.map(convert_batch, batched=True, remove_columns=raw.column_names, features=features(stage),
                        fn_kwargs={"spec": spec, "stage": stage}, load_from_cache_file=False)
    return converted, check_dataset(spec, converted["_rule"], stage=stage, strict=strict)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


# ---------------------------------------------------------------- formats into the internal form


def test_alpaca_joins_instruction_and_input_and_reads_history_and_system():
    rows = convert([
        {"instruction": "Translate.", "input": "Hallo", "output": "Hello", "system": "Be exact.",
         "history": [["Hi", "Hey"]]},
        {"instruction": "Say hi.", "input": "", "output": "Hi", "system": None, "history": None},
    ], columns={"prompt": "instruction", "query": "input", "response": "output", "system": "system",
                "history": "history"})
    assert rows[0]["messages"] == [user("Hi"), assistant("Hey"), user("Translate.\nHallo"), assistant("Hello")]
    assert rows[0]["system"] == "Be exact." and rows[0]["_rule"] == ""
    assert rows[1]["messages"] == [user("Say hi."), assistant("Hi")] and rows[1]["system"] is None
    assert rows[0]["chosen"] is None and rows[0]["kto_tag"] is None and rows[0]["images"] == []


def test_a_columns_object_replaces_the_defaults_as_in_llama_factory():
    row = {"instruction": "q", "input": "more", "output": "a", "system": "s"}
    assert convert([row])[0]["messages"] == [user("q\nmore"), assistant("a")]  # no `columns`: the defaults
    assert convert([row])[0]["system"] is None  # optional columns have no default
    (declared,) = convert([row], columns={"prompt": "instruction", "response": "output", "system": "system"})
    assert declared["messages"] == [user("q"), assistant("a")] and declared["system"] == "s"  # `input` is not read
    (tagged,) = convert([{"conversations": [{"from": "system", "value": "s"}, {"from": "user", "value": "q"},
                                            {"from": "bot", "value": "a"}]}], "sharegpt",
                        tags={"role_tag": "from", "content_tag": "value", "user_tag": "user", "assistant_tag": "bot"})
    assert tagged["_rule"] == "unknown role: 'system'"  # a `tags` object without system_tag has no system role


def test_sharegpt_roles_system_tools_and_custom_tags():
    tools = [{"name": "add", "description": "sum", "parameters": {"type": "object", "properties": {}}}]
    (row,) = convert([{"conversations": [
        {"from": "system", "value": "You add."},
        {"from": "human", "value": "2+3?"},
        {"from": "function_call", "value": '{"name": "add", "arguments": {"a": 2, "b": 3}}'},
        {"from": "observation", "value": "5"},
        {"from": "gpt", "value": "5."}], "tools": json.dumps(tools)}],
        "sharegpt", columns={"messages": "conversations", "tools": "tools"})
    assert row["system"] == "You add."
    assert [m["role"] for m in row["messages"]] == ["user", "tool_call", "tool", "assistant"]
    assert json.loads(row["messages"][1]["content"]) == [{"name": "add", "arguments": {"a": 2, "b": 3}}]
    assert json.loads(row["tools"]) == [{"type": "function", "function": tools[0]}]
    (custom,) = convert([{"chat": [{"who": "me", "text": "q"}, {"who": "bot", "text": "a"}]}], "sharegpt",
                        columns={"messages": "chat"},
                        tags={"role_tag": "who", "content_tag": "text", "user_tag": "me", "assistant_tag": "bot"})
    assert custom["messages"] == [user("q"), assistant("a")]


def test_openai_messages_with_tool_calls_and_tool_messages():
    (row,) = convert([{"messages": [
        {"role": "system", "content": "sys"}, {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "w", "arguments": '{"city": "Oslo"}'}},
            {"id": "c2", "type": "function", "function": {"name": "t", "arguments": {}}}]},
        {"role": "tool", "content": "cold; 3 C"}, {"role": "assistant", "content": "It is cold."}]}], "openai")
    assert row["system"] == "sys" and row["_rule"] == ""
    assert [m["role"] for m in row["messages"]] == ["user", "tool_call", "tool", "assistant"]
    assert json.loads(row["messages"][1]["content"]) == [{"name": "w", "arguments": {"city": "Oslo"}},
                                                         {"name": "t", "arguments": {}}]
    assert row["messages"][2]["content"] == "cold; 3 C"


def test_pretraining_text_column():
    assert convert([{"text": "A document."}], stage="pt")[0] == {"text": "A document.", "_rule": "", NUMBERS_COLUMN: ""}
    assert convert([{"body": 42}], stage="pt", columns={"prompt": "body"})[0]["text"] == "42"
    with pytest.raises(DataError, match="its `columns` object names no `prompt` column"):
        convert([{"text": "a"}], stage="pt", columns={"system": "system"})


def test_preference_alpaca_and_sharegpt():
    (alpaca,) = convert([{"instruction": "Pick", "input": "a or b", "chosen": "a", "rejected": "b"}], stage="dpo",
                        ranking=True, columns={"prompt": "instruction", "query": "input", "chosen": "chosen",
                                               "rejected": "rejected"})
    assert alpaca["messages"] == [user("Pick\na or b")]
    assert (alpaca["chosen"], alpaca["rejected"]) == (assistant("a"), assistant("b"))
    entry = dict(ranking=True, columns={"messages": "conversations", "chosen": "chosen", "rejected": "rejected"})
    rows = convert([
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"},
                           {"from": "human", "value": "sum 1 2"}],
         "chosen": {"from": "function_call", "value": '{"name": "add", "arguments": {"a": 1, "b": 2}}'},
         "rejected": {"from": "gpt", "value": "4"}},
        # TRL style: each reply a conversation whose last message is the reply
        {"conversations": [{"from": "human", "value": "q"}],
         "chosen": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "good"}],
         "rejected": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "bad"}]},
    ], "sharegpt", stage="rm", **entry)
    assert [r["_rule"] for r in rows] == ["", ""]
    assert rows[0]["messages"] == [user("hi"), assistant("hello"), user("sum 1 2")]
    assert rows[0]["chosen"]["role"] == "tool_call" and rows[0]["rejected"] == assistant("4")
    assert (rows[1]["chosen"], rows[1]["rejected"]) == (assistant("good"), assistant("bad"))


def test_kto_tags_from_booleans_and_from_text_columns():
    rows = convert([{"messages": [user("q"), assistant("good")], "label": True},
                    {"messages": [user("q"), assistant("bad")], "label": False}], "openai", stage="kto",
                   columns={"messages": "messages", "kto_tag": "label"})
    assert [(r["messages"][-1]["content"], r["kto_tag"]) for r in rows] == [("good", True), ("bad", False)]
    csv_like = convert([{"instruction": "q", "output": "a", "tag": tag} for tag in ("true", "False", "1", "0")],
                       stage="kto", columns={"prompt": "instruction", "response": "output", "kto_tag": "tag"})
    assert [r["kto_tag"] for r in csv_like] == [True, False, True, False]


def test_prompt_only_stages_take_prompts_and_keep_reference_replies():
    rows = convert([{"instruction": "q1"}, {"instruction": "q2", "output": ""}, {"instruction": "q3", "output": "a3"}],
                   stage="ppo")
    assert [r["messages"] for r in rows] == [[user("q1")], [user("q2")], [user("q3"), assistant("a3")]]
    # A preference dataset gives its prompts to ppo.
    (pair,) = convert([{"instruction": "q", "chosen": "a", "rejected": "b"}], stage="grpo", ranking=True,
                      columns={"prompt": "instruction", "chosen": "chosen", "rejected": "rejected"})
    assert pair["messages"] == [user("q")] and pair["_rule"] == ""


def test_media_paths_resolve_from_dataset_dir_and_urls_stay(tmp_path):
    tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}
    columns = {"messages": "messages", "images": "images", "videos": "videos", "audios": "audios"}
    folder = write(tmp_path, {"media/a.jpg": b"\xff\xd8", "media/b.mp4": b"\0", "media/c.wav": b"\0"},
                   info={"mm": {"file_name": "mm.json", "formatting": "sharegpt", "columns": columns, "tags": tags}})
    write(folder, {"mm.json": [
        {"messages": [user("<image><video><audio>What is this?"), assistant("A cat."),
                      user("And this <image>?"), assistant("A dog.")],
         "images": ["media/a.jpg", "https://example.com/dog.png"], "videos": "media/b.mp4",  # one file, not a list
         "audios": ["media/c.wav"]}]})
    (spec,) = resolve_datasets(["mm"], folder)
    converted, report = read_and_convert(spec, "sft", tmp_path)
    assert report.kept == 1
    assert converted[0]["images"] == [str(folder / "media/a.jpg"), "https://example.com/dog.png"]
    assert converted[0]["videos"] == [str(folder / "media/b.mp4")]
    assert converted[0]["audios"] == [str(folder / "media/c.wav")]


# ---------------------------------------------------------------- every rule, named by file, sample, line and rule

ALPACA = {"file_name": "x.jsonl"}
SHAREGPT = {"file_name": "x.jsonl", "formatting": "sharegpt"}
OPENAI = {"file_name": "x.jsonl", "formatting": "openai"}
DPO = {**SHAREGPT, "ranking": True,
       "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}}
KTO = {**SHAREGPT, "columns": {"messages": "conversations", "kto_tag": "label"}}
MLLM = {**SHAREGPT, "columns": {"messages": "conversations", "images": "images"}}
A_GOOD = {"instruction": "q", "output": "a"}


def turns(*pairs):
    return [{"from": role, "value": value} for role, value in pairs]


S_GOOD = {"conversations": turns(("human", "q"), ("gpt", "a"))}
DPO_GOOD = {"conversations": turns(("human", "q")), "chosen": {"from": "gpt", "value": "good"},
            "rejected": {"from": "gpt", "value": "bad"}}
MLLM_GOOD = {"conversations": turns(("human", "<image>q"), ("gpt", "a")), "images": ["img.jpg"]}
CALL = {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "{}"}},
                                                           {"function": {"name": "g", "arguments": "{}"}}]}

#: rule -> (dataset_info entry, stage, a valid row, a row breaking the rule)
RULE_CASES = {
    "malformed messages": (SHAREGPT, "sft", S_GOOD, {"conversations": ["q", "a"]}),
    "unknown role": (SHAREGPT, "sft", S_GOOD, {"conversations": turns(("alien", "q"), ("gpt", "a"))}),
    "not text": (ALPACA, "sft", A_GOOD, {"instruction": "q", "output": ["a"]}),
    "no messages": (SHAREGPT, "sft", S_GOOD, {"conversations": []}),
    "system turn not first": (SHAREGPT, "sft", S_GOOD,
                              {"conversations": turns(("human", "q"), ("system", "s"), ("gpt", "a"))}),
    "roles not alternating": (SHAREGPT, "sft", S_GOOD, {"conversations": turns(("gpt", "a"), ("human", "q"))}),
    "several tool results in a row": (OPENAI, "sft", {"messages": [user("q"), assistant("a")]}, {"messages": [
        user("q"), CALL, {"role": "tool", "content": "1"}, {"role": "tool", "content": "2"}, assistant("a")]}),
    "assistant turn missing": (SHAREGPT, "sft", S_GOOD, {"conversations": turns(("human", "q"))}),
    "prompt ends with a reply": (DPO, "dpo", DPO_GOOD, {**DPO_GOOD, "conversations": turns(("human", "q"),
                                                                                          ("gpt", "a"))}),
    "empty response": (ALPACA, "sft", A_GOOD, {"instruction": "q", "output": "  "}),
    "missing value": (DPO, "dpo", DPO_GOOD, {**DPO_GOOD, "chosen": None}),
    "not a reply": (DPO, "dpo", DPO_GOOD, {**DPO_GOOD, "chosen": {"from": "human", "value": "good"}}),
    "chosen equals rejected": (DPO, "dpo", DPO_GOOD, {**DPO_GOOD, "rejected": {"from": "gpt", "value": "good"}}),
    "kto tag not boolean": (KTO, "kto", {**S_GOOD, "label": True}, {**S_GOOD, "label": "maybe"}),
    "bad history": ({**ALPACA, "columns": {"prompt": "instruction", "response": "output", "history": "history"}},
                    "sft", {**A_GOOD, "history": [["q0", "a0"]]},
                    {**A_GOOD, "history": [["q0"]]}),
    "invalid tool call": (SHAREGPT, "sft", S_GOOD, {"conversations": turns(
        ("human", "q"), ("function_call", '{"name": "f", "arguments": '), ("observation", "r"), ("gpt", "a"))}),
    "invalid tools": ({**SHAREGPT, "columns": {"messages": "conversations", "tools": "tools"}}, "sft",
                      {**S_GOOD, "tools": "[]"},
                      {**S_GOOD, "tools": "not json"}),
    "placeholder count mismatch": (MLLM, "sft", MLLM_GOOD, {**MLLM_GOOD, "images": ["img.jpg", "img.jpg"]}),
    "media not a path": (MLLM, "sft", MLLM_GOOD, {**MLLM_GOOD, "images": [7]}),
    "media file not found": (MLLM, "sft", MLLM_GOOD, {**MLLM_GOOD, "images": ["gone.jpg"]}),
    "empty text": ({"file_name": "x.jsonl", "columns": {"prompt": "text"}}, "pt", {"text": "doc"}, {"text": " "}),
}


def test_every_rule_has_a_case():
    assert set(RULE_CASES) == set(RULES)


@pytest.mark.parametrize("rule", sorted(RULE_CASES))
def test_a_broken_sample_is_skipped_and_named_by_file_sample_line_and_rule(rule, tmp_path):
    entry, stage, good, bad = RULE_CASES[rule]
    folder = write(tmp_path / "d", {"x.jsonl": [good, good, bad], "img.jpg": b"\xff\xd8"}, info={"x": entry})
    (spec,) = resolve_datasets(["x"], folder, stage=stage)
    _, report = read_and_convert(spec, stage, tmp_path)
    assert (report.total, report.kept) == (3, 2)
    assert report.skipped == {rule: RuleCount(1, f"{folder / 'x.jsonl'}, sample 2 (line 3)", ANY)}
    assert f"1 skipped: {rule} (first at {folder / 'x.jsonl'}, sample 2 (line 3)" in report.summary()


def test_strict_mode_refuses_the_first_invalid_sample(tmp_path):
    rows = [A_GOOD, {"instruction": "q"}, {"instruction": "q", "output": ""}]
    folder = write(tmp_path / "d", {"x.json": rows}, info={"x": ALPACA | {"file_name": "x.json"}})
    (spec,) = resolve_datasets(["x"], folder)
    with pytest.raises(DataError, match=rf"dataset 'x': {folder / 'x.json'}, sample 1 \(line 6\): assistant turn "
                                        rf"missing: the last turn is user \(.*\); `strict_data: true` refuses"):
        read_and_convert(spec, "sft", tmp_path, strict=True)
    assert read_and_convert(spec, "sft", tmp_path)[1].kept == 1


def test_nothing_left_names_every_rule_with_counts_and_first_samples(tmp_path):
    rows = [{"conversations": turns(("gpt", "a"))}, {"conversations": turns(("human", "q"), ("gpt", ""))},
            {"conversations": turns(("human", "q"), ("gpt", " "))}]
    folder = write(tmp_path / "d", {"bad.jsonl": rows}, info={"bad": SHAREGPT | {"file_name": "bad.jsonl"}})
    (spec,) = resolve_datasets(["bad"], folder)
    with pytest.raises(DataError, match=rf"none of its 3 samples is usable as `formatting: sharegpt` for stage sft: "
                                        rf"2 empty response \(.*; first at {folder / 'bad.jsonl'}, sample 1 "
                                        rf"\(line 2\): turn 2\); 1 roles not alternating \(.*; first at .*sample 0 "
                                        rf"\(line 1\): turn 1 is assistant, expected user or tool\)"):
        read_and_convert(spec, "sft", tmp_path)


def rows_of(instructions):
    return [{"instruction": text, "output": "a"} for text in instructions]


def test_locations_match_the_rows_datasets_reads(tmp_path):
    """Every sample's named file and line hold the row `datasets` read at that index (folders in file order, blank
    lines skipped, a csv field spanning lines, a JSON array's elements)."""
    from datasets import load_dataset

    folder = write(tmp_path / "d", {
        "parts/1.jsonl": rows_of(["p0", "p1"]),
        "parts/2.jsonl": "\n".join(["", json.dumps(rows_of(["p2"])[0]), "", json.dumps(rows_of(["p3"])[0])]),
        "table.csv": 'instruction,output\nc0,a\n\n"c1 spans\nlines",a\nc2,a\n',
        "array.json": "[\n" + ",\n\n".join(json.dumps(row) for row in rows_of(["j0", "j1", "j2"])) + "\n]",
        "doc.txt": "t0\n\nt2\n"},
        info={name: {"file_name": file} for name, file in
              [("parts", "parts"), ("table", "table.csv"), ("array", "array.json"), ("text", "doc.txt")]})
    for spec in resolve_datasets(["parts", "table", "array", "text"], folder):
        column = "text" if spec.builder() == "text" else "instruction"
        read = load_dataset(spec.builder(), data_files=[str(f) for f in spec.files()], split="train",
                            cache_dir=str(tmp_path / "cache"))[column]
        for index, value in enumerate(read):
            where = SampleLocator(spec)(index)
            path, line = re.fullmatch(r"(.*), sample \d+ \(line (\d+)\)", where).groups()
            assert value.split("\n")[0] in Path(path).read_text().split("\n")[int(line) - 1], (where, value)
    assert SampleLocator(spec)(1) == f"{folder / 'doc.txt'}, sample 1 (line 2)"  # an empty line is a text sample


def test_locations_of_resampled_rows_and_hub_samples(tmp_path):
    folder = write(tmp_path, {"array.json": rows_of(["j0", "j1", "j2"])},
                   info={"array": {"file_name": "array.json"}, "hub": {"hf_hub_url": "someone/data", "split": "test"}})
    array, hub = resolve_datasets(["array", "hub"], folder)
    # num_samples resampled the file: position 0 of the rules is row 2 of the file
    report = check_dataset(array, ["empty response", "", ""], stage="sft", rows=[2, 0, 1])
    assert report.skipped["empty response"].first == f"{folder / 'array.json'}, sample 2 (line 10)"
    assert SampleLocator(hub)(5) == "hf://someone/data (split test), sample 5"


# ---------------------------------------------------------------- JSON files that do not parse


def test_json_errors_name_file_line_and_column(tmp_path):
    folder = write(tmp_path, {
        "doc.json": '[\n  {"instruction": "q", "output": "a"},\n  {"instruction": "q" "output": "a"}\n]\n',
        "lines.jsonl": '{"instruction": "q", "output": "a"}\n\n{"instruction": "q", "output": "a",}\n',
        "scalars.jsonl": '{"instruction": "q", "output": "a"}\n"just text"\n',
        "good.jsonl": '{"a": 1}\n{"a": 2}\n', "good.json": '[{"a": 1},\n {"a": 2}]',
        "mixed.json": '[\n  {"a": 1},\n\n  "text"\n]\n'})
    assert find_json_error([folder / "doc.json"]) == f"{folder / 'doc.json'}:3:23: invalid JSON: Expecting ',' " \
                                                     f"delimiter"
    assert find_json_error([folder / "good.jsonl", folder / "lines.jsonl"]) == \
        f"{folder / 'lines.jsonl'}:3:36: invalid JSON line: Expecting property name enclosed in double quotes"
    assert find_json_error([folder / "scalars.jsonl"]).startswith(f"{folder / 'scalars.jsonl'}:2: sample 1 is str, "
                                                                  f"not an object")
    assert find_json_error([folder / "good.jsonl"]) is None
    # An array of objects, read without looking for lines; one sample that is not an object, named by its line.
    assert find_json_error([folder / "good.json"]) is None
    assert find_json_error([folder / "mixed.json"]).startswith(f"{folder / 'mixed.json'}:4: sample 1 is str, not an "
                                                               f"object")
    assert json_records(folder / "good.jsonl") == [(1, {"a": 1}), (2, {"a": 2})]


def test_datasets_cannot_read_what_find_json_error_reports(tmp_path):
    """The reported problems are real: `datasets` refuses both files (so the loader asks find_json_error why)."""
    from datasets import load_dataset

    from datasets.exceptions import DatasetGenerationError

    folder = write(tmp_path, {"doc.json": '[{"a": 1}, {"a": 2]', "scalars.jsonl": '{"a": 1}\n"text"\n'})
    for name in ("doc.json", "scalars.jsonl"):
        with pytest.raises(DatasetGenerationError):
            load_dataset("json", data_files=[str(folder / name)], split="train", cache_dir=str(tmp_path / "c"))
        assert find_json_error([folder / name]) is not None


# ---------------------------------------------------------------- dataset_info.json


def test_unknown_dataset_gets_did_you_mean(tmp_path):
    folder = write(tmp_path, {"identity.json": [A_GOOD]}, info={"identity": {"file_name": "identity.json"}})
    with pytest.raises(DataError, match=r"dataset_info.json: no dataset named 'identiy' \(and no such file\); did you "
                                        r"mean 'identity'"):
        resolve_datasets(["identiy"], folder)


@pytest.mark.parametrize(("entry", "message"), [
    ({"file_name": "missing.json"}, "file not found: .*missing.json"),
    ({"file_name": "b.json", "formating": "alpaca"}, r"unknown key `formating` \(did you mean `formatting`\?\)"),
    ({"file_name": "b.json", "columns": {"prompts": "q"}}, r"unknown `columns` key `prompts` \(did you mean `prompt`"),
    ({"file_name": "b.json", "columns": {"prompt": 3}}, "`columns` key `prompt` must name a column or tag as a string"),
    ({"file_name": "b.json", "formatting": "chatml"}, "`formatting: chatml` is not one of alpaca, sharegpt, openai"),
    ({"file_name": "b.json", "ranking": True}, "`ranking: true` needs `columns.chosen` and `columns.rejected`"),
    ({"file_name": "b.json", "ranking": "yes"}, "`ranking` must be true or false"),
    ({"file_name": "b.json", "formatting": "sharegpt", "tags": {"user_tag": "u"}},
     "`tags` needs `role_tag` and `content_tag`"),
    ({"file_name": "b.json", "num_samples": 0}, "`num_samples` must be a positive integer"),
    ({"file_name": "b.json", "subset": "en"}, "`subset` applies to hub datasets"),
    ({"file_name": "b.json", "split": "test"}, "local files have only a `train` split"),
    ({"file_name": "b.xml"}, "cannot read '.xml' files"),
    ({"file_name": "mixed"}, "mixes file types"),
    ({"script_url": "x"}, "loading scripts are not supported"),
    ({"om_hub_url": "x/y"}, "Modelers hub datasets are not supported"),
    ({"formatting": "alpaca"}, "needs `file_name`"),
])
def test_entry_problems_are_named(tmp_path, entry, message):
    folder = write(tmp_path, {"b.json": [A_GOOD], "b.xml": "<x/>", "mixed/a.json": [A_GOOD], "mixed/b.csv": "a\n1\n"},
                   info={"d": entry})
    with pytest.raises(DataError, match=rf"dataset_info.json: dataset 'd': (.* )?{message}"):
        resolve_datasets(["d"], folder)


def test_problems_of_several_names_are_reported_together(tmp_path):
    folder = write(tmp_path, {}, info={"a": {"file_name": "gone.json"}})
    with pytest.raises(DataError) as err:
        resolve_datasets(["a", "b"], folder)
    assert "file not found" in str(err.value) and "no dataset named 'b'" in str(err.value)
    (tmp_path / "dataset_info.json").write_text('{\n  "a": {"file_name": "x.json",}\n}')
    with pytest.raises(DataError, match=r"dataset_info.json:2:31: invalid JSON"):
        resolve_datasets(["a"], tmp_path)


def test_hub_entries_pick_their_hub_and_fail_offline_with_the_reason(tmp_path, monkeypatch):
    folder = write(tmp_path, {}, info={"both": {"hf_hub_url": "a/hf", "ms_hub_url": "a/ms", "subset": "en"},
                                       "ms": {"ms_hub_url": "b/ms"}})
    both, ms = resolve_datasets(["both", "ms"], folder)
    assert (both.hub, both.hub_url, both.subset, both.where) == ("hf", "a/hf", "en", "hf://a/hf")
    assert (ms.hub, ms.hub_url) == ("ms", "b/ms")
    monkeypatch.setenv("USE_MODELSCOPE_HUB", "1")
    assert resolve_datasets(["both"], folder)[0].hub_url == "a/ms"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=r"'both' is on the Hugging Face hub \(a/hf\), which is not reachable: "
                                        r"HF_HUB_OFFLINE is set"):
        read_hub_dataset(both)


@pytest.mark.skipif(importlib.util.find_spec("modelscope") is not None, reason="modelscope is installed")
def test_modelscope_datasets_without_modelscope_say_what_to_install(tmp_path):
    (ms,) = resolve_datasets(["ms"], write(tmp_path, {}, info={"ms": {"ms_hub_url": "b/ms"}}))
    with pytest.raises(DataError, match=r"ModelScope hub \(b/ms\), which needs the `modelscope` package"):
        read_hub_dataset(ms)


@pytest.mark.parametrize(("entry", "stage", "refused"), [
    (DPO, "sft", "is a preference dataset .*; stage sft trains on a dataset without `ranking` or `kto_tag`"),
    (KTO, "sft", "is a KTO dataset"),
    (SHAREGPT, "dpo", "stage dpo trains on a preference dataset"),
    (SHAREGPT, "kto", "stage kto trains on a KTO dataset"),
    (DPO, "pt", "stage pt trains on a dataset without"),
    (SHAREGPT, "predict", "stage 'predict' has no data format; expected one of pt, sft, rm, dpo, orpo, simpo"),
    (DPO, "ppo", None), (KTO, "ppo", None), (SHAREGPT, "grpo", None), (DPO, "rm", None), (DPO, "simpo", None),
])
def test_stages_take_the_dataset_kinds_they_train_on(tmp_path, entry, stage, refused):
    folder = write(tmp_path, {"x.jsonl": []}, info={"x": entry})
    (spec,) = resolve_datasets(["x"], folder)
    if refused is None:
        check_stage(spec, stage)
        assert resolve_datasets(["x"], folder, stage=stage) == [spec]
    else:
        with pytest.raises(DataError, match=f"(dataset 'x' .*)?{refused}"):
            resolve_datasets(["x"], folder, stage=stage)


def test_a_column_missing_from_the_file_is_named_with_the_columns_it_has():
    default = DatasetSpec(name="x", info_path=Path("dataset_info.json"), path=Path("x.json"))
    with pytest.raises(DataError, match=r"dataset 'x' \(x.json\): no column 'output' \(the default column for "
                                        r"`response`\); its columns are instruction, sys"):
        check_columns(default, ["instruction", "sys"], "sft")
    check_columns(default, ["instruction", "sys"], "prompt")  # prompts need no response
    declared = DatasetSpec(name="x", info_path=Path("dataset_info.json"), path=Path("x.json"),
                           columns={"prompt": "q", "response": "a", "system": "sys"})
    with pytest.raises(DataError, match=r"no column 'sys' \(`columns.system`\)"):
        check_columns(declared, ["q", "a"], "sft")


# ---------------------------------------------------------------- data files named directly

SHAREGPT_ROW = {"conversations": turns(("human", "q"), ("gpt", "a")), "system": "s", "tools": "[]"}


@pytest.mark.parametrize(("name", "content", "formatting", "columns"), [
    ("a.json", [{"instruction": "q", "input": "", "output": "a", "history": []}], "alpaca",
     {"prompt": "instruction", "response": "output", "query": "input", "history": "history"}),
    ("qa.jsonl", [{"question": "q", "answer": "a", "system": "s"}], "alpaca",
     {"prompt": "question", "response": "answer", "system": "system"}),
    ("s.jsonl", [SHAREGPT_ROW], "sharegpt", {"messages": "conversations", "system": "system", "tools": "tools"}),
    ("o.jsonl", [{"messages": [user("q"), assistant("a")]}], "openai", {"messages": "messages"}),
    ("t.txt", "one document\nanother\n", "alpaca", {"prompt": "text"}),
    ("c.csv", "instruction,output\nq,a\n", "alpaca", {"prompt": "instruction", "response": "output"}),
    ("p.jsonl", [DPO_GOOD], "sharegpt", {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}),
    ("k.jsonl", [{"messages": [user("q"), assistant("a")], "label": False}], "openai",
     {"messages": "messages", "kto_tag": "label"}),
    ("m.jsonl", [{"messages": [user("<image>q"), assistant("a")], "images": ["x.jpg"]}], "openai",
     {"messages": "messages", "images": "images"}),
])
def test_a_file_named_directly_gets_its_format_detected(tmp_path, name, content, formatting, columns):
    write(tmp_path / "data", {name: content})
    spec = spec_for_path(tmp_path / "data" / name)
    assert (spec.formatting, spec.columns, spec.info_path) == (formatting, columns, None)
    assert spec.ranking == ("chosen" in columns) and spec.media_dir == tmp_path / "data"


def test_parquet_and_arrow_files_are_detected_and_read(tmp_path):
    import datasets

    table = datasets.Dataset.from_list([SHAREGPT_ROW, SHAREGPT_ROW])
    table.to_parquet(str(tmp_path / "s.parquet"))
    with datasets.arrow_writer.ArrowWriter(path=str(tmp_path / "s.arrow")) as writer:
        writer.write_table(table.data.table)
    for name in ("s.parquet", "s.arrow"):
        spec = spec_for_path(tmp_path / name)
        assert spec.formatting == "sharegpt" and spec.columns["messages"] == "conversations"
        converted, report = read_and_convert(spec, "sft", tmp_path)
        assert report.kept == 2 and converted[0]["system"] == "s"
        assert SampleLocator(spec)(1) == f"{tmp_path / name}, sample 1"


def test_dataset_names_may_be_paths_beside_registered_names(tmp_path, monkeypatch):
    folder = write(tmp_path / "data", {"mine.jsonl": [S_GOOD], "reg.json": [A_GOOD]},
                   info={"reg": {"file_name": "reg.json"}, "mine.jsonl": {"file_name": "reg.json"}})
    monkeypatch.chdir(tmp_path)
    by_dir, by_cwd, registered = resolve_datasets(["reg", "data/mine.jsonl", "mine.jsonl"], folder)
    assert (by_dir.info_path, by_dir.formatting) == (folder / "dataset_info.json", "alpaca")
    assert (by_cwd.name, by_cwd.path, by_cwd.formatting) == ("data/mine.jsonl", Path("data/mine.jsonl"), "sharegpt")
    assert registered.path == folder / "reg.json"  # a registered name wins over a file of that name
    # without any dataset_info.json, paths still work and names are refused with the reason
    assert resolve_datasets(["data/mine.jsonl"], tmp_path / "nowhere")[0].formatting == "sharegpt"
    with pytest.raises(DataError, match="dataset 'reg': not a file or folder, and there is no .*dataset_info.json"):
        resolve_datasets(["reg"], tmp_path / "nowhere")


def test_undetectable_files_say_what_was_expected(tmp_path):
    write(tmp_path, {"x.jsonl": [{"foo": 1, "bar": 2}], "y.jsonl": [{"conversations": [{"speaker": "a"}]}],
                     "z.json": "[]"})
    with pytest.raises(DataError, match=r"x.jsonl: cannot tell the format from the columns of sample 0 \(foo, bar\): "
                                        r"expected conversations or messages"):
        spec_for_path(tmp_path / "x.jsonl")
    with pytest.raises(DataError, match="neither from/value \\(sharegpt\\) nor role/content"):
        spec_for_path(tmp_path / "y.jsonl")
    with pytest.raises(DataError, match="z.json: holds no samples"):
        spec_for_path(tmp_path / "z.json")


# ---------------------------------------------------------------- LLaMA-Factory's demo data, unchanged

#: dataset kind -> the stage that trains on it (pre-training text goes to pt)
STAGE_OF = {"plain": "sft", "preference": "dpo", "kto": "kto"}


#: Hub entries of LLaMA-Factory's dataset_info.json that declare `ranking` without chosen/rejected columns, which
#: LLaMA-Factory cannot read either (its converter looks up a column named None).
BROKEN_LF_ENTRIES = ("nectar_rm", "orca_dpo_de")


@needs_lf_data
def test_every_llama_factory_entry_resolves():
    info = json.loads((LF_DATA / "dataset_info.json").read_text())
    specs = resolve_datasets([name for name in info if name not in BROKEN_LF_ENTRIES], LF_DATA)
    local = [s for s in specs if s.path is not None]
    assert len(specs) == len(info) - len(BROKEN_LF_ENTRIES) and len(local) == 14
    assert {s.kind for s in local} == {"plain", "preference", "kto"}
    for name in BROKEN_LF_ENTRIES:
        with pytest.raises(DataError, match="`ranking: true` needs `columns.chosen` and `columns.rejected`"):
            resolve_datasets([name], LF_DATA)


@needs_lf_data
def test_every_local_llama_factory_dataset_converts_without_losing_a_sample(tmp_path):
    info = json.loads((LF_DATA / "dataset_info.json").read_text())
    local = [s for s in resolve_datasets([n for n in info if "file_name" in info[n]], LF_DATA)]
    seen = {}
    for spec in local:
        stage = "pt" if spec.column("prompt") == "text" else STAGE_OF[spec.kind]
        converted, report = read_and_convert(spec, stage, tmp_path)
        assert report.skipped == {}, (spec.name, report.summary())
        seen[spec.name] = converted
    calls = [m for row in seen["glaive_toolcall_en_demo"] for m in row["messages"] if m["role"] == "tool_call"]
    assert calls and all(json.loads(c["content"])[0]["name"] for c in calls)
    assert seen["glaive_toolcall_en_demo"][0]["tools"].startswith('[{"type": "function"')
    assert all(Path(p).is_file() and p.startswith(str(LF_DATA)) for row in seen["mllm_demo"] for p in row["images"])
    assert seen["mllm_video_audio_demo"][0]["videos"] and seen["mllm_video_audio_demo"][0]["audios"]
    assert {row["kto_tag"] for row in seen["kto_en_demo"]} == {True, False}
    assert all(row["chosen"]["content"] != row["rejected"]["content"] for row in seen["dpo_en_demo"])
    assert len(seen["wiki_demo"]) == 30 and seen["c4_demo"][0]["text"].startswith("Don")


def test_importing_the_data_layer_stays_light():
    code = ("import sys, tunelab.data.registry, tunelab.data.formats, tunelab.data.validation; "
            "print(sorted(m for m in ('datasets', 'transformers', 'torch', 'numpy', 'pyarrow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
