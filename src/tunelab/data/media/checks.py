"""The loader's media steps for one dataset: refuse what cannot train at all, measure every file, and skip samples
whose files are unreadable or whose vision blocks cutoff_len would cut.

    refuse_media_setup(config, media, packing)                 # once per run: packing and streaming take no media
    converted = measure_media(converted, spec, config, media, kind, rows, map_options)   # after conversion
    tokenized, report = skip_cut_samples(tokenized, spec, rules, report, config, rows)    # after tokenizing

`measure_media` refuses the whole dataset (DataError, before any model loads) when a sample holds audio (a later
issue), images or videos for a model that is not a vision-language one, images or videos for stage kto, or videos
without PyAV installed; each message names the dataset, the sample (file, index, line) and its file. With a vision
model it then gives every file its token count (`_image_tokens`, `_video_tokens`), reading each image whole and each
video's headers, and gives a sample with a file that cannot be read the rule `unreadable media`: such samples are
skipped and counted like every other invalid sample (or refused with `strict_data`).
"""

import logging
from typing import Any

from tunelab.data.files import SampleLocator
from tunelab.data.media.images import MediaError
from tunelab.data.media.loading import not_a_vision_model
from tunelab.data.media.video import PYAV_INSTALL, has_pyav
from tunelab.data.processing import IMAGE_TOKENS_COLUMN, MEDIA_RULE_COLUMN, VIDEO_TOKENS_COLUMN
from tunelab.data.spec import DataError, DatasetSpec
from tunelab.data.validation import DatasetReport, check_dataset

logger = logging.getLogger(__name__)

#: Media given as these are not fetched: a sample names local files.
REMOTE_PREFIXES = ("http://", "https://", "data:")
#: Data kinds whose processors take images and videos (kto's KL pairs would need the next sample's media too), and
#: the stages that cannot use them although their kind can: the ppo/grpo rollouts generate from the text alone so far
#: (kind prompt also feeds prediction, which takes media).
MEDIA_KINDS = ("sft", "pairwise", "prompt")
TEXT_ONLY_STAGES = ("ppo", "grpo")


def refuse_media_setup(config: Any, media: Any, packing: bool) -> None:
    """Refuse the settings a vision-language run cannot take yet."""
    if media is None:
        return
    if packing:
        raise DataError("`packing` and `neat_packing` cannot pack the samples of a vision-language model yet (their "
                        "images would have to follow them into the packed rows); leave them off")
    if config.streaming:
        raise DataError("`streaming` cannot feed a vision-language model yet; leave it off")
    if config.padding_free:
        raise DataError("`padding_free` cannot batch the samples of a vision-language model yet (their 3D positions "
                        "do not restart per sample); leave it off")


def measure_media(converted: Any, spec: DatasetSpec, config: Any, media: Any, kind: str, rows: list[int] | None,
                  map_options: dict[str, Any]) -> Any:
    """Refuse a dataset whose media cannot train at all; with a vision model, the token counts of every file (and
    `unreadable media` for samples with a file that cannot be read). See the module docstring."""
    if kind == "pt":
        return converted  # plain text has no media columns
    locate = SampleLocator(spec)

    def first(key: str) -> tuple[str, str] | None:
        """Where the first valid sample holding `key` files is, and its first file."""
        import pyarrow.compute as pc

        # In Arrow: the rows of a text dataset are never turned into Python objects.
        holding = pc.greater(pc.list_value_length(converted.with_format("arrow")[key]), 0)
        index = pc.index(holding, True).as_py()
        if index < 0:
            return None
        sample = locate(rows[index] if rows is not None else index)
        return f"dataset {spec.name!r}: {sample}", converted[index][key][0]

    if found := first("audios"):
        raise DataError(f"{found[0]} has audio ({found[1]}): tunelab cannot train on audio yet; leave the dataset out, "
                        f"or remove its `audios` column")
    with_media = False
    for key in ("images", "videos"):
        if not (found := first(key)):
            continue
        with_media = True
        where, path = found
        if kind not in MEDIA_KINDS or config.stage in TEXT_ONLY_STAGES:
            raise DataError(f"{where} has {key} ({path}), which stage {config.stage} cannot take yet")
        if media is None:
            raise DataError(f"{where} has {key} ({path}), but {not_a_vision_model(config)}")
        if key == "videos" and media.family.video_token is None:
            raise DataError(f"{where} has videos ({path}), but {media.family.name} models take no video")
        if key == "videos" and not has_pyav():
            raise DataError(f"{where} has videos ({path}), which need PyAV to decode: {PYAV_INSTALL}")
    if not with_media:
        return converted  # no image or video in this dataset: nothing to measure
    from datasets import Features, List, Value

    counts = List(Value("int64"))
    measured = Features({**converted.features, IMAGE_TOKENS_COLUMN: counts, VIDEO_TOKENS_COLUMN: counts})
    return converted.map(_measure_batch, batched=True, batch_size=config.preprocessing_batch_size, features=measured,
                         fn_kwargs={"media": media}, **map_options)


def _measure_batch(batch: dict[str, list], *, media: Any) -> dict[str, list]:
    """`datasets.map` function: the tokens of each file of the valid rows, or the rule of a row with a bad file."""
    out: dict[str, list] = {"_rule": [], IMAGE_TOKENS_COLUMN: [], VIDEO_TOKENS_COLUMN: []}
    for rule, images, videos in zip(batch["_rule"], batch["images"], batch["videos"]):
        image_tokens: list[int] = []
        video_tokens: list[int] = []
        if not rule:
            try:
                image_tokens = [_measured(media.image_tokens, path) for path in images]
                video_tokens = [_measured(lambda p: media.plan_video(p).tokens, path) for path in videos]
            except _Unreadable as err:
                rule, image_tokens, video_tokens = f"unreadable media: {err}", [], []
        out["_rule"].append(rule)
        out[IMAGE_TOKENS_COLUMN].append(image_tokens)
        out[VIDEO_TOKENS_COLUMN].append(video_tokens)
    return out


class _Unreadable(Exception):
    """A file of a sample that cannot be read: "path: reason"."""


def _measured(measure: Any, path: str) -> int:
    if path.startswith(REMOTE_PREFIXES):
        raise _Unreadable(f"{path:.80}: remote files are not fetched; download it and name the local file")
    try:
        return measure(path)
    except MediaError as err:
        raise _Unreadable(f"{path}: {err}") from None


def skip_cut_samples(tokenized: Any, spec: DatasetSpec, rules: list[str], report: DatasetReport, config: Any,
                     rows: list[int] | None) -> tuple[Any, DatasetReport]:
    """Drop the tokenized samples whose vision blocks cutoff_len would cut (their `_media_rule`), and count them in
    the dataset's report (refusing the dataset with `strict_data`, or when nothing is left)."""
    if MEDIA_RULE_COLUMN not in tokenized.column_names:
        return tokenized, report
    cut = tokenized[MEDIA_RULE_COLUMN]
    if not any(cut):
        return tokenized, report
    # The tokenized rows are the samples that passed validation, in order: put their rules back in place.
    merged = list(rules)
    for position, rule in zip((i for i, rule in enumerate(rules) if not rule), cut):
        merged[position] = rule
    report = check_dataset(spec, merged, stage=config.stage, strict=config.strict_data, rows=rows)
    logger.warning("dataset %r: %s", spec.name, report.summary())
    return tokenized.select([i for i, rule in enumerate(cut) if not rule]), report
