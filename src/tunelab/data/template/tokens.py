"""Text to (prompt, reply) token pieces, and the internal conversation in the form `apply_chat_template` takes.

A template renders a conversation as text cut into prompt, reply, prompt, reply, ... pieces; `split_tokens` tokenizes
the whole text in one piece, as `tokenizer.apply_chat_template` does, and cuts the ids at the piece borders
(`split_tokens_batch`: the same for a whole batch of conversations in one call of the tokenizer).

Where the borders fall among the tokens is read, cheapest first, from the tokens' lengths in bytes (byte-level BPE
tokenizers: Qwen, Llama 3, SmolLM2, ...), from the tokens' character spans (other fast tokenizers, and the texts a
byte-level tokenizer's normalizer would change), or from the ids of each text up to a border (Python tokenizers).
All three give the same cuts (tests/data/test_templates.py).
"""

import json
import unicodedata
from bisect import bisect_right
from itertools import accumulate
from typing import Any, NamedTuple
from weakref import WeakKeyDictionary

Pairs = list[tuple[list[int], list[int]]]


def split_tokens(tokenizer: Any, pieces: list[str]) -> list[list[int]]:
    """Tokenize `"".join(pieces)` as one text (as `apply_chat_template` does) and cut its ids at the piece borders.

    The ids are always the whole text's, so prompt and reply ids concatenated are exactly what inference sees. A
    token belongs to the piece its text ends in: one that spans a border (Qwen's "\\n\\n" when a reply starts with a
    newline after "assistant\\n") goes to the later piece. A byte-level tokenizer's tokens are laid end to end by
    their lengths in bytes; other fast tokenizers say which token holds each border's character (or, where that
    cannot decide, give every token's character span); others are cut where the whole-text ids stop agreeing with
    the ids of the text up to each border.
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
    joined = ["".join(pieces) for pieces in texts]
    out: list[list[list[int]] | None] = [None] * len(texts)
    sizes = _byte_sizes(tokenizer)
    if sizes is not None:
        # Ids only: without the character spans the tokenizer takes a sixth less time on the benchmark's texts.
        encodings = backend.encode_batch_fast(joined, add_special_tokens=False)
        for index, (encoding, text, pieces) in enumerate(zip(encodings, joined, texts)):
            out[index] = _cut_by_bytes(encoding.ids, text, pieces, sizes)
    rest = [index for index, split in enumerate(out) if split is None]
    if rest:
        encodings = backend.encode_batch([joined[index] for index in rest], add_special_tokens=False)
        for index, encoding in zip(rest, encodings):
            pieces = texts[index]
            cuts = _cuts_at_borders(encoding, pieces, len(encoding.ids))
            if cuts is None:
                cuts = _cuts_by_spans(encoding, pieces)
            out[index] = _split_by_prefixes(tokenizer, pieces) if cuts is None else _cut(encoding.ids, cuts)
    return out  # type: ignore[return-value]


def _cut(ids: list[int], cuts: list[int]) -> list[list[int]]:
    """`ids` cut before each index of `cuts` (ascending)."""
    bounds = [0, *cuts, len(ids)]
    return [ids[a:b] for a, b in zip(bounds, bounds[1:])]


def _cut_by_bytes(ids: list[int], text: str, pieces: list[str], sizes: "ByteSizes") -> list[list[int]] | None:
    """The ids of `text` (its `pieces` joined) cut at the piece borders from the tokens' lengths in UTF-8 bytes: a
    token belongs to the piece its bytes end in. None where the tokens may not spell the text byte for byte: the
    normalizer would change it (a text not in NFC under an NFC normalizer), or their lengths add up to another."""
    if sizes.nfc and not (text.isascii() or unicodedata.is_normalized("NFC", text)):
        return None
    piece_bytes = [len(piece) if piece.isascii() else len(piece.encode()) for piece in pieces]
    ends = list(accumulate(map(sizes.lengths.__getitem__, ids)))
    if (ends[-1] if ends else 0) != sum(piece_bytes):
        return None
    return _cut(ids, [bisect_right(ends, border) for border in accumulate(piece_bytes[:-1])])


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


class ByteSizes(NamedTuple):
    """Of a byte-level tokenizer: each token id's length in UTF-8 bytes, and whether it normalizes texts to NFC."""

    lengths: list[int]
    nfc: bool


#: tokenizer -> (its vocabulary size when measured, its ByteSizes or None)
_byte_sizes_of: "WeakKeyDictionary[Any, tuple[int, ByteSizes | None]]" = WeakKeyDictionary()
#: A text in pieces whose borders fall inside, between and around special tokens, spaces, newlines and
#: multi-byte characters: a tokenizer cut by bytes must cut it as by character spans.
_BYTE_PROBE = ["<|im_start|>user\n", " Hi  there,\t世界!", "\n\n", "</s><s>[INST] ok", " ✓<|im_end|>\n", "\nZ é"]


def _byte_sizes(tokenizer: Any) -> ByteSizes | None:
    """Each token's length in bytes, for a byte-level BPE tokenizer (every vocabulary entry written in the 256
    characters that stand for bytes) without a normalizer or with NFC; None for any other (checked once per
    tokenizer, on `_BYTE_PROBE` against the character spans, and again when tokens have been added to it)."""
    backend = _backend(tokenizer)
    size = backend.get_vocab_size(with_added_tokens=True)
    if tokenizer not in _byte_sizes_of or _byte_sizes_of[tokenizer][0] != size:
        _byte_sizes_of[tokenizer] = (size, _measure_byte_sizes(backend))
    return _byte_sizes_of[tokenizer][1]


def _measure_byte_sizes(backend: Any) -> ByteSizes | None:
    from tokenizers import normalizers, pre_tokenizers

    normalizer = backend.normalizer
    if normalizer is not None and not isinstance(normalizer, normalizers.NFC) or \
            not hasattr(backend, "encode_batch_fast"):
        return None
    vocabulary = backend.get_vocab(with_added_tokens=False)
    if not set("".join(vocabulary)) <= set(pre_tokenizers.ByteLevel.alphabet()):
        return None   # not byte-level: SentencePiece's "▁", byte-fallback tokens, ...
    added = backend.get_added_tokens_decoder()
    lengths = [0] * (max([*vocabulary.values(), *added]) + 1)
    for token, index in vocabulary.items():
        lengths[index] = len(token)
    for index, token in added.items():
        lengths[index] = len(token.content.encode())
    sizes = ByteSizes(lengths, nfc=normalizer is not None)
    text = "".join(_BYTE_PROBE)
    encoding = backend.encode(text, add_special_tokens=False)
    by_spans = _cuts_by_spans(encoding, _BYTE_PROBE)
    by_bytes = _cut_by_bytes(encoding.ids, text, _BYTE_PROBE, sizes)
    return sizes if by_spans is not None and by_bytes == _cut(encoding.ids, by_spans) else None


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
