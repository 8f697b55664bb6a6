"""Samples in the internal form -> model inputs: `input_ids`, `attention_mask`, `labels` (-100 = not trained).

One function per stage, in `PROCESSORS`:

* sft: each conversation through the chat template; the replies are trained (with their end-of-turn tokens, as
  LLaMA-Factory does), the prompts only with `train_on_prompt`, and only the last reply with `mask_history`.
  Too long a conversation keeps whole turns from its start; when even one turn is too long, its prompt is cut from
  the left (the question right before the reply survives), and its reply is cut only when it alone fills the
  window. A sample never ends up with nothing to train on.
* pt: each document plus eos, concatenated and cut into cutoff_len chunks (each opening with bos when the tokenizer
  adds one); labels are the inputs.

The pure functions (`sft_example`, `fit_turn`, `chunk_documents`) are what the tests pin down; the `*_batch`
functions wrap them for `datasets.map(batched=True)`.
"""

from typing import Any

IGNORE_INDEX = -100

Pairs = list[tuple[list[int], list[int]]]


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


def sft_example(pairs: Pairs, cutoff_len: int, train_on_prompt: bool = False,
                mask_history: bool = False) -> tuple[list[int], list[int]]:
    """input_ids and labels of one encoded conversation (a list of (prompt_ids, response_ids) turns)."""
    if mask_history:
        # Only the last reply is trained: everything before it is one long prompt.
        history = [i for prompt, response in pairs[:-1] for i in prompt + response]
        pairs = [(history + pairs[-1][0], pairs[-1][1])]
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


def sft_batch(batch: dict[str, list], *, tokenizer: Any, template: Any, cutoff_len: int, train_on_prompt: bool,
              mask_history: bool) -> dict[str, list]:
    """`datasets.map(batched=True)` function for stage sft."""
    out: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
    for messages, system, tools in zip(batch["messages"], batch["system"], batch["tools"]):
        pairs = template.encode_turns(tokenizer, messages, system, tools)
        input_ids, labels = sft_example(pairs, cutoff_len, train_on_prompt, mask_history)
        out["input_ids"].append(input_ids)
        out["attention_mask"].append([1] * len(input_ids))
        out["labels"].append(labels)
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


def pt_batch(batch: dict[str, list], *, tokenizer: Any, cutoff_len: int) -> dict[str, list]:
    """`datasets.map(batched=True)` function for stage pt."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token to separate documents")
    documents = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id if adds_bos(tokenizer) else None
    chunks = chunk_documents(documents, cutoff_len, tokenizer.eos_token_id, bos)
    return {"input_ids": chunks, "attention_mask": [[1] * len(c) for c in chunks], "labels": [list(c) for c in chunks]}


#: stage -> its `datasets.map(batched=True)` function (sft reads messages/system/tools, pt reads text).
PROCESSORS = {"sft": sft_batch, "pt": pt_batch}
