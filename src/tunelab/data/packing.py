"""Pack tokenized SFT rows into fewer rows of at most cutoff_len tokens (`packing`, `neat_packing`).

    packed = tokenized.map(pack_rows, batched=True, remove_columns=tokenized.column_names,
                           fn_kwargs={"cutoff_len": config.cutoff_len, "neat": config.neat_packing})

`remove_columns` is required: packing changes the number of rows. Rows are grouped within each `datasets.map` batch
(`preprocessing_batch_size` rows) by best-fit decreasing, which fills rows about as tightly as bin packing can
without reordering across batches.

Two kinds of packed row:

* plain (`neat=False`): input_ids, attention_mask (all ones), labels. The samples of a row see each other (the
  attention is one causal mask over the row), and positions run on across them.
* neat (`neat=True`): input_ids, labels, position_ids restarting at 0 for every sample, and *no* attention_mask.
  transformers (masking_utils.find_packed_sequence_indices) reads restarting position_ids as packed samples and
  builds a block-diagonal causal mask, so each sample attends only to itself: the same logits and loss as unpacked.
  It does so only when the model gets no attention_mask and no KV cache: the training layer must run the model with
  `use_cache=False` (transformers' default config turns the cache on, even in training, and the samples then see
  each other) and must not add an attention_mask. Verified with sdpa and eager attention; the collator pads
  position_ids with 0, which makes every pad token a sample of its own.

In both, the first label of every sample is -100: alone, a sample's first token is never predicted; packed, the
previous sample's last token would otherwise learn to predict it.
"""

from bisect import bisect_left, insort
from collections.abc import Iterable

from tunelab.data.gc_paused import gc_paused
from tunelab.data.processing import IGNORE_INDEX

Columns = dict[str, list]


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins of total length <= capacity.

    Longest first, each into the bin with the least room that still fits it (a new bin when none does).
    """
    bins: list[list[int]] = []
    rooms: list[tuple[int, int]] = []  # (room left, bin index), sorted, so bisect finds the tightest fit
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        length = lengths[index]
        if length > capacity:
            raise ValueError(f"row {index} has {length} tokens, more than the {capacity} a packed row holds")
        fit = bisect_left(rooms, (length, -1))
        if fit == len(rooms):
            bins.append([])
            room, target = capacity, len(bins) - 1
        else:
            room, target = rooms.pop(fit)
        bins[target].append(index)
        insort(rooms, (room - length, target))
    return bins


def join_samples(samples: Iterable[tuple[list[int], list[int], Iterable[int]]]) -> tuple[list, list, list]:
    """(input_ids, labels, positions) of samples -> those of one row holding them back to back, the first label of
    each sample -100 (see the module's docstring)."""
    input_ids, labels, positions = [], [], []
    for ids, sample_labels, sample_positions in samples:
        input_ids += ids
        labels += [IGNORE_INDEX, *sample_labels[1:]][:len(sample_labels)]
        positions += sample_positions
    return input_ids, labels, positions


@gc_paused
def pack_rows(batch: Columns, *, cutoff_len: int, neat: bool) -> Columns:
    """`datasets.map(batched=True)` function: tokenized SFT rows (input_ids, labels) -> packed rows."""
    third = "position_ids" if neat else "attention_mask"
    out: Columns = {"input_ids": [], "labels": [], third: []}
    for members in best_fit_decreasing([len(ids) for ids in batch["input_ids"]], cutoff_len):
        input_ids, labels, positions = join_samples(
            (batch["input_ids"][i], batch["labels"][i], range(len(batch["input_ids"][i]))) for i in members)
        out["input_ids"].append(input_ids)
        out["labels"].append(labels)
        out[third].append(positions if neat else [1] * len(input_ids))
    return out
