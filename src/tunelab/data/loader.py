"""Build the tokenized training and evaluation sets a run asks for.

    splits = load_datasets(config, tokenizer, template)   # call template.prepare_tokenizer(tokenizer) first
    splits.train, splits.eval     # datasets.Dataset (IterableDataset when streaming), or None
    splits.reports                # a LoadReport per dataset: samples kept and skipped by rule, token statistics

Per dataset: read its files (or hub repository), take `num_samples` / `max_samples`, convert the rows to the internal
form (formats.py), drop the invalid ones with a count per rule (or refuse the dataset with `strict_data`), tokenize
with the processor of the data kind (processing.py; text of the row-wise kinds converts and tokenizes in one map,
fused_map.py) and measure the result. Then per split: mix the training datasets (`mix_strategy`; evaluation
datasets are concatenated, so each is evaluated whole and once), hold out `val_size`, and pack (`packing`,
`neat_packing`). Tokenizing each dataset before mixing gives the statistics per dataset and holds out the same rows as
splitting first would (the split depends only on the row count and the seed).

`media` is a vision-language model's `data.media.MediaProcessor` (None otherwise, and a sample with media is refused):
files are measured after conversion (data/media/checks.py), and rows keep `images` and `videos` for the collator.

The result is cached (cache.py) under a key over everything that changes the tokens: a run with the same data,
tokenizer, template and keys reads it back instead of tokenizing, and says so in the log. `tokenized_path` names a
folder of the user's instead: read when it exists (then `dataset` is not read at all), written otherwise.
`streaming` builds lazy `IterableDataset`s: nothing is cached and invalid samples are skipped without counts.

`datasets` is imported inside the functions, so importing `tunelab.data` stays light.
"""

import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from tunelab.data.cache import cache_folder, cache_key, digest, load_saved, save_splits
from tunelab.data.files import read_rows
from tunelab.data.formats import NUMBERS_COLUMN, convert_batch, features
from tunelab.data.fused_map import convert_and_tokenize, fusable
from tunelab.data.media.checks import measure_media, refuse_media_setup, skip_cut_samples
from tunelab.data.packing import pack_rows
from tunelab.data.processing import BATCH_BOUND, PROCESSORS, TRUNCATED_COLUMN, arrow_rows
from tunelab.data.registry import data_kind, resolve_datasets
from tunelab.data.spec import DataError, DatasetSpec
from tunelab.data.stats import SEQUENCES, LoadReport, describe_example, describe_tokens, measure
from tunelab.data.validation import check_dataset
from tunelab.data.workers import map_workers

logger = logging.getLogger(__name__)

#: mix_strategy -> the stopping strategy of `datasets.interleave_datasets` ("concat" concatenates instead).
INTERLEAVE_STOPPING = {"interleave_under": "first_exhausted", "interleave_over": "all_exhausted"}

#: data kind -> how `packing` applies to it: "rows" packs the tokenized rows (packing.py); "chunks" means its
#: processor always concatenates and chunks (pt). Kinds not listed cannot be packed.
PACKING = {"sft": "rows", "pt": "chunks"}

@dataclass
class DatasetSplits:
    """Tokenized sets (columns as the data kind's processor makes them) and a report per dataset."""

    train: Any = None
    eval: Any = None
    reports: list[LoadReport] = field(default_factory=list)


def load_datasets(config: Any, tokenizer: Any, template: Any = None, kind: str | None = None,
                  media: Any = None) -> DatasetSplits:
    """Load, check, tokenize, mix, split and pack `config.dataset` and `config.eval_dataset`, through the cache.

    `kind` (a key of `processing.PROCESSORS`) defaults to the one of `config.stage`; every kind but pt needs
    `template`. `media`: the `MediaProcessor` of a vision-language model (`data.media.load_media_processor`), or None.
    """
    kind = kind or data_kind(config.stage)
    if kind != "pt" and template is None:
        raise DataError(f"stage {config.stage} (data kind {kind}) needs a chat template: build one with "
                        f"tunelab.data.get_template")
    packing = resolve_packing(config, kind)
    refuse_media_setup(config, media, packing)
    tokenized_path = Path(config.tokenized_path) if config.tokenized_path else None
    if tokenized_path is not None and tokenized_path.exists():
        return _read_tokenized_path(tokenized_path, config, kind)
    media_root = {"media_root": Path(config.media_dir)} if config.media_dir else {}
    specs = {split: [replace(spec, **media_root) for spec in resolve_datasets(names, config.dataset_dir, config.stage)]
             for split, names in (("train", config.dataset), ("eval", config.eval_dataset))}
    if config.streaming:
        if tokenized_path is not None:
            raise DataError(f"`tokenized_path: {tokenized_path}` does not exist yet, and a stream cannot be saved "
                            f"there: turn `streaming` off for the run that writes it")
        return _stream(specs, config, tokenizer, template, kind, packing)
    key = cache_key(config, kind=kind, packing=packing, specs=specs, tokenizer=tokenizer, template=template,
                    media=media)
    if tokenized_path is not None:
        splits = _build(specs, config, tokenizer, template, kind, packing, media, digest(key))
        save_splits(tokenized_path, splits.train, splits.eval, _meta(kind, splits.reports))
        logger.info("saved the tokenized data to tokenized_path %s: runs with this tokenized_path read it from there",
                    tokenized_path)
    else:
        splits = _cached_build(key, specs, config, tokenizer, template, kind, packing, media)
    _log_sets(splits, config, kind, packing, tokenizer)
    return splits


def _log_sets(splits: DatasetSplits, config: Any, kind: str, packing: bool, tokenizer: Any) -> None:
    """The size of each set, and the first training row with its trained tokens marked."""
    unit = "packed rows" if packing else "chunks" if kind == "pt" else "samples"
    for split, data in (("train", splits.train), ("eval", splits.eval)):
        if data is not None:
            logger.info("%s set: %d %s of at most %d tokens", split, len(data), unit, config.cutoff_len)
    if splits.train is not None and len(splits.train) and SEQUENCES[kind][0] == ("", "input_ids", "labels"):
        logger.info("train example (trained tokens between ⟦ ⟧):\n%s", describe_example(splits.train[0], tokenizer))


def resolve_packing(config: Any, kind: str) -> bool:
    """Whether tokenized rows are packed (`pack_rows`): `packing`, on by itself with `neat_packing`; off by default."""
    how = PACKING.get(kind)
    wanted = bool(config.packing or config.neat_packing)
    if how == "chunks":
        if config.neat_packing:
            raise DataError(f"`neat_packing` packs separate samples; stage {config.stage} concatenates its "
                            f"documents into cutoff_len chunks instead")
        if config.packing is False:
            logger.warning("`packing: false` does not apply to stage %s: its documents are always concatenated "
                           "and cut into cutoff_len chunks", config.stage)
        return False
    if how is None and wanted:
        raise DataError(f"`packing` and `neat_packing` apply to stage sft; the samples of stage {config.stage} "
                        f"(data kind {kind}) cannot be packed")
    return wanted


# ---------------------------------------------------------------- cache and tokenized_path


def _cached_build(key: dict[str, Any], specs: dict[str, list[DatasetSpec]], config: Any, tokenizer: Any,
                  template: Any, kind: str, packing: bool, media: Any) -> DatasetSplits:
    folder = cache_folder(config, key)
    saved = None if config.overwrite_cache else load_saved(folder)
    if saved is not None:
        logger.info("loaded tokenized data from cache %s", folder)
        return DatasetSplits(saved.train, saved.eval, _reports(saved.meta))
    splits = _build(specs, config, tokenizer, template, kind, packing, media, digest(key))
    save_splits(folder, splits.train, splits.eval, _meta(kind, splits.reports), key)
    logger.info("saved the tokenized data to cache %s", folder)
    return splits


def _read_tokenized_path(folder: Path, config: Any, kind: str) -> DatasetSplits:
    saved = load_saved(folder)
    if saved is None:
        raise DataError(f"`tokenized_path: {folder}` exists but holds no saved dataset (a folder written through "
                        f"`tokenized_path` by tunelab or LLaMA-Factory); remove it to tokenize into it")
    made_for = saved.meta.get("kind")
    if made_for is not None and made_for != kind:
        raise DataError(f"`tokenized_path: {folder}` holds data of kind {made_for}, but stage {config.stage} trains "
                        f"on kind {kind}")
    logger.info("loaded tokenized data from tokenized_path %s; `dataset`, `eval_dataset` and the keys that shape "
                "tokens are not read", folder)
    splits = DatasetSplits(saved.train, saved.eval, _reports(saved.meta))
    if config.streaming and splits.train is not None:
        splits.train = _shuffled_stream(splits.train.to_iterable_dataset(), config)
    return splits


def _meta(kind: str, reports: list[LoadReport]) -> dict[str, Any]:
    return {"kind": kind, "reports": [asdict(report) for report in reports]}


def _reports(meta: dict[str, Any]) -> list[LoadReport]:
    return [LoadReport.from_json(report) for report in meta.get("reports", [])]


# ---------------------------------------------------------------- building the sets


def _build(specs: dict[str, list[DatasetSpec]], config: Any, tokenizer: Any, template: Any, kind: str,
           packing: bool, media: Any, stamp: str) -> DatasetSplits:
    reports: list[LoadReport] = []
    sets: dict[str, Any] = {}
    for split, group in specs.items():
        parts = []
        for spec in group:
            tokenized, report = _prepare(spec, split, config, tokenizer, template, kind, media, stamp)
            parts.append(tokenized)
            reports.append(report)
        sets[split] = _mix(parts, config if split == "train" else None)
    train, evaluation = sets["train"], sets["eval"]
    if train is not None and config.val_size > 0:
        train, evaluation = _hold_out(train, config)
    if packing:
        train, evaluation = _pack(train, config, stamp), _pack(evaluation, config, stamp)
    return DatasetSplits(train, evaluation, reports)


def _prepare(spec: DatasetSpec, split: str, config: Any, tokenizer: Any, template: Any, kind: str,
             media: Any, stamp: str) -> tuple[Any, LoadReport]:
    """One dataset read, sampled, converted, checked (its media measured), tokenized and measured."""
    raw, rows = _sample(read_rows(spec, config), spec, config)
    keys = dict(kind=kind, tokenizer=tokenizer, template=template, config=config)
    if fusable(spec, kind, media):
        tokenized = raw.map(convert_and_tokenize, batched=True, batch_size=config.preprocessing_batch_size,
                            remove_columns=raw.column_names, fn_kwargs=dict(keys, spec=spec, stage=config.stage),
                            **_map_options(config, raw, f"converting and tokenizing {spec.name}", stamp))
        tokenized, rules, validation = _checked(tokenized, spec, config, rows)
    else:
        converted = raw.map(convert_batch, batched=True, batch_size=config.preprocessing_batch_size,
                            remove_columns=raw.column_names, features=features(config.stage),
                            fn_kwargs={"spec": spec, "stage": config.stage},
                            **_map_options(config, raw, f"converting {spec.name}", stamp))
        converted = measure_media(converted, spec, config, media, kind, rows,
                                  _map_options(config, converted, f"reading the media of {spec.name}", stamp))
        converted, rules, validation = _checked(converted, spec, config, rows)
        tokenized = converted.map(arrow_rows, batched=True, batch_size=config.preprocessing_batch_size,
                                  remove_columns=converted.column_names, fn_kwargs=dict(keys, media=media),
                                  **_map_options(config, converted, f"tokenizing {spec.name}", stamp,
                                                 kind not in BATCH_BOUND))
    tokenized, validation = skip_cut_samples(tokenized, spec, rules, validation, config, rows)
    tokens = measure(tokenized, kind)
    logger.info("dataset %r (%s): %d of %d samples kept, %s", spec.name, spec.where, validation.kept,
                validation.total, describe_tokens(tokens))
    internal = [column for column in tokenized.column_names if column.startswith("_")]
    return tokenized.remove_columns(internal), LoadReport(split, validation, tokens)


def _checked(data: Any, spec: DatasetSpec, config: Any, rows: list[int] | None) -> tuple[Any, list[str], Any]:
    """The valid rows of `data` (no rule or numbers column), every row's rule, and the validation report (raises
    when nothing survives, or at the first invalid sample with strict_data). Columns are read whole, through Arrow:
    iterating `data[name]` would format the rows one by one."""
    columns = data.select_columns(["_rule", NUMBERS_COLUMN]).with_format("arrow")[:]
    rules = columns.column("_rule").to_pylist()
    validation = check_dataset(spec, rules, stage=config.stage, strict=config.strict_data, rows=rows,
                               numbers=columns.column(NUMBERS_COLUMN).to_pylist())
    if validation.skipped:
        logger.warning("dataset %r: %s", spec.name, validation.summary())
        data = data.select([i for i, rule in enumerate(rules) if not rule])
    return data.remove_columns(["_rule", NUMBERS_COLUMN]), rules, validation


def _mix(parts: list[Any], config: Any | None) -> Any:
    """Several datasets as one: by `config.mix_strategy`, or concatenated when `config` is None (evaluation)."""
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    from datasets import concatenate_datasets, interleave_datasets

    if config is None or config.mix_strategy == "concat":
        return concatenate_datasets(parts)
    return interleave_datasets(parts, probabilities=config.interleave_probs, seed=config.seed,
                               stopping_strategy=INTERLEAVE_STOPPING[config.mix_strategy])


def _pack(data: Any, config: Any, stamp: str | None) -> Any:
    if data is None:
        return None
    return data.map(pack_rows, batched=True, batch_size=config.preprocessing_batch_size,
                    remove_columns=_columns(data),
                    fn_kwargs={"cutoff_len": config.cutoff_len, "neat": config.neat_packing},
                    **_map_options(config, data, "packing", stamp, row_wise=False))


def _map_options(config: Any, data: Any, desc: str, stamp: str | None, row_wise: bool = True) -> dict[str, Any]:
    """Workers of a `datasets.map` over a map-style dataset (an IterableDataset takes none): workers.py decides,
    `row_wise` saying whether each output row depends on one input row only.

    The map never reads the cache files of `datasets`: their fingerprint pickles the template's class by reference,
    so a changed template would read stale tokens (tunelab's own key covers the source of the whole data layer). The
    file is named from that key's digest, `stamp`: `datasets` would pickle the tokenizer to name it (0.1-1 s a map).
    """
    from datasets import IterableDataset

    if isinstance(data, IterableDataset):
        return {}
    return {"num_proc": map_workers(config.preprocessing_num_workers, len(data), row_wise),
            "load_from_cache_file": False, "desc": desc, "new_fingerprint": digest([data._fingerprint, desc, stamp])}


# ---------------------------------------------------------------- reading


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
    """Split `val_size` (a share below 1, a count from 1) off the training rows, shuffled with `config.seed`."""
    size = int(config.val_size) if config.val_size >= 1 else config.val_size
    if isinstance(size, int) and size >= len(train):
        raise DataError(f"`val_size: {config.val_size}` leaves nothing to train on: the datasets hold {len(train)} "
                        f"rows")
    try:
        parts = train.train_test_split(test_size=size, seed=config.seed,
                                       load_from_cache_file=not config.overwrite_cache)
    except ValueError as err:  # a share too small for one row, or too large to leave one
        raise DataError(f"`val_size: {config.val_size}` cannot split {len(train)} rows: {err}") from err
    return parts["train"], parts["test"]


# ---------------------------------------------------------------- streaming


def _stream(specs: dict[str, list[DatasetSpec]], config: Any, tokenizer: Any, template: Any, kind: str,
            packing: bool) -> DatasetSplits:
    """Lazy sets: rows are read, converted, tokenized (and packed) as training consumes them."""
    logger.info("streaming: invalid samples are skipped without counts; `tunelab data preview` (without "
                "streaming) shows them")
    sets = {split: _mix([_stream_one(spec, config, tokenizer, template, kind) for spec in group],
                        config if split == "train" else None)
            for split, group in specs.items()}
    train = _shuffled_stream(sets["train"], config) if sets["train"] is not None else None
    if packing:
        return DatasetSplits(_pack(train, config, None), _pack(sets["eval"], config, None))
    return DatasetSplits(train, sets["eval"])


def _stream_one(spec: DatasetSpec, config: Any, tokenizer: Any, template: Any, kind: str) -> Any:
    raw = read_rows(spec, config, streaming=True)
    # A stream cannot repeat or sample rows: num_samples and max_samples both keep its first rows.
    limits = [n for n in (spec.num_samples, config.max_samples) if n is not None]
    if limits:
        raw = raw.take(min(limits))
    converted = raw.map(convert_batch, batched=True, batch_size=config.preprocessing_batch_size,
                        remove_columns=_columns(raw), features=features(config.stage),
                        fn_kwargs={"spec": spec, "stage": config.stage})
    valid = converted.filter(lambda rule: not rule, input_columns="_rule").remove_columns("_rule")
    inputs = [column for column in converted.features if column != "_rule"]
    tokenized = valid.map(PROCESSORS[kind], batched=True, batch_size=config.preprocessing_batch_size,
                          remove_columns=inputs,
                          fn_kwargs={"tokenizer": tokenizer, "template": template, "config": config})
    return tokenized.remove_columns([TRUNCATED_COLUMN])


def _columns(data: Any) -> list[str]:
    """The column names of a dataset; a stream that does not declare them (json, or after a map) shows its first row."""
    return data.column_names or list(next(iter(data), None) or [])


def _shuffled_stream(stream: Any, config: Any) -> Any:
    return stream.shuffle(seed=config.seed, buffer_size=config.buffer_size)
