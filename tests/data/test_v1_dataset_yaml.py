"""LLaMA-Factory v1 dataset yamls in the data registry: each entry a dataset with its converter's columns, `size` and
`weight` as the number of samples, paths as v1 resolves them, and what tunelab would read otherwise refused by
yaml, entry and key.

    .venv/bin/python -m pytest tests/data/test_v1_dataset_yaml.py -q
"""

import json
import textwrap
from pathlib import Path

import pytest

import tunelab
from tunelab.config import load_config
from tunelab.data import DataError, get_template, load_datasets, resolve_datasets
from helpers import REPO, read_log

IDENTITY = REPO / "data" / "identity.json"


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """A working directory laid out as LLaMA-Factory's repository: data files under data/, the yaml beside them."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    return tmp_path


def write_rows(path: Path, rows: list[dict], lines: bool = False) -> None:
    path.write_text("\n".join(map(json.dumps, rows)) if lines else json.dumps(rows))


def write_yaml(folder: Path, text: str) -> Path:
    path = folder / "data" / "v1.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def problems_of(path: Path, stage: str | None = None) -> str:
    with pytest.raises(DataError) as info:
        resolve_datasets([str(path)], "data", stage)
    return str(info.value)


def alpaca_rows(count: int) -> list[dict]:
    return [{"instruction": f"q{i}", "input": "", "output": f"a{i}", "history": []} for i in range(count)]


# ------------------------------------------------------------------ entries -> datasets


def test_entries_become_datasets_with_the_columns_their_converter_reads(folder):
    write_rows(folder / "data" / "a.json", [{"system": "s", "instruction": "q", "output": "a", "history": []}])
    write_rows(folder / "data" / "c.jsonl", [{"conversations": [{"from": "human", "value": "q"}], "system": "s",
                                              "tools": "[]"}], lines=True)
    path = write_yaml(folder, """
        chats: {path: data/c.jsonl, source: local, converter: sharegpt, split: train, streaming: false}
        qa: {path: data/a.json, source: local, converter: alpaca}
    """)
    chats, qa = resolve_datasets([str(path)], "data", stage="sft")
    assert (chats.name, chats.formatting, chats.path, chats.num_samples) == ("chats", "sharegpt", Path("data/c.jsonl"),
                                                                            None)
    # v1's sharegpt converter reads conversations and tools, not a `system` column; its alpaca one reads system,
    # instruction, input and output, not `history`. Columns a file lacks (input) are not read.
    assert chats.columns == {"messages": "conversations", "tools": "tools"}
    assert (qa.formatting, qa.columns) == ("alpaca", {"prompt": "instruction", "response": "output",
                                                      "system": "system"})


@pytest.mark.parametrize("keys, rows, expected", [
    ("size: 5", 8, 5),
    ("size: 20", 8, 20),                    # more than the file: v1 draws with replacement, tunelab repeats
    ("size: 5, weight: 2.0", 8, 10),        # v1: weight x the `size` drawn
    ("weight: 0.5", 8, 4),                  # v1: weight x the dataset's length
    ("weight: 1.3", 8, 10),                 # int(8 x 1.3), as v1 rounds
])
def test_size_and_weight_give_the_number_of_samples(folder, keys, rows, expected):
    write_rows(folder / "data" / "a.json", alpaca_rows(rows))
    write_rows(folder / "data" / "b.jsonl", alpaca_rows(rows), lines=True)
    path = write_yaml(folder, f"a: {{path: data/a.json, source: local, converter: alpaca, {keys}}}\n"
                              f"b: {{path: data/b.jsonl, source: local, converter: alpaca, {keys}}}\n")
    assert [spec.num_samples for spec in resolve_datasets([str(path)], "data")] == [expected, expected]


def test_paths_are_relative_to_the_working_directory_as_v1_opens_them(folder):
    """v1 hands `path` to `datasets.load_dataset` as it is: relative to where it runs, not to the yaml."""
    write_rows(folder / "data" / "a.json", alpaca_rows(2))
    path = write_yaml(folder, "a: {path: a.json, source: local, converter: alpaca}\n")  # beside the yaml only
    assert problems_of(path) == (f"{path}: `a.path` (relative to the working directory, as v1 reads it): file not "
                                 f"found: a.json")
    path.write_text("a: {path: data/a.json, source: local, converter: alpaca}\n")
    (spec,) = resolve_datasets(["data/v1.yaml"], "data")  # the yaml itself is found as any dataset path is
    assert spec.files() == [Path("data/a.json")]


# ------------------------------------------------------------------ refusals by yaml, entry and key


def test_every_problem_of_the_yaml_is_refused_at_once_by_entry_and_key(folder):
    write_rows(folder / "data" / "a.json", alpaca_rows(2))
    write_rows(folder / "data" / "c.json", [{"conversations": [{"from": "human", "value": "q"}]}])
    path = write_yaml(folder, """
        hub: {path: org/pairs, split: train_prefs, converter: pair}
        native: {path: data/a.json, source: local}
        odd: {path: data/a.json, source: local, converter: alpaca, sise: 5, size: 0, weight: -1, streaming: true}
        wrong: {path: data/c.json, source: local, converter: alpaca}
        nopath: {source: local}
        other: {path: data/a.json, source: local, converter: openai}
    """)
    refused = "(v1) is a LLaMA-Factory setting tunelab does not support"
    assert problems_of(path).splitlines() == [
        f"{path}: `hub.source: hf_hub` {refused} (tunelab reads hub datasets through dataset_info.json entries "
        f"(`hf_hub_url`), which a v1 config cannot name: download the files and list them with `source: local`)",
        f"{path}: `hub.converter: pair` {refused} (v1's pair layout holds chosen and rejected as whole conversations; "
        f"tunelab's preference data is a prompt with a chosen and a rejected reply)",
        f"{path}: `hub.split: train_prefs` {refused} (tunelab reads a local file's one split, train, and other "
        f"splits of hub datasets in dataset_info.json)",
        f"{path}: `native.converter: null` {refused} (without a `converter` v1 reads its own sample format (typed "
        f"content parts, `loss_weight`), which tunelab does not read; list alpaca or sharegpt files in a dataset "
        f"yaml with that `converter`)",
        f"{path}: unknown key `odd.sise` of a v1 dataset entry (did you mean `size`?)",
        f"{path}: `odd.streaming: true` {refused} (v1 cannot train on a stream: its batch generator raises "
        f"'Iterable dataset is not supported yet'; leave it out, and give tunelab's `streaming=true` to stream)",
        f"{path}: `odd.size` (v1): got 0; expected a positive integer",
        f"{path}: `odd.weight` (v1): got -1; expected a positive number",
        f"{path}: `wrong.converter: alpaca`: sample 0 of data/c.json has no `instruction` column, which v1's alpaca "
        f"converter reads",
        f"{path}: `nopath` (v1): expected an entry with a `path`, got {{'source': 'local'}}",
        f"{path}: `other.converter` (v1): got 'openai'; expected one of: alpaca, sharegpt, pair",
    ]


@pytest.mark.parametrize("text, message", [
    ("[a.json]\n", "expected dataset names mapped to entries (a LLaMA-Factory v1 dataset yaml), got ['a.json']"),
    ("a: {path: x\n", "invalid YAML: "),
    ("a: {path: data/a.json, source: local, converter: alpaca, weight: 0.1}\n",
     "`a.weight: 0.1` leaves no samples of the dataset"),  # int(2 x 0.1) = 0
])
def test_a_yaml_that_cannot_be_read_is_refused_naming_it(folder, text, message):
    write_rows(folder / "data" / "a.json", alpaca_rows(2))
    path = write_yaml(folder, text)
    assert message in problems_of(path) and problems_of(path).startswith(str(path))


def test_each_entry_must_suit_the_stage(folder):
    write_rows(folder / "data" / "a.json", alpaca_rows(2))
    path = write_yaml(folder, "a: {path: data/a.json, source: local, converter: alpaca}\n"
                              "b: {path: data/a.json, source: local, converter: alpaca}\n")
    problems = problems_of(path, stage="dpo").splitlines()
    assert [line.split(" (")[0] for line in problems] == ["dataset 'a'", "dataset 'b'"]
    assert "stage dpo trains on a preference dataset" in problems[0]


def test_the_demo_yaml_of_llamafactory_resolves_from_its_repository_layout(tmp_path, monkeypatch):
    """LLaMA-Factory's own data/v1_sft_demo.yaml: identity, and 500 of the 999 alpaca_en_demo samples."""
    lf_data = REPO.parent / "shared" / "lf_data"
    if not (lf_data / "v1_sft_demo.yaml").is_file():
        pytest.skip("LLaMA-Factory's demo data is not beside the repository")
    (tmp_path / "data").symlink_to(lf_data)
    monkeypatch.chdir(tmp_path)
    identity, alpaca = resolve_datasets(["data/v1_sft_demo.yaml"], "data", stage="sft")
    assert (identity.name, identity.num_samples, alpaca.name, alpaca.num_samples) == ("identity", None,
                                                                                      "alpaca_en_demo", 500)


# ------------------------------------------------------------------ a v1 config with `size` trains on `size` samples


def test_a_v1_config_trains_on_exactly_size_samples(folder, tiny_model_dir):
    from transformers import AutoTokenizer

    assert len(json.loads(IDENTITY.read_text())) == 36
    write_yaml(folder, f"identity: {{path: {IDENTITY}, source: local, converter: alpaca, size: 12}}\n")
    (folder / "v1.yaml").write_text(textwrap.dedent(f"""\
        model: {tiny_model_dir}
        peft_config: {{name: lora, r: 8, target_modules: all}}
        train_dataset: data/v1.yaml
        output_dir: out
        micro_batch_size: 4
        global_batch_size: 4
        num_train_epochs: 1
        cutoff_len: 96
        learning_rate: 1.0e-2
        bf16: false
    """))
    overrides = [("cache_dir", str(folder / "cache"))]
    config = load_config(folder / "v1.yaml", overrides)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    splits = load_datasets(config, tokenizer, get_template(config, tokenizer))
    (report,) = splits.reports
    assert len(splits.train) == 12 and report.validation.total == report.validation.kept == 12
    assert len({tuple(row["input_ids"]) for row in splits.train}) == 12  # 12 of 36: a subset, nothing repeated

    tunelab.train(folder / "v1.yaml", overrides)
    steps = [row for row in read_log(folder / "out") if "loss" in row]
    # One epoch of 12 samples, 4 a step: 3 steps (the whole file would take 9).
    assert [row["current_steps"] for row in steps] == [1, 2, 3] and steps[-1]["epoch"] == pytest.approx(1.0)
