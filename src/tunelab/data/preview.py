"""`tunelab data preview CONFIG [-n N]`: what training will see, without loading model weights.

    print(preview(config, tokenizer, template, n=3))

The data is loaded exactly as training loads it (`load_datasets`, through the same cache: a preview warms it, and
the training run after it does not tokenize again). The text shows

* the first n training rows decoded, the trained tokens highlighted: bold green on a terminal, between ⟦ ⟧
  otherwise (or when NO_COLOR is set), a run of n copies of a special token (an image's pad tokens) as one copy and
  `×n`; with a vision-language model, each row's heading says how many tokens each of its images and videos got;
* per dataset: samples kept and skipped per rule (with the first offending row), tokens and the share of them
  trained, row length percentiles (nearest rank) and how many rows cutoff_len truncated.

A streamed config shows its first rows only: statistics would need the whole stream.
"""

import os
import sys
from typing import Any

from tunelab.data.loader import load_datasets, resolve_packing
from tunelab.data.media import load_media_processor
from tunelab.data.processing import IGNORE_INDEX
from tunelab.data.registry import data_kind
from tunelab.data.stats import SEQUENCES, LoadReport, describe_example

PLAIN_MARKS = ("⟦", "⟧")
COLOR_MARKS = ("\x1b[1;32m", "\x1b[0m")
HEADING_WIDTH = 100


def preview(config: Any, tokenizer: Any, template: Any = None, n: int = 3, *, color: bool | None = None,
            media: Any = None) -> str:
    """The first `n` training rows with their trained tokens highlighted, and statistics per dataset.

    `color` defaults to whether stdout is a terminal (and NO_COLOR is not set). `media` defaults to the configured
    model's media processor (None for a text model), so the preview sees what training sees.
    """
    if color is None:
        color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    kind = data_kind(config.stage)
    media = media or load_media_processor(config, tokenizer)
    splits = load_datasets(config, tokenizer, template, media=media)
    shown = splits.train if splits.train is not None else splits.eval
    sections = []
    if shown is not None:
        rows = shown.take(n) if config.streaming else shown.select(range(min(n, len(shown))))
        unit = "packed row" if resolve_packing(config, kind) else "chunk" if kind == "pt" else "row"
        for index, row in enumerate(rows):
            sections.append(_render_row(row, index, unit, kind, tokenizer, COLOR_MARKS if color else PLAIN_MARKS,
                                        media))
    if config.streaming:
        sections.append("statistics: not computed for a stream (they need every sample); set `streaming: false` to "
                        "see them")
    elif not splits.reports and shown is not None:
        sections.append(f"statistics: none were saved with `tokenized_path: {config.tokenized_path}`")
    sections += [describe_report(report, config.cutoff_len) for report in splits.reports]
    if not color:
        sections.append("(trained tokens are between ⟦ ⟧)")
    return "\n\n".join(sections)


def _render_row(row: dict[str, Any], index: int, unit: str, kind: str, tokenizer: Any, marks: tuple[str, str],
                media: Any) -> str:
    lines = []
    for title, ids_column, labels_column in SEQUENCES[kind]:
        ids = row[ids_column]
        trained = sum(label != IGNORE_INDEX for label in row[labels_column]) if labels_column else 0
        heading = f"── {unit} {index}{': ' + title if title else ''} · {len(ids)} tokens, {trained} trained"
        heading += _vision_tokens(media, ids) if media is not None else ""
        lines += [(heading + " ").ljust(HEADING_WIDTH, "─"),
                  describe_example(row, tokenizer, marks, ids_column, labels_column)]
    return "\n".join(lines)


def _vision_tokens(media: Any, ids: list[int]) -> str:
    """", 2 images (84 + 84 tokens), 1 video (840 tokens)": the tokens of each vision block of a sequence."""
    parts = []
    for kind, blocks in zip(("image", "video"), media.blocks(ids)):
        if blocks:
            plural = "s" if len(blocks) > 1 else ""
            parts.append(f"{len(blocks)} {kind}{plural} ({' + '.join(map(str, blocks))} tokens)")
    return "".join(f", {part}" for part in parts)


def describe_report(report: LoadReport, cutoff_len: int) -> str:
    """A few aligned lines about one dataset: samples, skips by rule, tokens, lengths, truncation."""
    validation, stats = report.validation, report.tokens
    lines = [f"dataset {validation.name!r} ({report.split}: {validation.where})",
             f"  samples    {validation.kept} kept of {validation.total}"]
    for rule, skipped in validation.skipped.items():
        detail = f": {skipped.detail}" if skipped.detail else ""
        lines.append(f"  skipped    {skipped.count} {rule} (first at {skipped.first}{detail})")
    share = f", {stats.trained / max(stats.tokens, 1):.1%} trained" if stats.trained is not None else ""
    lines.append(f"  tokens     {stats.tokens} in {stats.rows} rows{share}")
    lines.append("  length     " + "  ".join(f"{name} {value}" for name, value in stats.lengths.items())
                 + f"  (cutoff_len {cutoff_len})")
    truncated = (f"{stats.truncated} rows ({stats.truncated / max(stats.rows, 1):.1%})"
                 if stats.truncated is not None else "not reported by this data kind's processing")
    lines.append(f"  truncated  {truncated}")
    return "\n".join(lines)
