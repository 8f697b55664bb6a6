"""Samples in the internal form -> model inputs. `labels` hold -100 (`IGNORE_INDEX`) where nothing is trained.

The loader maps every dataset through one function of `PROCESSORS`, picked by the stage's data kind:

    fn = PROCESSORS[registry.data_kind(config.stage)]
    dataset.map(fn, batched=True, remove_columns=dataset.column_names,
                fn_kwargs={"tokenizer": tokenizer, "template": template, "config": config})

Every function has the signature `fn(batch, *, tokenizer, template, config, media=None) -> dict[str, list]` and
reads these config keys (and no others, so a cache key over them is complete): `cutoff_len`; sft also
`train_on_prompt` and `mask_history`. The kinds, the stages that use them, the columns they read and the columns
they return:

* `pt` (pt): text -> input_ids, attention_mask, labels.
* `sft` (sft): messages, system, tools -> input_ids, attention_mask, labels.
* `pairwise` (rm, dpo, orpo, simpo): messages (the prompt), chosen, rejected, system, tools ->
  chosen_input_ids, chosen_attention_mask, chosen_labels, rejected_input_ids, rejected_attention_mask,
  rejected_labels.
* `kto` (kto): messages (ending with the reply), kto_tag, system, tools -> input_ids, attention_mask, labels,
  kto_tags, kl_input_ids, kl_attention_mask, kl_labels.
* `prompt` (ppo, grpo, prediction): messages (ending with a reference reply, or on the prompt side when there is
  none), system, tools -> input_ids, attention_mask, labels.

What each does:

* pt: each document plus eos, concatenated and cut into cutoff_len chunks (each opening with bos when the tokenizer
  adds one); labels are the inputs. This chunking is pt's packing.
* sft: each conversation through the chat template; the replies are trained (with their end-of-turn tokens, as
  LLaMA-Factory does), the prompts only with `train_on_prompt`, and only the last reply with `mask_history`.
  Too long a conversation keeps whole turns from its start; when even one turn is too long, its prompt is cut from
  the left (the question right before the reply survives), and its reply is cut only when it alone fills the
  window. A sample never ends up with nothing to train on.
* pairwise: `chosen` and `rejected` (each one assistant message dict) each follow the shared prompt `messages`.
  The prompt (all earlier turns included) is never trained and is the same tokens in both; both are cut to
  cutoff_len by one cut: the prompt from the left, then both replies to the room left.
* kto: the sample, and a KL pair of this sample's prompt with the reply of the next sample in the batch (rotated, so
  with two or more samples in a batch the KL reply is never the sample's own; a batch of one pairs it with itself).
  The KL pair joins token ids, not text: it is the estimate of the reference KL, not a sample to learn from.
* prompt: the whole conversation before the last reply, ending with the generation prompt (what a model generates
  from), cut from the left to cutoff_len; `labels` are the reference reply's ids (with its end-of-turn tokens),
  unmasked and not aligned with `input_ids`, for metrics; empty when the conversation has no reference.

With a vision-language model, `media` (a `data.media.MediaProcessor`) is given, and sft, pairwise and prompt
samples may hold images and videos (the loader refuses them for pt and kto): each `<image>` / `<video>` placeholder
becomes its vision block (`media.expand`, with the token counts `data.media.checks` measured per file) before the
template renders the conversation; vision tokens are never trained, also with `train_on_prompt`; each row keeps its
`images` and `videos` for the collator, and `_media_rule` says when cutoff_len cut into a vision block (the model
could not match such a block to its image): the loader then skips the sample and reports it, as LLaMA-Factory
cannot train on it either.

The pure functions (`sft_example`, `fit_turn`, `pairwise_example`, `chunk_documents`) are what the tests pin down;
the `*_batch` functions wrap them for `datasets.map(batched=True)`, each encoding its whole batch with one tokenizer
call (`Template.encode_batch`; pt: the tokenizer's own batch call). Packing SFT rows is `tunelab.data.packing`.
"""

from collections.abc import Callable
from itertools import chain
from typing import Any

from tunelab.data.gc_paused import gc_paused


IGNORE_INDEX = -100

Pairs = list[tuple[list[int], list[int]]]
#: The ends of the names of the columns that hold token ids (or masks), in every sequence group.
TOKEN_COLUMNS = ("input_ids", "attention_mask", "labels")
Columns = dict[str, list]


def fit_turn(prompt: list[int], response: list[int], cutoff_len: int) -> tuple[list[int], list[int]]:
    """Fit one turn into cutoff_len tokens, keeping the response whole whenever it leaves room for a prompt token."""
    if len(prompt) + len(response) <= cutoff_len:
        return prompt, response
    if len(response) < cutoff_len:
        keep = cutoff_len - len(response)
        return prompt[len(prompt) - keep:], response
    # The response alone fills the window: keep the end of the prompt (at most half) and the start of the response.
    keep = min(len(prompt), cutoff_len // 2)
    return prompt[len(prompt) - keep:], response[:cutoff_len - keep]


def prompt_and_reply(pairs: Pairs) -> tuple[list[int], list[int]]:
    """An encoded conversation as one prompt (every earlier turn included) and its last reply."""
    history = [i for prompt, response in pairs[:-1] for i in prompt + response]
    return history + pairs[-1][0], pairs[-1][1]


def sft_example(pairs: Pairs, cutoff_len: int, train_on_prompt: bool = False,
                mask_history: bool = False) -> tuple[list[int], list[int]]:
    """input_ids and labels of one encoded conversation (a list of (prompt_ids, response_ids) turns)."""
    if mask_history:
        # Only the last reply is trained: everything before it is one long prompt.
        pairs = [prompt_and_reply(pairs)]
    kept, used = [], 0
    for prompt, response in pairs:
        if used + len(prompt) + len(response) > cutoff_len:
            break
        kept.append((prompt, response))
        used += len(prompt) + len(response)
    if not kept:
        kept = [fit_turn(*pairs[0], cutoff_len)]
    input_ids, labels = [], []
    for prompt, response in kept:
        input_ids += prompt + response
        labels += (prompt if train_on_prompt else [IGNORE_INDEX] * len(prompt)) + response
    return input_ids, labels


def shared_prompt(chosen: tuple[list[int], list[int]],
                  rejected: tuple[list[int], list[int]]) -> tuple[list[int], list[int], list[int]]:
    """(prompt, chosen reply, rejected reply) with one prompt both conversations start with, token for token.

    The two prompts are the same text, but a token that spans the prompt/reply border belongs to the reply
    (`template.split_tokens`), so they can differ at their ends. Their common start is the prompt; whatever follows
    goes with each reply, so each prompt + reply is still exactly its conversation's tokens.
    """
    full_chosen, full_rejected = chosen[0] + chosen[1], rejected[0] + rejected[1]
    limit = min(len(chosen[0]), len(rejected[0]))
    common = next((n for n in range(limit) if full_chosen[n] != full_rejected[n]), limit)
    return full_chosen[:common], full_chosen[common:], full_rejected[common:]


def pairwise_example(prompt: list[int], chosen: list[int], rejected: list[int],
                     cutoff_len: int) -> tuple[list[int], list[int], list[int]]:
    """Cut a preference pair to cutoff_len: one prompt cut (from the left) for both, then each reply to the room left.

    The cut is the one `fit_turn` makes for the longer reply, so the prompt stays identical in both sequences.
    """
    kept_prompt, _ = fit_turn(prompt, max(chosen, rejected, key=len), cutoff_len)
    room = cutoff_len - len(kept_prompt)
    return kept_prompt, chosen[:room], rejected[:room]


def supervised(prompt: list[int], response: list[int]) -> tuple[list[int], list[int]]:
    """input_ids and labels of a prompt (not trained) followed by a response (trained)."""
    return prompt + response, [IGNORE_INDEX] * len(prompt) + response


#: Whether cutoff_len cut tokens off the sample (either sequence of a pair); the loader counts it, then drops it.
TRUNCATED_COLUMN = "_truncated"
#: With a vision-language model: each row's files (kept for the collator), the tokens of each of its files (read,
#: measured by data/media/checks.py), and the rule a row breaks ("" when none; the loader skips such rows).
MEDIA_COLUMNS = ("images", "videos")
IMAGE_TOKENS_COLUMN, VIDEO_TOKENS_COLUMN = "_image_tokens", "_video_tokens"
MEDIA_RULE_COLUMN = "_media_rule"


def _new_columns(*prefixes: str, media: Any = None) -> Columns:
    """Empty sequence columns for each prefix ("" for the plain ones), the truncation flag, and the media columns."""
    columns = {prefix + name: [] for prefix in prefixes for name in ("input_ids", "attention_mask", "labels")}
    if media is not None:
        columns.update({name: [] for name in (*MEDIA_COLUMNS, MEDIA_RULE_COLUMN)})
    return {**columns, TRUNCATED_COLUMN: []}


def _expanded(messages: list[dict], batch: Columns, index: int, media: Any) -> list[dict]:
    """The messages with their image and video placeholders expanded to vision blocks (with a vision model, for a
    dataset that has media: data/media/checks.py measured its files)."""
    if media is None or IMAGE_TOKENS_COLUMN not in batch:
        return messages
    return media.expand(messages, batch[IMAGE_TOKENS_COLUMN][index], batch[VIDEO_TOKENS_COLUMN][index])


def _add_media(out: Columns, batch: Columns, index: int, media: Any, full: list[int], kept: list[int]) -> None:
    """A row's files, and whether cutoff_len kept fewer vision tokens (`kept`) than the whole sample has (`full`)."""
    if media is None:
        return
    for column in MEDIA_COLUMNS:
        out[column].append(batch[column][index])
    total, lost = media.count_vision(full), media.count_vision(full) - media.count_vision(kept)
    out[MEDIA_RULE_COLUMN].append(f"vision tokens cut by cutoff_len: {lost} of its {total} vision tokens do not fit"
                                  if lost else "")


def _add_row(out: Columns, input_ids: list[int], labels: list[int], prefix: str = "", media: Any = None) -> None:
    if media is not None:
        labels = media.mask_labels(input_ids, labels, IGNORE_INDEX)
    out[f"{prefix}input_ids"].append(input_ids)
    out[f"{prefix}attention_mask"].append([1] * len(input_ids))
    out[f"{prefix}labels"].append(labels)


def _conversations(batch: Columns, media: Any = None) -> list[tuple[list[dict], str | None, str | None]]:
    """(messages, system, tools) of every row, the media placeholders expanded (see `_expanded`)."""
    return [(_expanded(messages, batch, index, media), system, tools)
            for index, (messages, system, tools) in enumerate(zip(batch["messages"], batch["system"], batch["tools"]))]


def sft_batch(batch: Columns, *, tokenizer: Any, template: Any, config: Any, media: Any = None) -> Columns:
    """Kind sft: one row per conversation, the replies trained (see the module docstring)."""
    out = _new_columns("", media=media)
    for index, pairs in enumerate(template.encode_batch(tokenizer, _conversations(batch, media))):
        _add_row(out, *sft_example(pairs, config.cutoff_len, config.train_on_prompt, config.mask_history),
                 media=media)
        out[TRUNCATED_COLUMN].append(sum(len(prompt) + len(reply) for prompt, reply in pairs)
                                     > len(out["input_ids"][-1]))
        if media is not None:
            full = [i for prompt, reply in pairs for i in prompt + reply]
            _add_media(out, batch, index, media, full, out["input_ids"][-1])
    return out


def pairwise_batch(batch: Columns, *, tokenizer: Any, template: Any, config: Any, media: Any = None) -> Columns:
    """Kind pairwise (rm, dpo, orpo, simpo): a chosen and a rejected sequence per row, sharing one prompt."""
    out = _new_columns("chosen_", "rejected_", media=media)
    # Both conversations of every row in one tokenizer call: row i's chosen at 2i, its rejected at 2i + 1.
    rows = zip(batch["messages"], batch["system"], batch["tools"], batch["chosen"], batch["rejected"])
    conversations = [(_expanded([*messages, reply], batch, index, media), system, tools)
                     for index, (messages, system, tools, *replies) in enumerate(rows) for reply in replies]
    encoded = [prompt_and_reply(pairs) for pairs in template.encode_batch(tokenizer, conversations)]
    for index, (chosen, rejected) in enumerate(zip(encoded[0::2], encoded[1::2])):
        full_prompt, full_chosen, full_rejected = shared_prompt(chosen, rejected)
        out[TRUNCATED_COLUMN].append(len(full_prompt) + max(len(full_chosen), len(full_rejected)) > config.cutoff_len)
        prompt, chosen_ids, rejected_ids = pairwise_example(full_prompt, full_chosen, full_rejected, config.cutoff_len)
        _add_row(out, *supervised(prompt, chosen_ids), prefix="chosen_", media=media)
        _add_row(out, *supervised(prompt, rejected_ids), prefix="rejected_", media=media)
        _add_media(out, batch, index, media, full_prompt + full_chosen + full_rejected,
                   prompt + chosen_ids + rejected_ids)
    return out


def kto_batch(batch: Columns, *, tokenizer: Any, template: Any, config: Any, media: Any = None) -> Columns:
    """Kind kto: the sample with its tag, and its KL pair (its prompt, the next sample's reply). Text only: the
    loader refuses kto samples with images or videos (`media` is not used)."""
    encoded = [prompt_and_reply(pairs) for pairs in template.encode_batch(tokenizer, _conversations(batch))]
    other_replies = [reply for _, reply in encoded[1:] + encoded[:1]]
    out = {**_new_columns("", "kl_"), "kto_tags": [bool(tag) for tag in batch["kto_tag"]]}
    for (prompt, reply), other_reply in zip(encoded, other_replies):
        _add_row(out, *supervised(*fit_turn(prompt, reply, config.cutoff_len)))
        out[TRUNCATED_COLUMN].append(len(prompt) + len(reply) > config.cutoff_len)
        _add_row(out, *supervised(*fit_turn(prompt, other_reply, config.cutoff_len)), prefix="kl_")
    return out


def prompt_batch(batch: Columns, *, tokenizer: Any, template: Any, config: Any, media: Any = None) -> Columns:
    """Kind prompt (ppo, grpo, prediction): the prompt to generate from, the reference reply as labels."""
    out = _new_columns("", media=media)
    conversations = _conversations(batch, media)
    # Roles alternate from the prompt side, so an odd count ends on it: no reference answer, no labels. An empty
    # reply stands in for the missing one, whose prompt is then the generation prompt (as `encode_prompt`).
    answered = [len(messages) % 2 == 0 for messages, _, _ in conversations]
    conversations = [(messages if done else [*messages, {"role": "assistant", "content": ""}], system, tools)
                     for (messages, system, tools), done in zip(conversations, answered)]
    for index, pairs in enumerate(template.encode_batch(tokenizer, conversations)):
        prompt, reply = prompt_and_reply(pairs)
        # Cut from the left: the end of the prompt is the question and the generation prompt.
        _add_row(out, prompt[-config.cutoff_len:], reply if answered[index] else [])
        out[TRUNCATED_COLUMN].append(len(prompt) > config.cutoff_len)
        _add_media(out, batch, index, media, prompt, out["input_ids"][-1])
    return out


def chunk_documents(documents: list[list[int]], cutoff_len: int, eos_id: int,
                    bos_id: int | None = None) -> list[list[int]]:
    """Join documents with eos after each and cut into cutoff_len chunks, each led by bos when given.

    Every chunk is cutoff_len long except the last, which keeps the remainder (small datasets are not thrown away).
    """
    stream = [i for doc in documents for i in (*doc, eos_id)]
    step = cutoff_len - (bos_id is not None)
    if step < 1:
        raise ValueError(f"cutoff_len {cutoff_len} leaves no room for text after the bos token")
    lead = [bos_id] if bos_id is not None else []
    return [lead + stream[i:i + step] for i in range(0, len(stream), step)]


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts its bos token in front of plain text (Llama 3 does, Qwen does not)."""
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def pt_batch(batch: Columns, *, tokenizer: Any, template: Any, config: Any, media: Any = None) -> Columns:
    """Kind pt: documents chunked to cutoff_len (the template is not used; plain text has no media)."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token to separate documents")
    documents = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id if adds_bos(tokenizer) else None
    chunks = chunk_documents(documents, config.cutoff_len, tokenizer.eos_token_id, bos)
    # Chunking keeps every token (the last chunk holds the remainder): nothing is truncated.
    return {"input_ids": chunks, "attention_mask": [[1] * len(c) for c in chunks], "labels": [list(c) for c in chunks],
            TRUNCATED_COLUMN: [False] * len(chunks)}


#: data kind -> its `datasets.map(batched=True)` function, `fn(batch, *, tokenizer, template, config, media=None)`.
PROCESSORS: dict[str, Callable[..., Columns]] = {
    "pt": pt_batch, "sft": sft_batch, "pairwise": pairwise_batch, "kto": kto_batch, "prompt": prompt_batch,
}


@gc_paused
def arrow_rows(batch: Columns, *, kind: str, **keys: Any) -> Any:
    """`PROCESSORS[kind]` for `datasets.map`, returning a pyarrow Table (`to_arrow`). Rows with images or videos keep
    the processor's lists (their file lists may all be empty in a batch, which Arrow alone could not type)."""
    out = PROCESSORS[kind](batch, **keys)
    return out if keys.get("media") is not None else to_arrow(out)


def to_arrow(out: Columns) -> Any:
    """A processor's columns as a pyarrow Table: each token column goes to Arrow through one flat numpy array, about
    4x faster than `datasets` converts nested lists of Python ints (measured: 0.23 s against 1 s for 50,000 rows of
    275 ids). An attention mask is all ones, as long as its input_ids (`_add_row`, `pt_batch`): it is made from their
    offsets, not read. Columns without rows stay as they are.

    Ids and labels are stored as int32 and the mask as int8 (the collator makes int64 tensors of them): 9 bytes a
    token instead of the 24 of `datasets`' int64 default. The map's file and the cache entry each hold every token, so
    that is 2.6x less to write, and a cache entry 2.6x smaller on disk."""
    if not any(out.values()):
        return out
    import numpy as np
    import pyarrow as pa

    ids = {name: _id_lists(values) for name, values in out.items()
           if name.endswith(TOKEN_COLUMNS) and not name.endswith("attention_mask")}
    table = {}
    for name, values in out.items():
        if name.endswith("attention_mask"):
            rows = ids[name.removesuffix("attention_mask") + "input_ids"]
            table[name] = pa.ListArray.from_arrays(rows.offsets, pa.array(np.ones(len(rows.values), dtype=np.int8)))
        else:
            table[name] = ids[name] if name in ids else pa.array(values)
    return pa.table(table)


def _id_lists(rows: list[list[int]]) -> Any:
    import numpy as np
    import pyarrow as pa

    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum([len(row) for row in rows], out=offsets[1:])
    flat = np.fromiter(chain.from_iterable(rows), dtype=np.int32, count=int(offsets[-1]))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))


#: Kinds whose rows depend on the other samples of their batch (pt chunks the batch's documents together, kto pairs
#: each prompt with the next sample's reply), so another cut of the data into batches gives other rows.
BATCH_BOUND = ("pt", "kto")
