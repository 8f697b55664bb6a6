"""Batch tokenized rows of every data kind into padded torch tensors.

    collator = DataCollator(tokenizer, pad_to_multiple_of=8)
    batch = collator([dataset[0], dataset[1]])   # {"input_ids": LongTensor[2, L], "attention_mask": ..., ...}

Sequence columns are padded to the longest row of their column (rounded up to `pad_to_multiple_of`): input_ids with
the tokenizer's pad id, attention_mask with 0, labels with -100, position_ids with 0. The same holds for their
`chosen_`, `rejected_` (pairwise) and `kl_` (kto) variants. Scalar columns (`kto_tags`) become a tensor as they are.
Any other column (a dataset's leftovers) is left out, as the Trainer would drop it anyway.

With a vision-language model's `media` processor (data/media), the rows' `images` and `videos` become the model's
inputs: `pixel_values` + `image_grid_thw`, `pixel_values_videos` + `video_grid_thw` (+ `second_per_grid_ts` for
Qwen2.5-VL), and every batch, also one without any media, gets `mm_token_type_ids` (1 on image tokens, 2 on video
tokens, 0 elsewhere) for each of its sequence groups: Qwen2-VL needs them to place its 3D positions, and Qwen2.5-VL
without them silently falls back to wrong 1D positions. Images are read and processed here, per batch (as
LLaMA-Factory does), so the tokenized data stays small; with `dataloader_num_workers` that work runs in parallel.

Padding goes on the right, or on the left when `tokenizer.padding_side == "left"` (generation), read at every call.

`padding_free=True` (sft and pt text rows) puts no padding between samples: the batch becomes one row holding its
samples back to back, with position_ids restarting at 0 for each sample, no attention_mask, and the first label of
every sample -100 (the previous sample's last token must not learn to predict it; alone, a first token is never
predicted either). With `pad_to_multiple_of`, each sample is padded at its end to a multiple of it, inside its own
segment (a bf16 run on a CPU keeps its matmul and attention shapes to a few that way), and `token_mask` (1 on the
samples' tokens) comes with the row for counting; the Trainer takes it out before the model's forward. The model
then keeps the samples apart as it does neat-packed rows, and with `sdpa_segments` (model/segment_attention.py)
attends within each at the cost of the samples alone.

Neat-packed rows (`tunelab.data.packing`) have position_ids and no attention_mask, and get none here: an
attention_mask would stop transformers from isolating the packed samples. Their pad positions are 0, so each pad
token counts as a sample of its own and no real token attends to it.

torch is imported on first use, so importing `tunelab.data` stays light.
"""

from typing import Any

from tunelab.data.packing import join_samples
from tunelab.data.processing import IGNORE_INDEX, MEDIA_COLUMNS

#: column -> the value it is padded with; None stands for the tokenizer's pad id.
PAD_VALUES: dict[str, int | None] = {"input_ids": None, "attention_mask": 0, "labels": IGNORE_INDEX, "position_ids": 0}
#: prefixes of the sequence groups some kinds emit besides the plain one: pairwise, kto's KL pair.
PREFIXES = ("", "chosen_", "rejected_", "kl_")
#: columns holding one value per row.
SCALAR_COLUMNS = ("kto_tags",)


class DataCollator:
    """Pads the sequence columns it knows, keeps scalar ones, drops the rest; returns torch tensors."""

    def __init__(self, tokenizer: Any, pad_to_multiple_of: int | None = None, media: Any = None,
                 padding_free: bool = False) -> None:
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; `Template.prepare_tokenizer` sets it before batching")
        self.tokenizer = tokenizer
        self.pad_to_multiple_of = pad_to_multiple_of
        self.media = media
        self.padding_free = padding_free
        self.pad_values = {prefix + name: tokenizer.pad_token_id if value is None else value
                           for prefix in PREFIXES for name, value in PAD_VALUES.items()}

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        if self.padding_free:
            row = flatten(features, self.pad_to_multiple_of or 1, self.pad_values["input_ids"])
            return {name: torch.tensor([values], dtype=torch.long) for name, values in row.items()}
        batch = {}
        for column in features[0]:
            values = [row[column] for row in features]
            if column in self.pad_values:
                batch[column] = torch.tensor(self._pad(values, self.pad_values[column]), dtype=torch.long)
            elif column in SCALAR_COLUMNS:
                batch[column] = torch.tensor(values)
        if self.media is not None:
            batch.update(self.media.batch_inputs(features, batch["input_ids"]))
            for prefix in PREFIXES[1:]:  # the other groups of a row (kto's KL pair) are text only
                if f"{prefix}input_ids" in batch:
                    batch[f"{prefix}mm_token_type_ids"] = torch.zeros_like(batch[f"{prefix}input_ids"])
        return batch

    def _pad(self, rows: list[list[int]], value: int) -> list[list[int]]:
        length = max(len(row) for row in rows)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        left = self.tokenizer.padding_side == "left"
        return [[value] * (length - len(row)) + list(row) if left else list(row) + [value] * (length - len(row))
                for row in rows]


def flatten(features: list[dict[str, Any]], multiple: int = 1, pad_id: int = 0) -> dict[str, list[int]]:
    """Rows of input_ids and labels (position_ids too when neat-packed) -> one row, positions restarting per sample.

    With `multiple` above 1 each sample ends in pad tokens up to a multiple of it (label -100, positions going on),
    which no token of the sample sees, attention being causal; `token_mask` then marks the samples' own tokens."""
    samples, token_mask = [], []
    for row in features:
        ids, labels = list(row["input_ids"]), list(row["labels"])
        positions = list(row.get("position_ids") or range(len(ids)))
        extra = -len(ids) % multiple
        samples.append((ids + [pad_id] * extra, labels + [IGNORE_INDEX] * extra,
                        positions + list(range(positions[-1] + 1, positions[-1] + 1 + extra))))
        token_mask += [1] * len(ids) + [0] * extra
    joined = dict(zip(("input_ids", "labels", "position_ids"), join_samples(samples)))
    return {**joined, "token_mask": token_mask} if multiple > 1 else joined


def split_padding_free(batch: dict[str, Any], max_tokens: int) -> list[dict[str, Any]]:
    """A padding-free batch (one row) -> batches of whole samples, each of at most `max_tokens` tokens (a longer
    sample alone). Samples start where position_ids are 0; their first labels are -100 already, so each piece trains
    what it held in the row.

    The pieces are as few as `max_tokens` allows, and as even as the samples' borders allow: the largest piece sets
    the memory of the step, so of the splits into that many pieces the one whose largest piece is smallest is taken.
    Filling each piece up to `max_tokens` instead would leave a small last one and hold the most memory every step."""
    length = batch["input_ids"].shape[1]
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    fewest = len(_fill(starts, length, max_tokens))
    low, high = 1, max_tokens   # the smallest cap that still gives `fewest` pieces
    while low < high:
        cap = (low + high) // 2
        low, high = (low, cap) if len(_fill(starts, length, cap)) <= fewest else (cap + 1, high)
    return [{name: value[:, piece] for name, value in batch.items()} for piece in _fill(starts, length, low)]


def _fill(starts: list[int], length: int, cap: int) -> list[slice]:
    """Pieces of the row taking samples in order while they fit in `cap` tokens."""
    pieces, begin = [], 0
    for start, end in zip(starts, [*starts[1:], length]):
        if end - begin > cap and start > begin:
            pieces.append(slice(begin, start))
            begin = start
    pieces.append(slice(begin, length))
    return pieces


class PairwiseCollator:
    """B preference pairs -> one batch of 2B rows: the B chosen sequences, then the B rejected ones, all padded to one
    length, so a single forward pass scores both sides of every pair (rm, dpo). Each side of a pair shows the model the
    pair's images and videos."""

    def __init__(self, tokenizer: Any, pad_to_multiple_of: int | None = None, media: Any = None) -> None:
        self.pad = DataCollator(tokenizer, pad_to_multiple_of, media)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        rows = [{**{name: row[side + name] for name in ("input_ids", "attention_mask", "labels")},
                 **{name: row[name] for name in MEDIA_COLUMNS if name in row}}
                for side in ("chosen_", "rejected_") for row in features]
        return self.pad(rows)
