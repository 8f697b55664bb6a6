"""The data layer through the loader: files, masks, truncation, pt chunks, splits, demo data.

Formats, validation and dataset_info.json entries are tested in tests/data/test_data_formats.py.

    .venv/bin/python -m pytest tests/data/test_data.py -q

Processing tests use the tiny tokenizer (ChatML, eos <|im_end|>, no bos) from conftest's `tiny_model_dir`; the
LLaMA-Factory demo data and the bos-adding Llama tokenizer come from ../shared and are skipped without it.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tunelab.config import load_config
from tunelab.data import DataError, get_template, load_datasets, resolve_datasets
from tunelab.data.stats import describe_example
from tunelab.data.processing import IGNORE_INDEX, chunk_documents, fit_turn, sft_example
from helpers import REPO, SHARED

LF_DATA = SHARED / "lf_data"
LLAMA = SHARED / "tokenizers" / "llama-3.2-instruct"
ALPACA = "alpaca"


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def make_config(tmp_path, **keys):
    values = {"model_name_or_path": "m", "dataset_dir": str(REPO / "data"), "cache_dir": str(tmp_path / "cache"),
              "template": "chatml", "cutoff_len": 256, **keys}
    return load_config(values)


def write_data(folder: Path, info: dict, files: dict[str, object]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dataset_info.json").write_text(json.dumps(info))
    for name, content in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content if isinstance(content, str) else json.dumps(content, ensure_ascii=False))
    return folder


def load(tmp_path, tok, **keys):
    config = make_config(tmp_path, **keys)
    template = get_template(config, tok) if config.stage == "sft" else None
    return load_datasets(config, tok, template)


# ---------------------------------------------------------------- files


def test_bad_json_names_file_line_and_column(tmp_path, tok):
    folder = write_data(tmp_path / "d", {"doc": {"file_name": "doc.json"}, "lines": {"file_name": "lines.jsonl"}}, {
        "doc.json": '[\n  {"instruction": "q", "output": "a"},\n  {"instruction": "q" "output": "a"}\n]\n',
        "lines.jsonl": '{"instruction": "q", "output": "a"}\n{"instruction": "q" "output": "a"}\n'})
    with pytest.raises(DataError, match=r"doc.json:3:23: invalid JSON"):
        load(tmp_path, tok, dataset="doc", dataset_dir=str(folder))
    with pytest.raises(DataError, match=r"lines.jsonl:2:21: invalid JSON line"):
        load(tmp_path, tok, dataset="lines", dataset_dir=str(folder))


def test_hub_dataset_offline_says_why(tmp_path, tok, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = write_data(tmp_path / "d", {"hub": {"hf_hub_url": "someone/some-data"}}, {})
    with pytest.raises(DataError, match="someone/some-data.*not reachable: HF_HUB_OFFLINE is set"):
        load(tmp_path, tok, dataset="hub", dataset_dir=str(folder))


def test_folder_csv_and_parquet_files_load(tmp_path, tok):
    import datasets

    parquet = tmp_path / "d" / "p.parquet"
    parquet.parent.mkdir(parents=True)
    datasets.Dataset.from_list([{"instruction": "p", "output": "P"}]).to_parquet(str(parquet))
    folder = write_data(tmp_path / "d", {"folder": {"file_name": "parts"}, "csv": {"file_name": "c.csv"},
                                         "parquet": {"file_name": "p.parquet"}}, {
        "parts/1.jsonl": '{"instruction": "a", "output": "A"}\n',
        "parts/2.jsonl": '{"instruction": "b", "output": "B"}\n',
        "c.csv": "instruction,output\nc,C\nd,D\n"})
    splits = load(tmp_path, tok, dataset="folder,csv,parquet", dataset_dir=str(folder))
    assert len(splits.train) == 5


# ---------------------------------------------------------------- sft masks and truncation


def _trained(tok, row) -> list[str]:
    """The decoded runs of trained tokens of one tokenized row."""
    runs, current = [], []
    for token, label in zip(row["input_ids"], row["labels"]):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tok.decode(current))
            current = []
    return runs + ([tok.decode(current)] if current else [])


def test_masks_single_and_multi_turn(tmp_path, tok):
    splits = load(tmp_path, tok, dataset="sharegpt_demo,identity", max_samples=3)
    row = splits.train[0]  # sharegpt_demo 0: a two-turn conversation
    assert _trained(tok, row) == ["Start slowly: alternate one minute of running with two minutes of walking for "
                                  "20 minutes, three times a week.<|im_end|>\n",
                                  "With steady practice most beginners can run 5 km without stopping after 8 to 10 "
                                  "weeks.<|im_end|>\n"]
    single = splits.train[3]  # identity 0
    assert tok.decode(single["input_ids"]).startswith("<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant")
    assert _trained(tok, single) == ["I am Kestrel, an AI assistant trained by TuneLab. How can I help you today?"
                                     "<|im_end|>\n"]
    assert all(len(r["input_ids"]) == len(r["labels"]) == len(r["attention_mask"]) for r in splits.train)


def test_train_on_prompt_and_mask_history(tmp_path, tok):
    on_prompt = load(tmp_path, tok, dataset="sharegpt_demo", max_samples=2, train_on_prompt=True).train[0]
    assert on_prompt["labels"] == on_prompt["input_ids"]
    last_only = load(tmp_path, tok, dataset="sharegpt_demo", max_samples=2, mask_history=True).train[0]
    assert _trained(tok, last_only) == ["With steady practice most beginners can run 5 km without stopping after 8 "
                                        "to 10 weeks.<|im_end|>\n"]


def test_fit_turn_keeps_the_response_and_cuts_the_prompt_from_the_left():
    prompt, response = list(range(10)), [100, 101, 102]
    assert fit_turn(prompt, response, 8) == ([5, 6, 7, 8, 9], response)
    assert fit_turn(prompt, response, 4) == ([9], response)
    # a response that fills the window alone: prompt end (at most half) + response start, never empty
    assert fit_turn(prompt, list(range(100, 120)), 6) == ([7, 8, 9], [100, 101, 102])
    assert fit_turn([], list(range(100, 120)), 3) == ([], [100, 101, 102])
    assert fit_turn(prompt, response, 1) == ([], [100])


def test_sft_example_truncation():
    pairs = [([1, 2], [3]), ([4, 5], [6, 7]), ([8], [9])]
    ids, labels = sft_example(pairs, 7)
    assert ids == [1, 2, 3, 4, 5, 6, 7] and labels == [-100, -100, 3, -100, -100, 6, 7]  # whole turns from the start
    assert sft_example(pairs, 6) == ([1, 2, 3], [-100, -100, 3])  # a turn that does not fit whole is left out
    ids, labels = sft_example([(list(range(50)), [90, 91])], 5)
    assert ids == [47, 48, 49, 90, 91] and labels == [-100, -100, -100, 90, 91]
    ids, labels = sft_example(pairs, 4, mask_history=True)  # the last reply, with the history cut from the left
    assert ids == [6, 7, 8, 9] and labels == [-100, -100, -100, 9]


def test_cutoff_len_holds_and_responses_survive(tmp_path, tok):
    splits = load(tmp_path, tok, dataset="alpaca_demo,sharegpt_demo", cutoff_len=24)
    assert len(splits.train) == 60
    for row in splits.train:
        assert len(row["input_ids"]) <= 24
        assert any(label != IGNORE_INDEX for label in row["labels"])


# ---------------------------------------------------------------- pt


def test_chunk_documents():
    chunks = chunk_documents([[1, 2, 3], [4, 5], [6, 7, 8, 9]], 4, eos_id=0)
    assert chunks == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]]
    assert chunk_documents([[1, 2, 3], [4]], 3, eos_id=0, bos_id=99) == [[99, 1, 2], [99, 3, 0], [99, 4, 0]]


def test_pt_chunks_are_cutoff_len_with_eos_between_documents(tmp_path, tok):
    splits = load(tmp_path, tok, dataset="pretrain_demo", stage="pt", cutoff_len=64, template=None)
    lengths = [len(ids) for ids in splits.train["input_ids"]]
    assert set(lengths[:-1]) == {64} and 0 < lengths[-1] <= 64
    stream = [i for ids in splits.train["input_ids"] for i in ids]
    documents = (REPO / "data" / "pretrain_demo.txt").read_text().splitlines()
    assert stream.count(tok.eos_token_id) == len(documents)
    assert tok.decode(stream).startswith(documents[0] + tok.eos_token + documents[1])
    assert all(row["labels"] == row["input_ids"] for row in splits.train)


@pytest.mark.skipif(not LLAMA.is_dir(), reason="../shared/tokenizers is not present")
def test_pt_adds_bos_per_chunk_when_the_tokenizer_does(tmp_path):
    from transformers import AutoTokenizer

    llama = AutoTokenizer.from_pretrained(LLAMA)
    splits = load(tmp_path, llama, dataset="pretrain_demo", stage="pt", cutoff_len=50, template=None)
    assert all(ids[0] == llama.bos_token_id and ids.count(llama.bos_token_id) == 1
               for ids in splits.train["input_ids"])


# ---------------------------------------------------------------- loading, sampling, splits


def test_max_samples_val_size_and_seed(tmp_path, tok):
    splits = load(tmp_path, tok, dataset="identity,alpaca_demo", max_samples=10, val_size=0.2)
    assert (len(splits.train), len(splits.eval)) == (16, 4)
    again = load(tmp_path, tok, dataset="identity,alpaca_demo", max_samples=10, val_size=0.2)
    assert again.eval["input_ids"] == splits.eval["input_ids"]
    other_seed = load(tmp_path, tok, dataset="identity,alpaca_demo", max_samples=10, val_size=0.2, seed=7)
    assert other_seed.eval["input_ids"] != splits.eval["input_ids"]
    counted = load(tmp_path, tok, dataset="identity", val_size=5)
    assert (len(counted.train), len(counted.eval)) == (31, 5)
    with pytest.raises(DataError, match="leaves nothing to train on"):
        load(tmp_path, tok, dataset="identity", val_size=36)


def test_eval_dataset_and_num_samples(tmp_path, tok):
    splits = load(tmp_path, tok, dataset="identity", eval_dataset="sharegpt_demo")
    assert (len(splits.train), len(splits.eval)) == (36, 20)
    info = json.loads((REPO / "data" / "dataset_info.json").read_text())
    info["identity"]["num_samples"] = 50
    folder = write_data(tmp_path / "d", info, {})
    (folder / "identity.json").write_text((REPO / "data" / "identity.json").read_text())
    assert len(load(tmp_path, tok, dataset="identity", dataset_dir=str(folder)).train) == 50


def test_workers_give_the_same_result(tmp_path, tok):
    one = load(tmp_path / "a", tok, dataset="alpaca_demo")
    two = load(tmp_path / "b", tok, dataset="alpaca_demo", preprocessing_num_workers=2)
    assert one.train["input_ids"] == two.train["input_ids"] and one.train["labels"] == two.train["labels"]


def test_describe_example_marks_the_trained_part(tmp_path, tok):
    row = load(tmp_path, tok, dataset="identity", max_samples=1).train[0]
    assert describe_example(row, tok) == ("<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\n"
                                          "⟦I am Kestrel, an AI assistant trained by TuneLab. How can I help you "
                                          "today?<|im_end|>\n⟧")


@pytest.mark.skipif(not LF_DATA.is_dir(), reason="../shared/lf_data is not present")
@pytest.mark.parametrize("template", ["qwen", None])
def test_llama_factory_demo_data_loads(tmp_path, template):
    from transformers import AutoTokenizer

    qwen = AutoTokenizer.from_pretrained(SHARED / "tokenizers" / "qwen2.5-instruct")
    config = make_config(tmp_path, dataset_dir=str(LF_DATA), dataset="alpaca_en_demo,identity,glaive_toolcall_en_demo",
                         template=template, max_samples=60, cutoff_len=1024)
    splits = load_datasets(config, qwen, get_template(config, qwen))
    assert len(splits.train) == 180
    calls = [row for row in splits.train if "<tool_call>" in qwen.decode(row["input_ids"])]
    assert calls and "# Tools" in qwen.decode(calls[0]["input_ids"])


def test_importing_the_registry_stays_light():
    code = ("import sys, tunelab.data.registry, tunelab.data; "
            "print(sorted(m for m in ('datasets', 'transformers', 'torch', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---------------------------------------------------------------- shipped demo data


def test_demo_data_is_registered_and_consistent():
    info = json.loads((REPO / "data" / "dataset_info.json").read_text())
    assert {"identity", "alpaca_demo", "sharegpt_demo", "pretrain_demo"} <= set(info)
    specs = resolve_datasets(list(info), REPO / "data")
    assert [s.formatting for s in specs][:3] == [ALPACA, ALPACA, "sharegpt"]
    identity = json.loads((REPO / "data" / "identity.json").read_text())
    assert 30 <= len(identity) <= 40
    assert all("Kestrel" in row["output"] and "TuneLab" in row["output"] for row in identity)
    assert len({row["instruction"] for row in identity}) == len(identity)
    sharegpt = json.loads((REPO / "data" / "sharegpt_demo.json").read_text())
    assert len(sharegpt) == 20 and sum(c["conversations"][0]["from"] == "system" for c in sharegpt) >= 5
    assert len(json.loads((REPO / "data" / "alpaca_demo.json").read_text())) == 40
    assert 2000 < (REPO / "data" / "pretrain_demo.txt").stat().st_size < 20000
