"""Text to (prompt, reply) token pieces, and the internal conversation in the form `apply_chat_template` takes.

A template renders a conversation as text cut into prompt, reply, prompt, reply, ... pieces; `split_tokens` tokenizes
the whole text in one piece, as `tokenizer.apply_chat_template` does, and cuts the ids at the piece borders
(`split_tokens_batch`: the same for a whole batch of conversations in one call of the tokenizer).
"""

import json
from bisect import bisect_right
from itertools import accumulate
from typing import Any
from weakref import WeakKeyDictionary

Pairs = list[tuple[list[int], list[int]]]


def split_tokens(tokenizer: Any, pieces: list[str]) -> list[list[int]]:
    """Tokenize `"".join(pieces)` as one text (as `apply_chat_template` does) and cut its ids at the piece borders.

    The ids are always the whole text's, so prompt and reply ids concatenated are exactly what inference sees. A
    token belongs to the piece its text ends in: one that spans a border (Qwen's "\\n\\n" when a reply starts with a
    newline after "assistant\\n") goes to the later piece. Fast tokenizers say which token holds each border's
    character (or, where that cannot decide, give every token's character span); others are cut where the
    whole-text ids stop agreeing with the ids of the text up to each border.
    """
    return split_tokens_batch(tokenizer, [pieces])[0]


def split_tokens_batch(tokenizer: Any, texts: list[list[str]]) -> list[list[list[int]]]:
    """`split_tokens` of many texts (each a list of pieces), tokenized by one call of the tokenizer's batch path.

    One call per `datasets.map` batch crosses into Rust once instead of once per sample, and lets the tokenizer's
    threads share the texts when TOKENIZERS_PARALLELISM allows (one worker then uses every core for tokenizing).
    """
    backend = _backend(tokenizer)
    if backend is None:
        return [_split_by_prefixes(tokenizer, pieces) for pieces in texts]
    encodings = backend.encode_batch(["".join(pieces) for pieces in texts], add_special_tokens=False)
    out = []
    for encoding, pieces in zip(encodings, texts):
        full = encoding.ids
        cuts = _cuts_at_borders(encoding, pieces, len(full))
        if cuts is None:
            cuts = _cuts_by_spans(encoding, pieces)
        if cuts is None:
            out.append(_split_by_prefixes(tokenizer, pieces))
            continue
        cuts = [0, *cuts, len(full)]
        out.append([full[a:b] for a, b in zip(cuts, cuts[1:])])
    return out


def _cuts_at_borders(encoding: Any, pieces: list[str], tokens: int) -> list[int] | None:
    """Where each piece after the first starts among the tokens: the token that holds the piece's first character,
    provided the token before it ends by the border. A few lookups per text instead of reading every token's span
    (`_cuts_by_spans`, which is what this gives); None where a border character belongs to no token or the tokens
    around a border overlap it."""
    cuts, border, length = [], 0, sum(len(piece) for piece in pieces)
    for piece in pieces[:-1]:
        border += len(piece)
        if border >= length:   # only empty pieces follow: they get no token
            cuts.append(tokens)
            continue
        token = encoding.char_to_token(border)
        if token is None or (token and encoding.token_to_chars(token - 1)[1] > border):
            return None
        cuts.append(token)
    return cuts


def _cuts_by_spans(encoding: Any, pieces: list[str]) -> list[int] | None:
    """The same cuts from every token's character span: a token belongs to the piece its text ends in. None when the
    spans' ends go backwards (then bisecting them means nothing)."""
    ends = [end for _, end in encoding.offsets]
    if ends != sorted(ends):
        return None
    return [bisect_right(ends, border) for border in accumulate(len(piece) for piece in pieces[:-1])]


_PROBE = "<|im_start|>user\n Hi  there,\t世界!\n\n</s><s>[INST] ok ✓<|im_end|>\n"
_backends: "WeakKeyDictionary[Any, Any]" = WeakKeyDictionary()


def _backend(tokenizer: Any) -> Any:
    """The tokenizer's Rust backend when it encodes exactly as the tokenizer does (checked once per tokenizer): calling
    it directly gives character spans and halves the cost of encoding a sample. None for Python tokenizers."""
    if tokenizer not in _backends:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        same = backend is not None and \
            backend.encode(_PROBE, add_special_tokens=False).ids == tokenizer.encode(_PROBE, add_special_tokens=False)
        _backends[tokenizer] = backend if same else None
    return _backends[tokenizer]


def _split_by_prefixes(tokenizer: Any, pieces: list[str]) -> list[list[int]]:
    full = tokenizer("".join(pieces), add_special_tokens=False)["input_ids"]
    prefix_ids = tokenizer(list(accumulate(pieces))[:-1], add_special_tokens=False)["input_ids"]
    cuts = [0]
    for ids in prefix_ids:
        agree = next((n for n, (a, b) in enumerate(zip(ids, full)) if a != b), min(len(ids), len(full)))
        cuts.append(max(agree, cuts[-1]))
    cuts.append(len(full))
    return [full[a:b] for a, b in zip(cuts, cuts[1:])]


def to_hf_messages(messages: list[dict[str, str]], system: str | None) -> list[dict[str, Any]]:
    """The internal conversation as the messages `apply_chat_template` takes (OpenAI style tool calls)."""
    out: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    for message in messages:
        if message["role"] == "tool_call":
            calls = [{"type": "function", "function": call} for call in json.loads(message["content"])]
            out.append({"role": "assistant", "content": "", "tool_calls": calls})
        else:
            out.append({"role": message["role"], "content": message["content"]})
    return out
