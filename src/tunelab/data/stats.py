"""What a tokenized dataset holds: the token sequences of each data kind, their statistics, and a readable view.

    stats = measure(tokenized, "sft")        # rows, tokens, trained share, length percentiles, truncated rows
    lengths = row_lengths(tokenized, "pairwise")   # per row, the longest of its sequences
    describe_example(row, tokenizer)         # the decoded row, trained tokens between ⟦ ⟧
"""

from dataclasses import dataclass
from itertools import groupby
from typing import Any

from tunelab.data.processing import IGNORE_INDEX, TRUNCATED_COLUMN
from tunelab.data.validation import DatasetReport, RuleCount

#: data kind -> the token sequences of one row: (title, ids column, labels column aligned with the ids, or None where
#: nothing in it is trained). The statistics measure the first; previews show them all. Kind prompt keeps the
#: reference reply in `labels`, not aligned with its inputs.
SEQUENCES = {
    "pt": [("", "input_ids", "labels")],
    "sft": [("", "input_ids", "labels")],
    "pairwise": [("chosen", "chosen_input_ids", "chosen_labels"),
                 ("rejected", "rejected_input_ids", "rejected_labels")],
    "kto": [("", "input_ids", "labels"), ("KL pair", "kl_input_ids", "kl_labels")],
    "prompt": [("prompt", "input_ids", None), ("reference reply", "labels", None)],
}

PERCENTILES = (50, 90, 99)


@dataclass
class TokenStats:
    """Tokens of one tokenized dataset, before packing."""

    rows: int
    tokens: int
    trained: int | None          # tokens with a label; None where labels are not aligned with the inputs
    truncated: int | None        # rows cut by cutoff_len; None when the rows carry no truncation flag
    lengths: dict[str, int]      # p50, p90, p99 (nearest rank) and max of the row lengths


@dataclass
class LoadReport:
    """What loading made of one dataset: what validation kept and skipped, and the tokens of what it kept."""

    split: str                   # "train" or "eval"
    validation: DatasetReport    # samples kept, and skipped per rule with the first offending sample
    tokens: TokenStats

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "LoadReport":
        """The report back from `dataclasses.asdict` (as the cache stores it)."""
        validation = dict(data["validation"])
        validation["skipped"] = {rule: RuleCount(**count) for rule, count in validation["skipped"].items()}
        return cls(data["split"], DatasetReport(**validation), TokenStats(**data["tokens"]))


def row_lengths(tokenized: Any, kind: str) -> Any:
    """Each row's tokens as a batch pads it: the longest of its input sequences (both sides of a pair, kto's KL
    pair), counted in Arrow; a numpy array."""
    import numpy as np
    import pyarrow.compute as pc

    columns = [ids for _, ids, _ in SEQUENCES[kind] if ids.endswith("input_ids")]
    table = tokenized.select_columns(columns).with_format("arrow")[:]
    return np.max([pc.list_value_length(table[c]).to_numpy(zero_copy_only=False) for c in columns], axis=0)


def measure(tokenized: Any, kind: str) -> TokenStats:
    """Row lengths, trained tokens and truncated rows of a tokenized `datasets.Dataset`, counted in Arrow."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    _, ids_column, labels_column = SEQUENCES[kind][0]
    table = tokenized.with_format("arrow")
    lengths = pc.list_value_length(table[ids_column])
    trained = None
    if labels_column is not None:
        labels = pc.list_flatten(table[labels_column])
        # Compared with a scalar of their own type (to_arrow stores int32): a plain int would first cast them all to
        # int64. A column of empty rows only may have no integer type.
        ignored = pa.scalar(IGNORE_INDEX, labels.type) if pa.types.is_integer(labels.type) else IGNORE_INDEX
        trained = int(pc.sum(pc.not_equal(labels, ignored)).as_py() or 0)
    truncated = None
    if TRUNCATED_COLUMN in tokenized.column_names:
        truncated = int(pc.sum(pc.cast(table[TRUNCATED_COLUMN], "int64")).as_py() or 0)
    values = lengths.to_numpy()
    marks = np.percentile(values, PERCENTILES, method="inverted_cdf") if len(values) else [0] * len(PERCENTILES)
    summary = {f"p{p}": int(mark) for p, mark in zip(PERCENTILES, marks)}
    return TokenStats(rows=len(values), tokens=int(values.sum()), trained=trained, truncated=truncated,
                      lengths={**summary, "max": int(values.max()) if len(values) else 0})


def describe_tokens(stats: TokenStats) -> str:
    """One line: rows, tokens, trained share, length percentiles, truncation."""
    parts = [f"{stats.rows} rows, {stats.tokens} tokens"]
    if stats.trained is not None:
        parts.append(f"{stats.trained / max(stats.tokens, 1):.1%} trained")
    parts.append("length " + " ".join(f"{name} {value}" for name, value in stats.lengths.items()))
    if stats.truncated is not None:
        parts.append(f"{stats.truncated} truncated by cutoff_len")
    return ", ".join(parts)


def describe_example(row: dict[str, list[int]], tokenizer: Any, marks: tuple[str, str] = ("⟦", "⟧"),
                     ids_column: str = "input_ids", labels_column: str | None = "labels") -> str:
    """Decode a tokenized sample, wrapping each run of trained tokens (labels != -100) in `marks`.

    With `labels_column` None (a sequence nothing in is trained) the ids are decoded as they are. A run of one special
    token (the hundreds of pad tokens an image becomes) is written once with its count: `<|image_pad|>×84`.
    """
    labels = row[labels_column] if labels_column is not None else [IGNORE_INDEX] * len(row[ids_column])
    runs: list[tuple[bool, list[int]]] = []
    for token, label in zip(row[ids_column], labels):
        trained = label != IGNORE_INDEX
        if runs and runs[-1][0] == trained:
            runs[-1][1].append(token)
        else:
            runs.append((trained, [token]))
    opening, closing = marks
    special = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    text = ""
    for trained, ids in runs:
        piece = _decode_runs(tokenizer, ids, special)
        text += f"{opening}{piece}{closing}" if trained else piece
    return text


#: From this many copies in a row, a special token is written once with its count.
SHOWN_ONCE = 4


def _decode_runs(tokenizer: Any, ids: list[int], special: set[int]) -> str:
    """The ids decoded, each run of SHOWN_ONCE or more copies of one special token written as `token×count`."""
    pieces, plain = [], []
    for token, copies in groupby(ids):
        count = len(list(copies))
        if token in special and count >= SHOWN_ONCE:
            pieces += [tokenizer.decode(plain, skip_special_tokens=False),
                       f"{tokenizer.decode([token], skip_special_tokens=False)}×{count}"]
            plain = []
        else:
            plain += [token] * count
    return "".join(pieces) + tokenizer.decode(plain, skip_special_tokens=False)
