"""A text dataset converted and tokenized in one `datasets.map`, for the kinds whose rows are tokenized one by one.

    tokenized = raw.map(convert_and_tokenize, batched=True, fn_kwargs={"spec": spec, "kind": kind, ...})

The loader's general path converts every row to the internal form in one map (formats.py), reads the rules the rows
break, drops the invalid ones and tokenizes the rest in a second map (processing.py). Between the two maps `datasets`
writes every conversation to Arrow and reads it back into Python, which costs about as much as converting it (about
1 s for 50,000 alpaca samples on one core). Here each batch is converted and its valid rows tokenized at once; the
output keeps one row per input row (an invalid one with no tokens, and its rule), so the loader checks the rules as
before and then keeps the valid rows. The tokens are the same, as the processors of the row-wise kinds (sft,
pairwise, prompt) give each sample the same tokens whatever else its batch holds.

Not for datasets with images, videos or audio (their files are measured between the two maps), nor for pt and kto,
whose rows depend on the other samples of their batch: an invalid sample left in a batch would change them.
"""

from typing import Any

from tunelab.data.formats import NUMBERS_COLUMN, convert_batch
from tunelab.data.gc_paused import gc_paused
from tunelab.data.processing import PROCESSORS, TRUNCATED_COLUMN, to_arrow
from tunelab.data.spec import DatasetSpec
from tunelab.data.validation import MEDIA_PLACEHOLDERS

#: Kinds whose processors tokenize each row on its own.
ROW_WISE_KINDS = ("sft", "pairwise", "prompt")


def fusable(spec: DatasetSpec, kind: str, media: Any) -> bool:
    """Whether `convert_and_tokenize` serves this dataset: a row-wise kind, and no media column in the dataset."""
    return kind in ROW_WISE_KINDS and media is None and not any(spec.column(key) for key in MEDIA_PLACEHOLDERS)


@gc_paused
def convert_and_tokenize(batch: dict[str, list], *, spec: DatasetSpec, stage: str, kind: str, tokenizer: Any,
                         template: Any, config: Any) -> Any:
    """`datasets.map(batched=True)` function: the processor's columns for every row (empty for an invalid row), and
    the `_rule` and numbers columns of `convert_batch`."""
    converted = convert_batch(batch, spec=spec, stage=stage)
    rules = converted["_rule"]
    valid = [index for index, rule in enumerate(rules) if not rule]
    inputs = {name: [values[index] for index in valid] for name, values in converted.items()} \
        if len(valid) < len(rules) else converted
    out = PROCESSORS[kind](inputs, tokenizer=tokenizer, template=template, config=config)
    if len(valid) < len(rules):   # back to one row per input row
        for name, values in out.items():
            filler = False if name == TRUNCATED_COLUMN else []
            full = [filler] * len(rules)
            for index, value in zip(valid, values):
                full[index] = value
            out[name] = full
    out.update({"_rule": rules, NUMBERS_COLUMN: converted[NUMBERS_COLUMN]})
    return to_arrow(out)

