"""Batched encoding: a `datasets.map` batch tokenized by one tokenizer call gives every sample the ids and labels it
gets tokenized on its own; and the number of tokenizing workers changes no row.

    .venv/bin/python -m pytest tests/data/test_batched_encode.py -q

The processors encode a whole batch with `Template.encode_batch` (one call of the tokenizer's batch path, each text
cut at its piece borders by the tokens' character spans). The reference here encodes one conversation at a time with
the tokenizer's own per-text call, as `apply_chat_template` tokenizes, and gives each token to the piece its text
ends in. Every processor (sft, pairwise, kto, prompt, pt) must return the same columns with the reference in place of
the batch, on:

* 14 tokenizer/template pairs (`PAIRS`: named templates and the tokenizers' own chat templates) from
  ../shared/tokenizers on LLaMA-Factory's demo data in ../shared/lf_data: alpaca_en_demo and identity (sft, prompt),
  glaive_toolcall_en_demo (sft, with the templates that write tools), dpo_en_demo (pairwise), kto_en_demo (kto) and
  c4_demo (pt); skipped without ../shared;
* the tiny ChatML tokenizer of conftest on tunelab's own data/ (every kind), which needs nothing outside the repository.

A tokenizer without a Rust backend cuts from the ids of each prefix instead (`tokens._split_by_prefixes`); that cut is
compared with the spans' on the same conversations.
"""

import json
from functools import cache
from itertools import accumulate

import pytest
from transformers import AutoTokenizer

from tunelab.config import load_config
from tunelab.data import get_template, load_datasets, loader, resolve_datasets, workers
from tunelab.data.formats import convert_batch
from tunelab.data.processing import PROCESSORS
from tunelab.data.registry import data_kind
from tunelab.data.template.tokens import _cuts_at_borders, _cuts_by_spans, _split_by_prefixes
from tunelab.data.workers import ROWS_PER_WORKER, available_cores, map_workers
from helpers import LF_DATA, REPO, TOKENIZERS

OWN = None  # the tokenizer's own chat template (no `template:`)
#: (template, folder in ../shared/tokenizers)
PAIRS = [
    ("qwen", "qwen2.5-instruct"), (OWN, "qwen2.5-instruct"), ("chatml", "qwen2.5-instruct"),
    ("qwen3", "qwen3"), (OWN, "qwen3"),  # its own template rewrites past reasoning: last reply trained
    ("qwen2_vl", "qwen2-vl-instruct"), (OWN, "qwen2.5-vl-instruct"),
    ("llama3", "llama-3.2-instruct"), (OWN, "llama-3.2-instruct"),
    ("alpaca", "llama-3.2-instruct"),  # markup of plain words: borders inside ordinary text
    ("mistral", "mistral-7b-instruct-v0.3"), ("phi", "phi-3.5-mini-instruct"),
    ("smollm2", "smollm2-135m-instruct-from-gguf"), ("yi", "yi-6b-chat"),
]
#: pairs whose cut from prefixes is compared: ChatML markup, Llama 3 headers, plain-word markup, Mistral's [INST]
PREFIX_PAIRS = [("qwen", "qwen2.5-instruct"), ("llama3", "llama-3.2-instruct"), ("alpaca", "llama-3.2-instruct"),
                ("mistral", "mistral-7b-instruct-v0.3")]
#: (dataset in ../shared/lf_data, stage, at most this many rows of it)
LF_SETS = [("alpaca_en_demo", "sft", 150), ("identity", "sft", 91), ("glaive_toolcall_en_demo", "sft", 150),
           ("alpaca_en_demo", "ppo", 100), ("dpo_en_demo", "dpo", 100), ("kto_en_demo", "kto", 100),
           ("c4_demo", "pt", 100)]
#: (dataset in the repository's data/, stage)
OWN_SETS = [("alpaca_demo", "sft"), ("identity", "sft"), ("sharegpt_demo", "sft"), ("tool_calls_demo", "sft"),
            ("alpaca_demo", "ppo"), ("dpo_demo", "dpo"), ("identity_preference", "rm"), ("kto_demo", "kto"),
            ("pretrain_demo", "pt")]
needs_shared = pytest.mark.skipif(not (TOKENIZERS.is_dir() and LF_DATA.is_dir()),
                                  reason="../shared/tokenizers and ../shared/lf_data are not present")


def encode_alone(tokenizer, template, messages, system, tools):
    """The reference: one conversation through the tokenizer's per-text call, each token in the piece its text ends
    in (a token spanning a border goes to the later piece)."""
    pieces = template.render_pieces(tokenizer, messages, system, tools)
    encoded = tokenizer("".join(pieces), add_special_tokens=False, return_offsets_mapping=True)
    borders = list(accumulate(len(piece) for piece in pieces))
    split = [[] for _ in pieces]
    for token, (_, end) in zip(encoded["input_ids"], encoded["offset_mapping"]):
        split[sum(border < end for border in borders)].append(token)
    return list(zip(split[0::2], split[1::2]))


class OneAtATime:
    """A template whose `encode_batch` encodes each conversation on its own (`encode_alone`)."""

    def __init__(self, template):
        self.template = template

    def encode_batch(self, tokenizer, conversations):
        return [encode_alone(tokenizer, self.template, *conversation) for conversation in conversations]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """Where `datasets` keeps the files it reads, apart from the user's cache."""
    return tmp_path_factory.mktemp("datasets_cache")


@cache
def internal_rows(cache_dir, dataset_dir, name: str, stage: str, limit: int | None = None) -> dict[str, list]:
    """The valid samples of a dataset in the internal form (converted as the loader converts them), as one batch
    (read once per module: the processors do not change it)."""
    from datasets import load_dataset

    (spec,) = resolve_datasets([name], dataset_dir, stage)
    raw = load_dataset(spec.builder(), data_files=[str(f) for f in spec.files()], split="train",
                       cache_dir=str(cache_dir))
    raw = raw.select(range(min(limit or len(raw), len(raw))))
    converted = convert_batch(raw[:], spec=spec, stage=stage)
    keep = [i for i, rule in enumerate(converted.pop("_rule")) if not rule]
    assert keep, f"{name}: no valid sample"
    return {column: [values[i] for i in keep] for column, values in converted.items()}


def assert_batched_equals_alone(tokenizer, template, config, batch, kind: str) -> int:
    """The processor's columns through `encode_batch` and one conversation at a time; returns the rows compared."""
    batched = PROCESSORS[kind](batch, tokenizer=tokenizer, template=template, config=config)
    alone = PROCESSORS[kind](batch, tokenizer=tokenizer, template=OneAtATime(template), config=config)
    if kind == "pt":  # pt does not use the template: its reference is each document tokenized by itself
        documents = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in batch["text"]]
        assert [i for doc in documents for i in doc] == [i for row in batched["input_ids"] for i in row
                                                         if i not in (tokenizer.bos_token_id, tokenizer.eos_token_id)]
    assert batched.keys() == alone.keys()
    for column in batched:
        assert batched[column] == alone[column], f"{kind}: column {column} differs"
    return len(next(iter(batched.values())))


def prepared(folder, name: str | None, **keys):
    """A fresh tokenizer (templates change its eos and chat template) and the template, as a run prepares them."""
    if folder.name == "yi-6b-chat":
        pytest.importorskip("sentencepiece", reason="Yi's tokenizer.model needs sentencepiece")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = load_config({"model_name_or_path": str(folder), "template": name, "cutoff_len": 256, **keys})
    template = get_template(config, tokenizer)
    template.prepare_tokenizer(tokenizer)
    return tokenizer, template, config


def unanswered_every_other(batch: dict[str, list]) -> dict[str, list]:
    """Kind prompt's two cases: every other sample loses its last reply (generation prompt only, no reference)."""
    messages = [m[:-1] if i % 2 else m for i, m in enumerate(batch["messages"])]
    return {**batch, "messages": messages}


def stage_batch(cache_dir, dataset_dir, name: str, stage: str, limit: int | None = None) -> tuple[str, dict]:
    kind = data_kind(stage)
    batch = internal_rows(cache_dir, dataset_dir, name, stage, limit)
    return kind, unanswered_every_other(batch) if kind == "prompt" else batch


@needs_shared
@pytest.mark.parametrize(("name", "folder"), PAIRS, ids=[f"{name or 'own'}-{folder}" for name, folder in PAIRS])
def test_batched_equals_one_at_a_time_on_demo_data(cache_dir, name, folder):
    tokenizer, template, config = prepared(TOKENIZERS / folder, name)
    for dataset, stage, limit in LF_SETS:
        if dataset.startswith("glaive") and not template.supports_tools:
            continue
        kind, batch = stage_batch(cache_dir, LF_DATA, dataset, stage, limit)
        assert assert_batched_equals_alone(tokenizer, template, config, batch, kind) > 0


@needs_shared
@pytest.mark.parametrize(("name", "folder"), PREFIX_PAIRS, ids=[f"{name}-{folder}" for name, folder in PREFIX_PAIRS])
def test_cut_from_prefixes_equals_cut_from_spans(cache_dir, name, folder):
    """The cut a tokenizer without a Rust backend gets (from the ids of each prefix) is the spans' cut."""
    tokenizer, template, _ = prepared(TOKENIZERS / folder, name)
    tools = template.supports_tools
    batch = internal_rows(cache_dir, LF_DATA, "glaive_toolcall_en_demo" if tools else "alpaca_en_demo", "sft", 100)
    conversations = list(zip(batch["messages"], batch["system"], batch["tools"]))
    for conversation, pairs in zip(conversations, template.encode_batch(tokenizer, conversations)):
        cut = _split_by_prefixes(tokenizer, template.render_pieces(tokenizer, *conversation))
        assert list(zip(cut[0::2], cut[1::2])) == pairs


@needs_shared
@pytest.mark.parametrize(("name", "folder"), PAIRS, ids=[f"{name or 'own'}-{folder}" for name, folder in PAIRS])
def test_border_lookups_cut_where_the_spans_do(cache_dir, name, folder):
    """The cut from a few lookups at the borders (`_cuts_at_borders`) is the one every token's span gives, and it
    serves every demo conversation (the spans are read only where it cannot)."""
    tokenizer, template, _ = prepared(TOKENIZERS / folder, name)
    batch = internal_rows(cache_dir, LF_DATA, "glaive_toolcall_en_demo" if template.supports_tools else
                          "alpaca_en_demo", "sft", 100)
    texts = [template.render_pieces(tokenizer, *conversation)
             for conversation in zip(batch["messages"], batch["system"], batch["tools"])]
    texts += [[*pieces, ""] for pieces in texts[:10]]   # an empty last piece, as a generation prompt ends
    for pieces, encoding in zip(texts, tokenizer.backend_tokenizer.encode_batch(["".join(p) for p in texts],
                                                                                add_special_tokens=False)):
        cuts = _cuts_at_borders(encoding, pieces, len(encoding.ids))
        assert cuts is not None and cuts == _cuts_by_spans(encoding, pieces), pieces


@pytest.mark.parametrize(("dataset", "stage"), OWN_SETS, ids=[f"{d}-{s}" for d, s in OWN_SETS])
def test_batched_equals_one_at_a_time_on_shipped_data(cache_dir, tiny_model_dir, dataset, stage):
    tokenizer, template, config = prepared(tiny_model_dir, "qwen")
    kind, batch = stage_batch(cache_dir, REPO / "data", dataset, stage)
    assert assert_batched_equals_alone(tokenizer, template, config, batch, kind) > 0


def test_encode_turns_is_a_batch_of_one(cache_dir, tiny_model_dir):
    tokenizer, template, _ = prepared(tiny_model_dir, "qwen")
    batch = internal_rows(cache_dir, REPO / "data", "tool_calls_demo", "sft")
    conversations = list(zip(batch["messages"], batch["system"], batch["tools"]))
    assert template.encode_batch(tokenizer, conversations) == \
        [template.encode_turns(tokenizer, *conversation) for conversation in conversations]


# ---------------------------------------------------------------- workers


def test_default_workers_grow_with_the_rows_up_to_the_cores():
    cores = available_cores()
    assert map_workers(None, 2 * ROWS_PER_WORKER - 1) is None
    assert map_workers(None, 2 * ROWS_PER_WORKER) == (2 if cores > 1 else None)
    assert map_workers(None, 1000 * ROWS_PER_WORKER) == (min(cores, 1000) if cores > 1 else None)
    # pt, kto and packing: another cut into batches gives other rows, so one process unless asked
    assert map_workers(None, 1000 * ROWS_PER_WORKER, row_wise=False) is None
    assert map_workers(3, 10, row_wise=False) == 3 and map_workers(4, 2) == 2 and map_workers(1, 10**6) is None


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_worker_count_changes_no_row(tmp_path, tiny_model_dir, stage):
    """The same rows from one process and from three (contiguous shards of other batch borders)."""
    tokenizer, template, _ = prepared(tiny_model_dir, "qwen")
    names = "alpaca_demo,identity,tool_calls_demo" if stage == "sft" else "dpo_demo,identity_preference"
    loaded = []
    for count in (1, 3):
        config = load_config({"model_name_or_path": "m", "stage": stage, "dataset": names, "template": "qwen",
                              "dataset_dir": str(REPO / "data"), "cache_dir": str(tmp_path / f"cache{count}"),
                              "preprocessing_num_workers": count, "preprocessing_batch_size": 7})
        loaded.append(load_datasets(config, tokenizer, template).train.to_dict())
    assert loaded[0] == loaded[1]
    assert len(json.dumps(loaded[0])) > 1000


def test_unset_workers_leave_batch_bound_maps_in_one_process(tmp_path, tiny_model_dir, monkeypatch):
    """With a worker for every row, the default splits sft's tokenizing but neither kto's (KL pairs come from the
    next sample of the batch) nor packing; every result equals one process's."""
    monkeypatch.setattr(workers, "ROWS_PER_WORKER", 1)
    calls = []
    monkeypatch.setattr(loader, "map_workers", lambda *args: calls.append(args) or workers.map_workers(*args))
    tokenizer, template, _ = prepared(tiny_model_dir, "qwen")
    for stage, keys in (("kto", {"dataset": "kto_demo"}), ("sft", {"dataset": "alpaca_demo", "packing": True})):
        loaded = []
        for count in (None, 1):
            config = load_config({"model_name_or_path": "m", "stage": stage, "template": "qwen", **keys,
                                  "dataset_dir": str(REPO / "data"), "cache_dir": str(tmp_path / f"{stage}{count}"),
                                  "preprocessing_num_workers": count, "preprocessing_batch_size": 7})
            loaded.append(load_datasets(config, tokenizer, template).train.to_dict())
        assert loaded[0] == loaded[1]
    unset = [(rows, row_wise) for requested, rows, row_wise in calls if requested is None]
    # kto: converting, reading media, tokenizing (not row-wise); sft: converting and tokenizing in one map
    # (fused_map.py), packing (not row-wise)
    assert [row_wise for _, row_wise in unset] == [True, True, False, True, False]
