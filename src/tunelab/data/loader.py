"""Build the training and evaluation sets a run asks for.

    splits = load_datasets(config, tokenizer, template)   # call template.prepare_tokenizer(tokenizer) first

Per dataset name: look it up in dataset_info.json, read its files with `datasets` (json, csv, parquet, text and
arrow builders) or the hub, take `num_samples` / `max_samples`, convert the rows to the internal form (refusing
invalid ones with a count per rule), then concatenate the datasets, hold out `val_size` with `config.seed`, and
tokenize with `datasets.map` (`preprocessing_num_workers` processes). `datasets` and numpy are imported here, inside
the functions, so importing `tunelab.data` stays cheap.
"""

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.data.formats import check_not_empty, convert_batch, features, invalid_report
from tunelab.data.processing import IGNORE_INDEX, PROCESSORS
from tunelab.data.registry import BUILDERS, DataError, DatasetSpec, resolve_datasets

logger = logging.getLogger(__name__)


@dataclass
class DatasetSplits:
    """Tokenized sets: columns input_ids, attention_mask, labels. `eval` is None without val_size/eval_dataset."""

    train: Any = None
    eval: Any = None


def load_datasets(config: Any, tokenizer: Any, template: Any = None) -> DatasetSplits:
    """Load, convert, split and tokenize `config.dataset` and `config.eval_dataset` (template: stage sft only)."""
    if config.stage not in PROCESSORS:
        raise DataError(f"stage {config.stage!r} has no data processing; expected one of {', '.join(PROCESSORS)}")
    if config.stage == "sft" and template is None:
        raise DataError("stage sft needs a chat template: build one with tunelab.data.get_template")
    train = _load_group(config.dataset, config)
    evaluation = _load_group(config.eval_dataset, config)
    if train is not None and config.val_size > 0:
        train, evaluation = _hold_out(train, config)
    splits = DatasetSplits(_tokenize(train, "train", config, tokenizer, template),
                           _tokenize(evaluation, "eval", config, tokenizer, template))
    if splits.train is not None and len(splits.train):
        logger.info("train example (trained tokens between ⟦ ⟧):\n%s", describe_example(splits.train[0], tokenizer))
    return splits


def describe_example(row: dict[str, list[int]], tokenizer: Any) -> str:
    """Decode a tokenized sample, wrapping the trained runs of tokens (labels != -100) in ⟦ ⟧."""
    runs: list[tuple[bool, list[int]]] = []
    for token, label in zip(row["input_ids"], row["labels"]):
        trained = label != IGNORE_INDEX
        if runs and runs[-1][0] == trained:
            runs[-1][1].append(token)
        else:
            runs.append((trained, [token]))
    text = ""
    for trained, ids in runs:
        piece = tokenizer.decode(ids, skip_special_tokens=False)
        text += f"⟦{piece}⟧" if trained else piece
    return text


def _load_group(names: list[str] | None, config: Any) -> Any:
    """The named datasets, each loaded, sampled and converted, concatenated in order (None without names)."""
    if not names:
        return None
    from datasets import concatenate_datasets

    parts = [_load_one(spec, config) for spec in resolve_datasets(names, config.dataset_dir)]
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def _load_one(spec: DatasetSpec, config: Any) -> Any:
    raw = _read(spec, config)
    raw, rows = _sample(raw, spec, config)
    converted = raw.map(
        convert_batch, batched=True, batch_size=config.preprocessing_batch_size, num_proc=_workers(config, raw),
        remove_columns=raw.column_names, features=features(config.stage), fn_kwargs={"spec": spec,
                                                                                     "stage": config.stage},
        load_from_cache_file=not config.overwrite_cache, desc=f"converting {spec.name}")
    rules = list(converted["_rule"])
    check_not_empty(spec, rules, config.stage, rows)
    refused, detail = invalid_report(spec, rules, rows)
    if refused:
        logger.warning("dataset %r: skipped %d of %d samples: %s", spec.name, refused, len(rules), detail)
        converted = converted.select([i for i, rule in enumerate(rules) if not rule])
    logger.info("dataset %r: %d samples (%s)", spec.name, len(converted), spec.where)
    return converted.remove_columns("_rule")


def _read(spec: DatasetSpec, config: Any) -> Any:
    """The raw rows of one dataset as a `datasets.Dataset`."""
    from datasets import load_dataset

    if spec.hub_url is not None:
        if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("", "0", "false", "no", "off"):
            raise DataError(f"dataset {spec.name!r} is on the Hugging Face hub ({spec.hub_url}), which is not "
                            f"reachable: HF_HUB_OFFLINE is set. Download it and point `file_name` at the files, or "
                            f"unset HF_HUB_OFFLINE on a machine with network access")
        try:
            return load_dataset(spec.hub_url, name=spec.subset, data_dir=spec.folder, split=spec.split,
                                cache_dir=config.cache_dir, token=config.hf_hub_token)
        except Exception as err:  # connection errors come in many types (OSError, requests, huggingface_hub)
            raise DataError(f"dataset {spec.name!r}: could not load {spec.hub_url} from the Hugging Face hub "
                            f"(not reachable, or no such dataset): {err}") from err
    files = spec.files()
    builder = BUILDERS[files[0].suffix]
    try:
        return load_dataset(builder, data_files=[str(f) for f in files], split="train", cache_dir=config.cache_dir)
    except Exception as err:  # datasets wraps parse errors in DatasetGenerationError without the position
        problem = _find_json_error(files) if builder == "json" else None
        cause = err.__cause__ or err
        raise DataError(f"dataset {spec.name!r}: " + (problem or f"{spec.where}: cannot be read by the {builder} "
                                                       f"builder of `datasets`: {cause}")) from err


def _find_json_error(files: list[Path]) -> str | None:
    """`file:line:column: message` of the first JSON syntax error, reading .json as one document or as JSON lines."""
    for path in files:
        text = path.read_text(encoding="utf-8")
        try:
            json.loads(text)
            continue
        except json.JSONDecodeError as whole:
            document_error = f"{path}:{whole.lineno}:{whole.colno}: invalid JSON: {whole.msg}"
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                json.loads(line)
            except json.JSONDecodeError as err:
                line_error = f"{path}:{lineno}:{err.colno}: invalid JSON line: {err.msg}"
                break
        else:
            continue  # valid JSON lines
        looks_like_lines = path.suffix == ".jsonl" or not text.lstrip().startswith("[")
        return line_error if looks_like_lines else document_error
    return None


def _sample(raw: Any, spec: DatasetSpec, config: Any) -> tuple[Any, list[int] | None]:
    """Apply `num_samples` (seeded subset, or repeats when larger) then `max_samples` (the first N).

    Returns the rows and, when they were reordered, the file row of each (for messages about invalid rows).
    """
    rows = None
    if spec.num_samples is not None and len(raw) and spec.num_samples != len(raw):
        import numpy as np

        rng = np.random.default_rng(config.seed)
        repeats, rest = divmod(spec.num_samples, len(raw))
        rows = np.concatenate([np.tile(np.arange(len(raw)), repeats), rng.permutation(len(raw))[:rest]]).tolist()
        raw = raw.select(rows)
    if config.max_samples is not None and len(raw) > config.max_samples:
        raw = raw.select(range(config.max_samples))
        rows = rows[:config.max_samples] if rows is not None else None
    return raw, rows


def _hold_out(train: Any, config: Any) -> tuple[Any, Any]:
    """Split `val_size` (a share below 1, a count from 1) off the training samples, shuffled with `config.seed`."""
    size = int(config.val_size) if config.val_size >= 1 else config.val_size
    if isinstance(size, int) and size >= len(train):
        raise DataError(f"`val_size: {config.val_size}` leaves nothing to train on: the datasets hold {len(train)} "
                        f"samples")
    try:
        parts = train.train_test_split(test_size=size, seed=config.seed,
                                       load_from_cache_file=not config.overwrite_cache)
    except ValueError as err:  # a share too small for one sample, or too large to leave one
        raise DataError(f"`val_size: {config.val_size}` cannot split {len(train)} samples: {err}") from err
    return parts["train"], parts["test"]


def _tokenize(dataset: Any, split: str, config: Any, tokenizer: Any, template: Any) -> Any:
    if dataset is None:
        return None
    kwargs: dict[str, Any] = {"tokenizer": tokenizer, "cutoff_len": config.cutoff_len}
    if config.stage == "sft":
        kwargs.update(template=template, train_on_prompt=config.train_on_prompt, mask_history=config.mask_history)
    tokenized = dataset.map(
        PROCESSORS[config.stage], batched=True, batch_size=config.preprocessing_batch_size,
        num_proc=_workers(config, dataset), remove_columns=dataset.column_names, fn_kwargs=kwargs,
        load_from_cache_file=not config.overwrite_cache, desc=f"tokenizing the {split} set")
    unit = "chunks" if config.stage == "pt" else "samples"
    logger.info("%s set: %d %s of at most %d tokens", split, len(tokenized), unit, config.cutoff_len)
    return tokenized


def _workers(config: Any, dataset: Any) -> int | None:
    workers = config.preprocessing_num_workers
    return min(workers, len(dataset)) if workers and workers > 1 and len(dataset) > 1 else None
