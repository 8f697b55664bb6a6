"""Stage processing (every data kind), packing and the collator.

    .venv/bin/python -m pytest tests/data/test_data_processing.py -q

Golden ids come from `tokenizer.apply_chat_template` of the real Qwen2.5 tokenizer (../shared/tokenizers; those tests
skip without it), with the conversation written here in Hugging Face's message form, never through our converters.
The packing equivalence test runs the tiny llama model of conftest: a neat-packed batch must give the logits and
per-sample losses of the same samples run alone, and plain packing must not (its samples see each other).
"""

import gc
import json

import pytest

from tunelab.config import load_config
from tunelab.data import DataError, get_template
from tunelab.data.collator import DataCollator
from tunelab.data.packing import best_fit_decreasing, pack_rows
from tunelab.config.stages import STAGE_SPECS
from tunelab.data.processing import IGNORE_INDEX, PROCESSORS, arrow_rows, pairwise_example, shared_prompt, to_arrow
from tunelab.data.registry import data_kind
from helpers import TOKENIZERS

QWEN = TOKENIZERS / "qwen2.5-instruct"
needs_qwen = pytest.mark.skipif(not QWEN.is_dir(), reason="../shared/tokenizers is not present")
END = "<|im_end|>\n"
GENERATION_PROMPT = "<|im_start|>assistant\n"

SYSTEM = "You answer in one sentence."
PROMPT = [{"role": "user", "content": "Name a prime number."}, {"role": "assistant", "content": "Seven is prime."},
          {"role": "user", "content": "And an even one?"}]
CALL = {"name": "get_weather", "arguments": {"city": "Oslo"}}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def config(**keys):
    return load_config({"model_name_or_path": "m", "cutoff_len": 1024, **keys})


def columns_of(rows):
    return {key: [row[key] for row in rows] for key in rows[0]}


def rows_of(columns):
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


def run(kind, tokenizer, rows, template_name="qwen", **keys):
    """One `datasets.map(batched=True)` call of a processor, on rows given as dicts (system and tools default)."""
    cfg = config(template=template_name, **keys)
    batch = columns_of([{"system": None, "tools": None, **row} for row in rows])
    return rows_of(PROCESSORS[kind](batch, tokenizer=tokenizer, template=get_template(cfg, tokenizer), config=cfg))


def reference(tokenizer, hf_messages, system=None, tools=None, generation=False):
    """The reference ids: the tokenizer's own chat template."""
    messages = ([{"role": "system", "content": system}] if system else []) + hf_messages
    return tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=generation, return_dict=False)


def trained_runs(tokenizer, input_ids, labels):
    """The decoded runs of trained tokens (labels != -100, each equal to its input id)."""
    runs, current = [], []
    for token, label in zip(input_ids, labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs, current = runs + [tokenizer.decode(current)], []
    return runs + ([tokenizer.decode(current)] if current else [])


@pytest.fixture(scope="module")
def qwen():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(QWEN)


@pytest.fixture(scope="module")
def tiny_tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


# ---------------------------------------------------------------- the tables


def test_every_stage_has_a_processor():
    assert {spec.data for spec in STAGE_SPECS.values()} == set(PROCESSORS)
    assert [data_kind(s) for s in ("pt", "sft", "rm", "dpo", "kto", "ppo")] == ["pt", "sft", "pairwise", "pairwise",
                                                                                "kto", "prompt"]
    with pytest.raises(DataError, match="stage 'reinforce' has no data format; expected one of pt, sft, rm"):
        data_kind("reinforce")


# ---------------------------------------------------------------- sft


@needs_qwen
@pytest.mark.parametrize("template_name", ["qwen", None])
def test_sft_equals_apply_chat_template_and_trains_exactly_the_replies(qwen, template_name):
    multi = PROMPT + [assistant("Two is even.")]
    tool_chat = [user("Weather in Oslo?"), {"role": "tool_call", "content": json.dumps([CALL])},
                 {"role": "tool", "content": "-3 C, snow"}, assistant("It is snowing at -3 C.")]
    hf_tool_chat = [user("Weather in Oslo?"),
                    {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": CALL}]},
                    {"role": "tool", "content": "-3 C, snow"}, assistant("It is snowing at -3 C.")]
    rows = run("sft", qwen, [{"messages": multi, "system": SYSTEM}, {"messages": multi},
                             {"messages": tool_chat, "tools": json.dumps(TOOLS)}], template_name)
    assert rows[0]["input_ids"] == reference(qwen, multi, SYSTEM)
    assert rows[1]["input_ids"] == reference(qwen, multi)
    assert rows[2]["input_ids"] == reference(qwen, hf_tool_chat, tools=TOOLS)
    for row in rows[:2]:
        assert trained_runs(qwen, row["input_ids"], row["labels"]) == ["Seven is prime." + END, "Two is even." + END]
    call_text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    assert trained_runs(qwen, rows[2]["input_ids"], rows[2]["labels"]) == [call_text + END,
                                                                          "It is snowing at -3 C." + END]
    assert all(row["attention_mask"] == [1] * len(row["input_ids"]) for row in rows)


@needs_qwen
def test_sft_mask_switches_and_truncation(qwen):
    multi = PROMPT + [assistant("Two is even.")]
    (on_prompt,) = run("sft", qwen, [{"messages": multi}], train_on_prompt=True)
    assert on_prompt["labels"] == on_prompt["input_ids"]
    (last_only,) = run("sft", qwen, [{"messages": multi}], mask_history=True)
    assert trained_runs(qwen, last_only["input_ids"], last_only["labels"]) == ["Two is even." + END]
    # A window too small for the whole conversation: the last reply is kept whole, its prompt cut from the left.
    (cut,) = run("sft", qwen, [{"messages": multi}], mask_history=True, cutoff_len=16)
    assert len(cut["input_ids"]) == 16
    assert qwen.decode(cut["input_ids"]).endswith("And an even one?" + END + GENERATION_PROMPT + "Two is even." + END)
    assert trained_runs(qwen, cut["input_ids"], cut["labels"]) == ["Two is even." + END]


# ---------------------------------------------------------------- pairwise


@needs_qwen
@pytest.mark.parametrize("template_name", ["qwen", None])
def test_pairwise_shares_the_prompt_and_trains_each_reply(qwen, template_name):
    rows = run("pairwise", qwen, [
        {"messages": PROMPT, "chosen": assistant("Two is even."), "rejected": assistant("Nine."), "system": SYSTEM},
        {"messages": [user("Hi")], "chosen": assistant("Hello! How can I help?"), "rejected": assistant("Go away.")},
    ], template_name)
    for row, (messages, system, chosen, rejected) in zip(rows, [
            (PROMPT, SYSTEM, "Two is even.", "Nine."), ([user("Hi")], None, "Hello! How can I help?", "Go away.")]):
        prompt = reference(qwen, messages, system, generation=True)
        assert row["chosen_input_ids"] == reference(qwen, messages + [assistant(chosen)], system)
        assert row["rejected_input_ids"] == reference(qwen, messages + [assistant(rejected)], system)
        for side, reply in (("chosen", chosen), ("rejected", rejected)):
            ids, labels = row[f"{side}_input_ids"], row[f"{side}_labels"]
            assert ids[:len(prompt)] == prompt and labels[:len(prompt)] == [IGNORE_INDEX] * len(prompt)
            assert trained_runs(qwen, ids, labels) == [reply + END]  # the earlier reply in the prompt is not trained
            assert row[f"{side}_attention_mask"] == [1] * len(ids)


@needs_qwen
def test_pairwise_truncation_keeps_one_prompt(qwen):
    long_reply = " ".join(["word"] * 40)
    (row,) = run("pairwise", qwen, [{"messages": PROMPT, "chosen": assistant("Two."), "system": SYSTEM,
                                     "rejected": assistant(long_reply)}], cutoff_len=60)
    chosen, rejected = row["chosen_input_ids"], row["rejected_input_ids"]
    prompt_len = row["chosen_labels"].count(IGNORE_INDEX)
    assert len(rejected) == 60 and len(chosen) < 60
    assert prompt_len == row["rejected_labels"].count(IGNORE_INDEX) and chosen[:prompt_len] == rejected[:prompt_len]
    assert qwen.decode(chosen[:prompt_len]).endswith("And an even one?" + END + GENERATION_PROMPT)
    assert trained_runs(qwen, rejected, row["rejected_labels"]) == [long_reply + END]


def test_pairwise_example_cuts_both_sides_alike():
    prompt, chosen, rejected = list(range(10)), [100, 101, 102], [200, 201, 202, 203, 204, 205]
    assert pairwise_example(prompt, chosen, rejected, 20) == (prompt, chosen, rejected)
    assert pairwise_example(prompt, chosen, rejected, 8) == ([8, 9], chosen, rejected)
    # the longer reply fills the window alone: half the window for the prompt's end, the rest for both replies
    assert pairwise_example(prompt, chosen, rejected, 6) == ([7, 8, 9], chosen, rejected[:3])


def test_shared_prompt_moves_a_border_token_to_the_replies():
    assert shared_prompt(([1, 2, 3], [4, 5]), ([1, 2, 3], [6])) == ([1, 2, 3], [4, 5], [6])
    # the prompt's last token merged with each reply's first characters differently
    assert shared_prompt(([1, 2, 3], [4, 5]), ([1, 2, 7], [6])) == ([1, 2], [3, 4, 5], [7, 6])


# ---------------------------------------------------------------- kto


@needs_qwen
def test_kto_rows_and_mismatched_kl_pairs(qwen):
    samples = [([user("Capital of France?"), assistant("Paris.")], True),
               (PROMPT + [assistant("Two is even.")], False),
               ([user("Say hi."), assistant("Hi there, friend!")], True)]
    rows = run("kto", qwen, [{"messages": m, "kto_tag": tag} for m, tag in samples])
    assert [row["kto_tags"] for row in rows] == [True, False, True]
    replies = [m[-1]["content"] for m, _ in samples]
    for i, (row, (messages, _)) in enumerate(zip(rows, samples)):
        assert row["input_ids"] == reference(qwen, messages)
        assert trained_runs(qwen, row["input_ids"], row["labels"]) == [replies[i] + END]
        prompt = reference(qwen, messages[:-1], generation=True)
        kl_ids, kl_labels = row["kl_input_ids"], row["kl_labels"]
        assert kl_ids[:len(prompt)] == prompt and kl_labels[:len(prompt)] == [IGNORE_INDEX] * len(prompt)
        # this sample's prompt, the next sample's reply: never its own
        assert trained_runs(qwen, kl_ids, kl_labels) == [replies[(i + 1) % 3] + END]
        assert row["kl_attention_mask"] == [1] * len(kl_ids)
    # a batch of one has no other reply to pair with
    (alone,) = run("kto", qwen, [{"messages": samples[0][0], "kto_tag": True}])
    assert alone["kl_input_ids"] == alone["input_ids"]


# ---------------------------------------------------------------- prompt (ppo, prediction)


@needs_qwen
@pytest.mark.parametrize("template_name", ["qwen", None])
def test_prompt_kind_ends_with_the_generation_prompt(qwen, template_name):
    messages = PROMPT + [assistant("Two is even.")]
    (row,) = run("prompt", qwen, [{"messages": messages, "system": SYSTEM}], template_name)
    prompt = reference(qwen, PROMPT, SYSTEM, generation=True)
    assert row["input_ids"] == prompt and qwen.decode(prompt).endswith(GENERATION_PROMPT)
    assert row["attention_mask"] == [1] * len(prompt)
    assert qwen.decode(row["labels"]) == "Two is even." + END
    (cut,) = run("prompt", qwen, [{"messages": messages, "system": SYSTEM}], template_name, cutoff_len=12)
    assert cut["input_ids"] == prompt[-12:] and cut["labels"] == row["labels"]
    # a conversation without a reference answer (prediction): the same prompt, no labels
    (unanswered,) = run("prompt", qwen, [{"messages": PROMPT, "system": SYSTEM}], template_name)
    assert unanswered["input_ids"] == prompt and unanswered["labels"] == []


# ---------------------------------------------------------------- to Arrow


ARROW_SAMPLES = {
    "sft": [{"messages": PROMPT + [assistant("Two is even.")]}, {"messages": [user("Hi."), assistant("Hello!")]}],
    "pairwise": [{"messages": PROMPT, "chosen": assistant("Two."), "rejected": assistant("Three is odd, so no.")}],
    "kto": [{"messages": [user("Hi."), assistant("Hello!")], "kto_tag": True},
            {"messages": PROMPT + [assistant("Two.")], "kto_tag": False}],
    "prompt": [{"messages": PROMPT + [assistant("Two.")]}, {"messages": PROMPT}],
}


@needs_qwen
@pytest.mark.parametrize("cutoff_len", [1024, 12])
@pytest.mark.parametrize("kind", ARROW_SAMPLES)
def test_the_arrow_table_holds_the_processors_lists(qwen, kind, cutoff_len):
    # to_arrow reads no attention mask (it makes one of ones from the ids' offsets) and moves the other token
    # columns through flat numpy arrays: the table must read back as exactly the processor's lists.
    cfg = config(template="qwen", cutoff_len=cutoff_len)
    batch = columns_of([{"system": None, "tools": None, **row} for row in ARROW_SAMPLES[kind]])
    out = PROCESSORS[kind](batch, tokenizer=qwen, template=get_template(cfg, qwen), config=cfg)
    assert to_arrow(out).to_pydict() == out


@needs_qwen
def test_a_map_batch_runs_without_garbage_collections(qwen):
    # The processors make no reference cycles; the collections their lists would start free nothing (gc_paused.py).
    cfg = config(template="qwen")
    samples = [{"messages": [user(f"Question {i}?"), assistant(f"Answer {i}.")]} for i in range(500)]
    batch = columns_of([{"system": None, "tools": None, **row} for row in samples])
    keys = dict(tokenizer=qwen, template=get_template(cfg, qwen), config=cfg)
    starts = []

    def count(phase, info):
        starts.extend([info["generation"]] if phase == "start" else [])

    gc.callbacks.append(count)
    try:
        PROCESSORS["sft"](batch, **keys)
        collected_unpaused, starts[:] = len(starts), []
        table = arrow_rows(batch, kind="sft", **keys)
    finally:
        gc.callbacks.remove(count)
    assert collected_unpaused > 0   # the same batch does start collections with the collector on
    assert starts == [] and gc.isenabled() and table.num_rows == 500


# ---------------------------------------------------------------- pt


def test_pt_processor_chunks_documents(tiny_tok):
    docs = ["hello world", "the cat sat on the mat and then it slept"]
    out = PROCESSORS["pt"]({"text": docs}, tokenizer=tiny_tok, template=None, config=config(stage="pt", cutoff_len=8))
    stream = [i for chunk in out["input_ids"] for i in chunk]
    encoded = tiny_tok(docs, add_special_tokens=False)["input_ids"]
    expected = [i for ids in encoded for i in ids + [tiny_tok.eos_token_id]]
    assert stream == expected and all(len(c) == 8 for c in out["input_ids"][:-1])
    assert out["labels"] == out["input_ids"]


# ---------------------------------------------------------------- packing


def test_best_fit_decreasing_fills_bins_tightly():
    lengths = [3, 5, 2, 4, 3, 2, 1]
    bins = best_fit_decreasing(lengths, 10)
    assert len(bins) == 2  # 20 tokens in two full bins; first fit in the given order needs three
    assert sorted(i for b in bins for i in b) == list(range(7))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert best_fit_decreasing([6, 6, 6], 10) == [[0], [1], [2]]
    with pytest.raises(ValueError, match="row 1 has 11 tokens, more than the 10"):
        best_fit_decreasing([3, 11], 10)


def test_pack_rows_columns_positions_and_labels():
    batch = {"input_ids": [[1, 2, 3], [4, 5], [6, 7, 8, 9]],
             "labels": [[-100, 2, 3], [4, 5], [-100, -100, 8, 9]], "attention_mask": [[1] * 3, [1] * 2, [1] * 4]}
    neat = pack_rows(batch, cutoff_len=6, neat=True)
    assert neat == {"input_ids": [[6, 7, 8, 9, 4, 5], [1, 2, 3]],
                    "labels": [[-100, -100, 8, 9, -100, 5], [-100, 2, 3]],
                    "position_ids": [[0, 1, 2, 3, 0, 1], [0, 1, 2]]}
    plain = pack_rows(batch, cutoff_len=6, neat=False)
    assert plain["input_ids"] == neat["input_ids"] and plain["labels"] == neat["labels"]
    assert plain["attention_mask"] == [[1] * 6, [1] * 3] and "position_ids" not in plain


def _token_losses(logits, labels):
    """Cross-entropy of every position's prediction of the next label (0 where it is not trained)."""
    import torch.nn.functional as F

    losses = F.cross_entropy(logits[:-1].float(), labels[1:], ignore_index=IGNORE_INDEX, reduction="none")
    return losses, labels[1:] != IGNORE_INDEX


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_neat_packing_equals_unpacked_and_plain_packing_does_not(tiny_model_dir, tiny_tok, attention):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attention).eval()
    conversations = [[user("hello"), assistant("hi there")],
                     [user("what is the cat doing"), assistant("the cat sat on the mat")],
                     [user("and then"), assistant("it slept"), user("where"), assistant("on the mat")],
                     [user("a long question about the weather in the city today"), assistant("it is cold")],
                     [user("ok"), assistant("fine")]]
    samples = run("sft", tiny_tok, [{"messages": m} for m in conversations], "chatml")
    lengths = [len(s["input_ids"]) for s in samples]
    batch = columns_of(samples)
    cutoff = max(lengths) + min(lengths) + 2  # room for two or three samples per row
    neat_rows = rows_of(pack_rows(batch, cutoff_len=cutoff, neat=True))
    plain_rows = rows_of(pack_rows(batch, cutoff_len=cutoff, neat=False))
    assert len({len(row["input_ids"]) for row in neat_rows}) > 1  # so the collator pads
    collate = DataCollator(tiny_tok)
    neat, plain = collate(neat_rows), collate(plain_rows)
    assert "attention_mask" not in neat

    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([s["input_ids"]]), use_cache=False).logits[0] for s in samples]
        neat_out = model(**neat, use_cache=False)
        plain_logits = model(**plain, use_cache=False).logits
        cached_logits = model(**neat).logits  # transformers' default: the KV cache on

    # Cut the packed rows back into samples where the position ids restart, and match them by their tokens.
    by_tokens = {tuple(s["input_ids"]): i for i, s in enumerate(samples)}
    seen, leak, cache_leak = [], 0.0, 0.0
    for row, positions in enumerate(neat["position_ids"]):
        starts = (positions == 0).nonzero().flatten().tolist() + [len(positions)]
        for start, end in zip(starts, starts[1:]):
            index = by_tokens.get(tuple(neat["input_ids"][row, start:end].tolist()))
            if index is None:
                continue  # a pad token
            seen.append(index)
            torch.testing.assert_close(neat_out.logits[row, start:end], alone[index], atol=2e-5, rtol=1e-4)
            packed_losses, trained = _token_losses(neat_out.logits[row, start:end], neat["labels"][row, start:end])
            alone_losses, alone_trained = _token_losses(alone[index], torch.tensor(samples[index]["labels"]))
            assert trained.tolist() == alone_trained.tolist()
            torch.testing.assert_close(packed_losses[trained].mean(), alone_losses[alone_trained].mean())
            leak = max(leak, (plain_logits[row, start:end] - alone[index]).abs().max().item())
            cache_leak = max(cache_leak, (cached_logits[row, start:end] - alone[index]).abs().max().item())
    assert sorted(seen) == list(range(len(samples)))
    # transformers' own loss over the packed batch: the mean over every trained token of every sample
    per_sample = [_token_losses(alone[i], torch.tensor(s["labels"])) for i, s in enumerate(samples)]
    total = sum(losses[trained].sum() for losses, trained in per_sample) / sum(t.sum() for _, t in per_sample)
    torch.testing.assert_close(neat_out.loss, total)
    # plain packing lets samples see each other; so does neat packing with the KV cache on
    assert leak > 1e-2 and cache_leak > 1e-2


# ---------------------------------------------------------------- collator


def test_collator_pads_every_column_kind(tiny_tok):
    import torch

    pad = tiny_tok.pad_token_id
    features = [{"chosen_input_ids": [5, 6, 7], "chosen_attention_mask": [1, 1, 1], "chosen_labels": [-100, 6, 7],
                 "rejected_input_ids": [5, 8], "rejected_attention_mask": [1, 1], "rejected_labels": [-100, 8],
                 "kto_tags": True, "messages": "dropped"},
                {"chosen_input_ids": [9], "chosen_attention_mask": [1], "chosen_labels": [9],
                 "rejected_input_ids": [9, 10, 11, 12], "rejected_attention_mask": [1] * 4,
                 "rejected_labels": [-100, 10, 11, 12], "kto_tags": False, "messages": "dropped"}]
    batch = DataCollator(tiny_tok)(features)
    assert set(batch) == {"chosen_input_ids", "chosen_attention_mask", "chosen_labels", "rejected_input_ids",
                          "rejected_attention_mask", "rejected_labels", "kto_tags"}
    assert batch["chosen_input_ids"].tolist() == [[5, 6, 7], [9, pad, pad]]
    assert batch["chosen_attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["chosen_labels"].tolist() == [[-100, 6, 7], [9, -100, -100]]
    assert batch["rejected_input_ids"].tolist() == [[5, 8, pad, pad], [9, 10, 11, 12]]
    assert batch["kto_tags"].tolist() == [True, False] and batch["chosen_input_ids"].dtype == torch.long

    neat = DataCollator(tiny_tok, pad_to_multiple_of=4)([{"input_ids": [1, 2, 3, 4, 5], "position_ids": [0, 1, 2, 0, 1],
                                                         "labels": [-100, 2, 3, -100, 5]},
                                                        {"input_ids": [6], "position_ids": [0], "labels": [-100]}])
    assert set(neat) == {"input_ids", "position_ids", "labels"}  # no attention_mask is made up
    assert neat["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 0, 0], [0] * 8]
    assert neat["input_ids"].tolist()[1] == [6] + [pad] * 7


def test_collator_pads_left_for_generation(tiny_tok):
    import copy

    left = copy.deepcopy(tiny_tok)
    left.padding_side = "left"
    pad = left.pad_token_id
    batch = DataCollator(left)([{"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1], "labels": [7]},
                                {"input_ids": [4], "attention_mask": [1], "labels": [8, 9]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [pad, pad, 4]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 7], [8, 9]]  # the reference replies: padded to their own length
