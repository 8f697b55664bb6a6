"""The loader: the tokenized-data cache, tokenized_path, mixing, streaming, packing, statistics and `data preview`.

    .venv/bin/python -m pytest tests/data/test_data_loader.py -q

Whether a run tokenized is read from the loader's log: "dataset 'x' (...): n of m samples kept" is written only when
a dataset is read and tokenized, "loaded tokenized data from cache" only when the cache served the run. Expected
statistics are computed from the tokenizer's own `apply_chat_template`, never from the loader's output.
"""

import copy
import json
import logging
import math
import os
from pathlib import Path

import pytest

from tunelab.config import load_config
from tunelab.data import DataError, get_template, load_datasets, preview
from tunelab.data.cache import cache_folder, cache_key, cache_root, file_fingerprint
from tunelab.data.stats import measure
from tunelab.data.registry import resolve_datasets

BUILT = "samples kept"                   # logged per dataset when it is read and tokenized
FROM_CACHE = "loaded tokenized data from cache"


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def log(caplog):
    caplog.set_level(logging.INFO, logger="tunelab.data")
    return caplog


def qa_rows(prefix: str, count: int) -> list[dict]:
    return [{"instruction": f"question {prefix}{i}", "output": f"answer {prefix}{i}"} for i in range(count)]


def write_data(folder: Path, datasets: dict[str, list[dict]]) -> Path:
    """A dataset_dir with one alpaca json file per dataset."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dataset_info.json").write_text(json.dumps({name: {"file_name": f"{name}.json"} for name in datasets}))
    for name, rows in datasets.items():
        (folder / f"{name}.json").write_text(json.dumps(rows))
    return folder


def make_config(tmp_path: Path, folder: Path, **keys):
    return load_config({"model_name_or_path": "m", "dataset_dir": str(folder), "dataset": "a",
                        "cache_dir": str(tmp_path / "cache"), "template": "chatml", "cutoff_len": 128, **keys})


def load(config, tok):
    template = get_template(config, tok) if config.stage != "pt" else None
    return load_datasets(config, tok, template)


def answers(tok, data) -> list[str]:
    """The trained text of each row, end-of-turn markup left out: which sample each row is."""
    out = []
    for row in data:
        trained = [t for t, label in zip(row["input_ids"], row["labels"]) if label != -100]
        out.append(tok.decode(trained, skip_special_tokens=True).strip().removeprefix("answer "))
    return out


# ---------------------------------------------------------------- the cache


def test_second_identical_run_reads_the_cache(tmp_path, tok, log):
    folder = write_data(tmp_path / "d", {"a": qa_rows("a", 8)})
    config = make_config(tmp_path, folder, val_size=2)
    first = load(config, tok)
    assert BUILT in log.text and FROM_CACHE not in log.text
    log.clear()
    second = load(config, tok)
    assert FROM_CACHE in log.text and BUILT not in log.text
    for split in ("train", "eval"):
        assert getattr(second, split)[:] == getattr(first, split)[:]
    assert second.reports == first.reports
    assert len(list(cache_root(config).iterdir())) == 1


@pytest.mark.parametrize("stage", ["sft", "pt", "dpo"])
def test_the_cache_stores_tokens_narrow_and_batches_them_as_long(tmp_path, tok, stage):
    # Ids and labels are int32 on disk and the mask int8 (9 bytes a token, not int64's 24); the collator must still
    # hand the model int64 tensors, which the embedding and the loss take.
    import torch

    from tunelab.data.collator import DataCollator, PairwiseCollator

    rows = [{"instruction": f"q{i}", "output": f"answer {i}", "chosen": f"yes {i}", "rejected": f"no {i}"}
            for i in range(6)]
    info = {"a": {"file_name": "a.json", "ranking": stage == "dpo",
                  "columns": {"prompt": "instruction", "response": "output"} if stage != "dpo" else
                  {"prompt": "instruction", "chosen": "chosen", "rejected": "rejected"}}}
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "dataset_info.json").write_text(json.dumps(info))
    (folder / "a.json").write_text(json.dumps(rows))
    config = make_config(tmp_path, folder, stage=stage)
    load(config, tok)
    train = load(config, tok).train  # read back from the cache entry
    sequences = [name for name in train.features if name.endswith(("input_ids", "labels", "attention_mask"))]
    assert sequences
    for name in sequences:
        assert train.features[name].feature.dtype == ("int8" if name.endswith("attention_mask") else "int32"), name
    collate = PairwiseCollator(tok) if stage == "dpo" else DataCollator(tok)
    batch = collate([train[i] for i in range(min(3, len(train)))])  # pt: its documents may make one chunk
    assert {tensor.dtype for name, tensor in batch.items() if name in ("input_ids", "labels", "attention_mask")} \
        == {torch.int64}


def test_map_files_are_named_by_the_cache_key_without_pickling_the_tokenizer(tmp_path, tok, monkeypatch):
    # `datasets` names a map's file by hashing its arguments, which pickles the tokenizer (up to a second a map);
    # tunelab names it from its own key: the same config maps to the same file (no new one per overwrite_cache
    # run), another template to another, and `datasets` is never given the tokenizer to hash.
    from datasets.fingerprint import Hasher

    hashed, hash_value = [], Hasher.hash
    monkeypatch.setattr(Hasher, "hash", staticmethod(lambda value: hashed.append(value) or hash_value(value)))
    folder = write_data(tmp_path / "d", {"a": qa_rows("a", 8)})

    def map_files() -> list[str]:
        return sorted(path.name for path in (tmp_path / "cache").rglob("cache-*.arrow"))

    load(make_config(tmp_path, folder, overwrite_cache=True), tok)
    first = map_files()
    load(make_config(tmp_path, folder, overwrite_cache=True), tok)
    assert map_files() == first and first
    load(make_config(tmp_path, folder, overwrite_cache=True, template="empty"), tok)
    assert len(map_files()) == len(first) + 1
    given_tok = [value for value in hashed if value is tok or isinstance(value, dict) and tok in value.values()]
    assert hashed and not given_tok


CHANGES = {
    "template": {"template": "empty"},
    "cutoff_len": {"cutoff_len": 16},
    "train_on_prompt": {"train_on_prompt": True},
    "default_system": {"default_system": "Be brief."},
    "max_samples": {"max_samples": 3},
    "seed": {"seed": 7},
}


@pytest.mark.parametrize("change", CHANGES.values(), ids=CHANGES.keys())
def test_a_change_that_shapes_tokens_tokenizes_again(tmp_path, tok, log, change):
    folder = write_data(tmp_path / "d", {"a": qa_rows("a", 8)})
    base = make_config(tmp_path, folder, val_size=2)
    before = load(base, tok)
    log.clear()
    after = load(make_config(tmp_path, folder, val_size=2, **change), tok)
    assert BUILT in log.text and FROM_CACHE not in log.text
    assert after.train[:] != before.train[:] or after.eval[:] != before.eval[:]
    log.clear()
    load(base, tok)  # both entries stay: going back costs nothing
    assert FROM_CACHE in log.text and BUILT not in log.text


def test_data_file_contents_and_tokenizer_are_in_the_key(tmp_path, tok, log):
    folder = write_data(tmp_path / "d", {"a": qa_rows("a", 4)})
    config = make_config(tmp_path, folder)
    load(config, tok)
    data = folder / "a.json"
    os.utime(data, ns=(1, 1))  # a new modification time alone: the content decides
    log.clear()
    load(config, tok)
    assert FROM_CACHE in log.text
    data.write_text(json.dumps(qa_rows("b", 4)))
    log.clear()
    changed = load(config, tok)
    assert BUILT in log.text and answers(tok, changed.train) == ["b0", "b1", "b2", "b3"]
    grown = copy.deepcopy(tok)
    grown.add_tokens(["zzqx"])
    log.clear()
    load(config, grown)
    assert BUILT in log.text


def test_overwrite_cache_tokenizes_again(tmp_path, tok, log):
    folder = write_data(tmp_path / "d", {"a": qa_rows("a", 4)})
    load(make_config(tmp_path, folder), tok)
    log.clear()
    load(make_config(tmp_path, folder, overwrite_cache=True), tok)
    assert BUILT in log.text and FROM_CACHE not in log.text
    log.clear()
    load(make_config(tmp_path, folder), tok)  # overwrite_cache is not part of the key: the new entry serves
    assert FROM_CACHE in log.text


#: Keys that change the tokens, rows or their order, with another valid value (the base config: `key_config`).
TOKEN_CHANGES = {
    "template": None, "dataset": "b", "eval_dataset": "b", "cutoff_len": 64, "train_on_prompt": True,
    "mask_history": True, "default_system": "Be brief.", "enable_thinking": False, "tool_format": "qwen",
    "max_samples": 2, "val_size": 0.5, "seed": 1, "strict_data": True, "mix_strategy": "interleave_over",
    "neat_packing": True, "preprocessing_batch_size": 7, "preprocessing_num_workers": 2,
}
#: Keys of the run that do not change the data: a change must keep the cache entry.
OTHER_CHANGES = {"learning_rate": 1e-3, "output_dir": "elsewhere", "overwrite_cache": True, "num_train_epochs": 9.0,
                 "per_device_train_batch_size": 2, "buffer_size": 7, "logging_steps": 3}


def key_config(tmp_path, folder, **keys):
    return make_config(tmp_path, folder, **{"dataset": "a,b", **keys})


def digest_of(config, tok):
    specs = {"train": resolve_datasets(config.dataset, config.dataset_dir),
             "eval": resolve_datasets(config.eval_dataset, config.dataset_dir)}
    template = get_template(config, tok)
    return cache_folder(config, cache_key(config, kind="sft", packing=False, specs=specs, tokenizer=tok,
                                          template=template)).name


def test_the_key_covers_what_shapes_tokens_and_nothing_else(tmp_path, tok):
    folder = write_data(tmp_path / "d", {"a": qa_rows("a", 3), "b": qa_rows("b", 3)})
    base = digest_of(key_config(tmp_path, folder), tok)
    assert digest_of(key_config(tmp_path, folder), tok) == base
    # Stable for the tokenizer's own template too (a fresh template object per run must give the same key).
    assert digest_of(key_config(tmp_path, folder, template=None), tok) == \
        digest_of(key_config(tmp_path, folder, template=None), tok)
    changed = [key for key, value in TOKEN_CHANGES.items()
               if digest_of(key_config(tmp_path, folder, **{key: value}), tok) == base]
    assert changed == [], f"changing these keys keeps the cache entry: {changed}"
    kept = [key for key, value in OTHER_CHANGES.items()
            if digest_of(key_config(tmp_path, folder, **{key: value}), tok) != base]
    assert kept == [], f"changing these keys re-tokenizes for nothing: {kept}"


def test_huge_files_are_fingerprinted_by_size_mtime_and_edges(tmp_path, monkeypatch):
    monkeypatch.setattr("tunelab.data.cache.FULL_HASH_LIMIT", 10)
    monkeypatch.setattr("tunelab.data.cache.EDGE_BYTES", 4)
    path = tmp_path / "big.txt"
    path.write_bytes(b"0123456789abcdefghij")
    os.utime(path, ns=(5, 5))
    base = file_fingerprint(path)
    path.write_bytes(b"0123456789XXcdefghij")  # the middle changed, same size, same mtime: not seen (documented)
    os.utime(path, ns=(5, 5))
    assert file_fingerprint(path) == base
    path.write_bytes(b"0123456789abcdefghiX")
    os.utime(path, ns=(5, 5))
    assert file_fingerprint(path) != base
    path.write_bytes(b"0123456789abcdefghij")
    os.utime(path, ns=(6, 6))
    assert file_fingerprint(path) != base


def test_an_interrupted_save_leaves_no_entry(tmp_path, tok, log, monkeypatch):
    import datasets

    folder = write_data(tmp_path / "d", {"a": qa_rows("a", 4)})
    config = make_config(tmp_path, folder)
    real_save = datasets.DatasetDict.save_to_disk

    def save_then_die(self, path, **kwargs):
        Path(path).mkdir(parents=True)
        (Path(path) / "dataset_dict.json").write_text('{"splits": ["train"]}')  # half written
        raise KeyboardInterrupt

    monkeypatch.setattr(datasets.DatasetDict, "save_to_disk", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        load(config, tok)
    assert list(cache_root(config).iterdir()) == []
    monkeypatch.setattr(datasets.DatasetDict, "save_to_disk", real_save)
    log.clear()
    load(config, tok)
    assert BUILT in log.text
    log.clear()
    load(config, tok)
    assert FROM_CACHE in log.text


# ---------------------------------------------------------------- tokenized_path


def test_tokenized_path_is_written_then_read_without_the_data(tmp_path, tok, log):
    folder = write_data(tmp_path / "d", {"a": qa_rows("a", 6)})
    saved_at = tmp_path / "tokenized"
    written = load(make_config(tmp_path, folder, val_size=2, tokenized_path=str(saved_at)), tok)
    assert "saved the tokenized data to tokenized_path" in log.text
    log.clear()
    # The dataset named now does not even exist: with tokenized_path present it is not read.
    read = load(make_config(tmp_path, folder, dataset="nothing_by_this_name", tokenized_path=str(saved_at)), tok)
    assert "loaded tokenized data from tokenized_path" in log.text and BUILT not in log.text
    assert read.train[:] == written.train[:] and read.eval[:] == written.eval[:]
    assert read.reports == written.reports
    with pytest.raises(DataError, match="holds data of kind sft, but stage pt trains on kind pt"):
        load(make_config(tmp_path, folder, stage="pt", template=None, tokenized_path=str(saved_at)), tok)
    (tmp_path / "not_data").mkdir()
    (tmp_path / "not_data" / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match="exists but holds no saved dataset"):
        load(make_config(tmp_path, folder, tokenized_path=str(tmp_path / "not_data")), tok)


def test_tokenized_path_written_by_llama_factory_loads(tmp_path, tok):
    from datasets import Dataset, DatasetDict

    rows = {"input_ids": [[1, 2, 3]], "attention_mask": [[1, 1, 1]], "labels": [[-100, 2, 3]]}
    DatasetDict({"train": Dataset.from_dict(rows), "validation": Dataset.from_dict(rows)}).save_to_disk(
        str(tmp_path / "lf"))
    folder = write_data(tmp_path / "d", {"a": qa_rows("a", 1)})
    config = make_config(tmp_path, folder, tokenized_path=str(tmp_path / "lf"))
    splits = load(config, tok)
    assert splits.train[:] == rows and splits.eval[:] == rows and splits.reports == []
    assert "statistics: none were saved with `tokenized_path" in preview(config, tok, get_template(config, tok))


# ---------------------------------------------------------------- mixing


@pytest.mark.parametrize(("strategy", "expected"), [
    ("concat", ["a0", "a1", "a2", "b0", "b1", "b2", "b3", "b4"]),
    # Round robin until the smaller dataset runs out.
    ("interleave_under", ["a0", "b0", "a1", "b1", "a2", "b2"]),
    # Round robin until the larger one runs out, the smaller one starting over.
    ("interleave_over", ["a0", "b0", "a1", "b1", "a2", "b2", "a0", "b3", "a1", "b4"]),
])
def test_mix_strategies(tmp_path, tok, strategy, expected):
    folder = write_data(tmp_path / "d", {"a": qa_rows("a", 3), "b": qa_rows("b", 5)})
    splits = load(make_config(tmp_path, folder, dataset="a,b", mix_strategy=strategy), tok)
    assert answers(tok, splits.train) == expected


def test_interleave_probs_and_evaluation_sets(tmp_path, tok):
    folder = write_data(tmp_path / "d", {"a": qa_rows("a", 3), "b": qa_rows("b", 5)})
    under = answers(tok, load(make_config(tmp_path, folder, dataset="a,b", mix_strategy="interleave_under",
                                          interleave_probs=[0.8, 0.2]), tok).train)
    # Sampling stops when one dataset is exhausted: the last row is the last sample of that dataset.
    exhausted = under[-1][0]
    assert under[-1] == {"a": "a2", "b": "b4"}[exhausted] and len(set(under)) == len(under)
    splits = load(make_config(tmp_path, folder, dataset="a,b", eval_dataset="a,b", mix_strategy="interleave_over",
                              interleave_probs=[0.3, 0.7]), tok)
    assert {"a0", "a1", "a2", "b0", "b1", "b2", "b3", "b4"} <= set(answers(tok, splits.train))
    # Evaluation sets are concatenated whatever the mix: each is evaluated whole and once.
    assert answers(tok, splits.eval) == ["a0", "a1", "a2", "b0", "b1", "b2", "b3", "b4"]


# ---------------------------------------------------------------- streaming and packing


def test_streaming_yields_the_same_rows_lazily(tmp_path, tok):
    from datasets import IterableDataset

    rows = qa_rows("a", 6)
    rows[2]["output"] = ""  # invalid: skipped in the stream too
    folder = write_data(tmp_path / "d", {"a": rows})
    whole = load(make_config(tmp_path, folder), tok).train
    streamed = load(make_config(tmp_path, folder, streaming=True, max_steps=5, buffer_size=4), tok)
    assert isinstance(streamed.train, IterableDataset) and streamed.reports == []
    first = list(streamed.train)
    again = load(make_config(tmp_path, folder, streaming=True, max_steps=5, buffer_size=4), tok).train
    assert list(again) == first  # the shuffle is seeded
    assert sorted(answers(tok, first)) == sorted(answers(tok, whole)) == ["a0", "a1", "a3", "a4", "a5"]
    assert sorted(row["input_ids"] for row in first) == sorted(whole["input_ids"])
    packed = list(load(make_config(tmp_path, folder, streaming=True, max_steps=5, packing=True), tok).train)
    assert len(packed) < len(first)
    assert sum(len(row["input_ids"]) for row in packed) == sum(len(ids) for ids in whole["input_ids"])


def test_packing_is_applied_after_tokenization(tmp_path, tok):
    folder = write_data(tmp_path / "d", {"a": qa_rows("a", 12)})
    plain = load(make_config(tmp_path, folder, cutoff_len=64), tok)
    packed = load(make_config(tmp_path, folder, cutoff_len=64, packing=True), tok)
    tokens = sum(len(ids) for ids in plain.train["input_ids"])
    assert len(packed.train) < len(plain.train)
    assert sum(len(ids) for ids in packed.train["input_ids"]) == tokens
    assert all(len(ids) <= 64 for ids in packed.train["input_ids"])
    assert packed.reports == plain.reports  # statistics describe the samples, not the packed rows
    neat = load(make_config(tmp_path, folder, cutoff_len=64, neat_packing=True), tok)
    assert "position_ids" in neat.train.column_names and "attention_mask" not in neat.train.column_names
    with pytest.raises(DataError, match="`neat_packing` packs separate samples; stage pt"):
        load(make_config(tmp_path, folder, stage="pt", template=None, neat_packing=True), tok)


# ---------------------------------------------------------------- statistics and preview


def test_measure_counts_in_arrow():
    from datasets import Dataset

    rows = Dataset.from_dict({"input_ids": [[1] * n for n in (4, 1, 9, 2, 7)],
                              "labels": [[-100, 5, 5, 5], [5], [-100] * 9, [-100, 5], [5] * 7],
                              "_truncated": [False, True, False, False, True]})
    stats = measure(rows, "sft")
    assert (stats.rows, stats.tokens, stats.trained, stats.truncated) == (5, 23, 12, 2)
    assert stats.lengths == {"p50": 4, "p90": 9, "p99": 9, "max": 9}  # nearest rank of 1 2 4 7 9
    assert measure(rows.remove_columns("_truncated"), "prompt").trained is None
    assert measure(rows.remove_columns("_truncated"), "sft").truncated is None


def nearest_rank(values: list[int], p: int) -> int:
    ordered = sorted(values)
    return ordered[math.ceil(p / 100 * len(ordered)) - 1]


def test_preview_highlights_trained_tokens_and_reports_statistics(tmp_path, tok):
    replies = [" ".join(["word"] * k) for k in (3, 9, 1, 14, 6, 2, 11, 5, 8, 4)]
    rows = [{"instruction": f"Say {len(r.split())} words.", "output": r} for r in replies]
    rows.insert(3, {"instruction": "Say nothing.", "output": ""})
    folder = write_data(tmp_path / "d", {"a": rows})
    # No `template`: the tokenizer's own, so its apply_chat_template is the independent reference.
    config = make_config(tmp_path, folder, template=None, cutoff_len=512)
    text = preview(config, tok, get_template(config, tok), n=2, color=False)

    lengths, trained = [], []
    for row in rows[:3] + rows[4:]:
        conversation = [{"role": "user", "content": row["instruction"]},
                        {"role": "assistant", "content": row["output"]}]
        full = tok(tok.apply_chat_template(conversation, tokenize=False), add_special_tokens=False)["input_ids"]
        prompt = tok(tok.apply_chat_template(conversation[:1], tokenize=False, add_generation_prompt=True),
                     add_special_tokens=False)["input_ids"]
        assert full[:len(prompt)] == prompt
        lengths.append(len(full))
        trained.append(len(full) - len(prompt))
    assert "samples    10 kept of 11" in text
    assert f"skipped    1 empty response (first at {folder / 'a.json'}, sample 3" in text
    assert f"tokens     {sum(lengths)} in 10 rows, {sum(trained) / sum(lengths):.1%} trained" in text
    marks = "  ".join(f"p{p} {nearest_rank(lengths, p)}" for p in (50, 90, 99))
    assert f"length     {marks}  max {max(lengths)}  (cutoff_len 512)" in text
    assert f"⟦{replies[0]}<|im_end|>" in text and f"⟦{replies[1]}<|im_end|>" in text
    assert text.count("── row ") == 2 and "── row 0 · " in text
    colored = preview(config, tok, get_template(config, tok), n=1, color=True)
    assert f"\x1b[1;32m{replies[0]}<|im_end|>" in colored and "⟦" not in colored


def test_preview_counts_truncated_samples(tmp_path, tok):
    rows = [{"instruction": "q", "output": " ".join(["word"] * k)} for k in (2, 40, 3, 60)]
    folder = write_data(tmp_path / "d", {"a": rows})
    config = make_config(tmp_path, folder, cutoff_len=32)
    splits = load(config, tok)
    assert splits.reports[0].tokens.truncated == 2
    assert "truncated  2 rows (50.0%)" in preview(config, tok, get_template(config, tok), n=1, color=False)
