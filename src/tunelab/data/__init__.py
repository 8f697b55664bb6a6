"""Data layer: dataset_info.json, dataset formats, chat templates, and tokenized train/eval sets.

    from tunelab.data import get_template, load_datasets
    template = get_template(config, tokenizer)      # a table row (`template: qwen`) or the tokenizer's own
    template.prepare_tokenizer(tokenizer)           # eos/pad and chat_template, so the saved tokenizer matches
    media = load_media_processor(config, tokenizer)  # a vision-language model's images and videos (else None)
    splits = load_datasets(config, tokenizer, template, media=media)   # splits.train / splits.eval, splits.reports
    print(preview(config, tokenizer, template, n=3))      # `tunelab data preview`: rows and statistics

Nothing heavy is imported here: `datasets` and `transformers` load inside the functions that need them.
"""

from tunelab.data.collator import DataCollator, PairwiseCollator
from tunelab.data.loader import DatasetSplits, load_datasets
from tunelab.data.media import VISION_FAMILIES, MediaProcessor, VisionFamily, load_media_processor
from tunelab.data.preview import preview
from tunelab.data.registry import resolve_datasets
from tunelab.data.spec import DataError, DatasetSpec
from tunelab.data.stats import LoadReport, TokenStats, describe_example
from tunelab.data.template import (TEMPLATES, ChatTemplate, Template, TemplateError, TokenizerTemplate, get_template,
                                   prepare_template)

__all__ = ["TEMPLATES", "VISION_FAMILIES", "ChatTemplate", "DataCollator", "DataError", "DatasetSpec", "DatasetSplits",
           "LoadReport", "MediaProcessor", "PairwiseCollator", "Template", "TemplateError", "TokenStats",
           "TokenizerTemplate", "VisionFamily", "describe_example", "get_template", "load_datasets",
           "load_media_processor", "prepare_template", "preview", "resolve_datasets"]
