"""The rules every sample must meet, and the report of what they removed: named by file, sample, line and rule.

    report = check_dataset(spec, rules, stage="sft", strict=config.strict_data)
    report.summary()   # "kept 588 of 1000 samples; 412 skipped: assistant turn missing (first at data/x.json,
                       #  sample 17 (line 19): the last turn is user)"

The converters in formats.py raise `Invalid(rule, detail)` where a row cannot become a sample, and `check_sample`
enforces what a stage's data kind needs of the converted sample. The rule of each row (or "" for a valid one)
travels in the `_rule` column; `check_dataset` counts them per rule, finds the first offending sample of each in its
file (files.SampleLocator), and refuses the dataset when nothing survives, or, with `strict_data`, at its first
invalid sample.

Samples count from 0, as `dataset[i]` does; lines count from 1, as editors do.
"""

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

from tunelab.data.files import SampleLocator
from tunelab.data.spec import DataError, DatasetSpec

#: rule -> what it asks of a sample. Rule names are short and stable: reports group samples by them.
RULES = {
    "malformed messages": "the messages column must hold a list of message objects",
    "unknown role": "every message's role must be one of the user, assistant, observation, function and system tags",
    "not text": "prompts, replies and system prompts must be text or numbers (a number is read as its text)",
    "no messages": "a conversation needs at least one message",
    "system turn not first": "a system message may only open the conversation",
    "roles not alternating": "user (or tool result) and assistant (or tool call) turns must alternate, user first",
    "several tool results in a row": "each tool result must follow its own tool-call turn (parallel tool results "
                                     "in a row cannot be rendered yet)",
    "assistant turn missing": "the conversation must end with the assistant reply that is trained",
    "prompt ends with a reply": "a preference conversation must end with the user turn that chosen and rejected "
                                "answer",
    "empty response": "a reply the model is trained on must not be empty",
    "missing value": "a column this kind of sample needs is empty (null) here",
    "not a reply": "chosen and rejected must each be an assistant message or a tool call",
    "chosen equals rejected": "the two replies of a preference pair must differ",
    "kto tag not boolean": "the kto_tag column must hold true or false",
    "bad history": "each history entry must be a [prompt, response] pair",
    "invalid tool call": "a tool call must be JSON with a function name and object arguments",
    "invalid tools": "tools must be a JSON list of function specs",
    "placeholder count mismatch": "a sample needs one file per <image>, <video> or <audio> placeholder in its text",
    "media not a path": "images, videos and audios must be file paths or URLs",
    "media file not found": "a media file must exist (relative paths start at media_dir, by default dataset_dir)",
    "empty text": "a pre-training document must not be empty",
}
#: Rules of the media of a vision-language model's samples, checked after conversion (data/media/checks.py): they
#: need the model's processor, and are reported (and made strict) like the rules above.
MEDIA_RULES = {
    "unreadable media": "every image and video must be a local file that decodes (PIL reads images, PyAV videos)",
    "vision tokens cut by cutoff_len": "every image and video block must fit in cutoff_len whole: raise cutoff_len, "
                                       "or lower image_max_pixels, video_max_pixels or video_maxlen",
}

PROMPT_ROLES = ("user", "tool")
REPLY_ROLES = ("assistant", "tool_call")
MEDIA_PLACEHOLDERS = {"images": "<image>", "videos": "<video>", "audios": "<audio>"}
_EXPLAINED = {**RULES, **MEDIA_RULES}
logger = logging.getLogger(__name__)
_SEPARATOR = ": "  # between rule and detail in the `_rule` column; rule names hold no colon


class Invalid(Exception):
    """A row that breaks `rule` (a key of RULES); `detail` says how this row breaks it."""

    def __init__(self, rule: str, detail: str = "") -> None:
        super().__init__(f"{rule}{_SEPARATOR}{detail}" if detail else rule)


def check_sample(sample: dict[str, Any], kind: str, media: tuple[str, ...] = ()) -> dict[str, Any]:
    """Enforce the rules of a data kind (sft, pairwise, kto, prompt) on a converted sample, and return it.

    `media`: the media keys (images, videos, audios) the dataset declares; their placeholders are counted.
    """
    messages = sample["messages"]
    if kind == "prompt" and messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"].strip():
        messages = sample["messages"] = messages[:-1]  # an empty reference reply is no reply, as in LLaMA-Factory
    if not messages:
        raise Invalid("no messages")
    _check_turn_order(messages)
    ends_with_reply = len(messages) % 2 == 0
    if kind in ("sft", "kto") and not ends_with_reply:
        raise Invalid("assistant turn missing", f"the last turn is {messages[-1]['role']}")
    if kind == "pairwise" and ends_with_reply:
        raise Invalid("prompt ends with a reply", f"the last turn is {messages[-1]['role']}")
    replies = {f"turn {i + 1}": m for i, m in enumerate(messages) if m["role"] == "assistant"}
    if kind == "pairwise":
        replies.update(chosen=sample["chosen"], rejected=sample["rejected"])
    empty = next((where for where, reply in replies.items() if not reply["content"].strip()), None)
    if empty is not None:
        raise Invalid("empty response", empty)
    if kind == "pairwise" and sample["chosen"] == sample["rejected"]:
        raise Invalid("chosen equals rejected")
    _check_placeholders(sample, kind, media)
    return sample


def _check_turn_order(messages: list[dict[str, str]]) -> None:
    for i, message in enumerate(messages):
        side = PROMPT_ROLES if i % 2 == 0 else REPLY_ROLES
        if message["role"] in side:
            continue
        if message["role"] == "tool" and messages[i - 1]["role"] == "tool":
            raise Invalid("several tool results in a row", f"turns {i} and {i + 1}")
        raise Invalid("roles not alternating", f"turn {i + 1} is {message['role']}, expected {' or '.join(side)}")


def _check_placeholders(sample: dict[str, Any], kind: str, media: tuple[str, ...]) -> None:
    """Each full conversation (with chosen, and with rejected, for a pair) has one placeholder per file."""
    endings = [[sample["chosen"]], [sample["rejected"]]] if kind == "pairwise" else [[]]
    for ending in endings:
        text = "".join(m["content"] for m in sample["messages"] + ending)
        for key in media:
            placeholder, files = MEDIA_PLACEHOLDERS[key], len(sample[key])
            if text.count(placeholder) != files:
                raise Invalid("placeholder count mismatch",
                              f"{text.count(placeholder)} {placeholder} in the text, {files} {key}")


# ---------------------------------------------------------------- the report


@dataclass(frozen=True)
class RuleCount:
    """How many samples one rule removed, where the first of them is, and what was wrong with it."""

    count: int
    first: str    # "data/x.json, sample 17 (line 19)"
    detail: str   # "the last turn is user" (may be empty)

    def first_case(self) -> str:
        """Where the first offending sample is, and what was wrong with it."""
        return f"{self.first}{_SEPARATOR}{self.detail}" if self.detail else self.first


@dataclass(frozen=True)
class DatasetReport:
    """What validation kept and skipped of one dataset (`tunelab data preview` shows it)."""

    name: str
    where: str                       # file, folder or hub repository
    total: int                       # samples read (after num_samples and max_samples)
    skipped: dict[str, RuleCount]    # rule -> its count, most frequent first

    @property
    def kept(self) -> int:
        return self.total - sum(rule.count for rule in self.skipped.values())

    def summary(self) -> str:
        """One line: what was kept, and per rule how many were skipped and where the first one is."""
        parts = [f"kept {self.kept} of {self.total} samples"]
        parts += [f"{rule.count} skipped: {name} (first at {rule.first_case()})" for name, rule in self.skipped.items()]
        return "; ".join(parts)


def check_dataset(spec: DatasetSpec, rules: list[str], *, stage: str, strict: bool = False,
                  rows: list[int] | None = None, numbers: list[str] | None = None) -> DatasetReport:
    """The report of one converted dataset, from the `_rule` of each of its samples ("" for a valid one).

    Raises DataError when no sample survives (naming the rules that removed them), or with `strict` at the first
    invalid sample. `rows` maps positions in `rules` to rows of the files (when num_samples resampled them).
    `numbers`: per sample, the fields whose numbers were read as text (formats.NUMBERS_COLUMN), warned about once.
    """
    counts: Counter[str] = Counter()
    first: dict[str, tuple[int, str]] = {}
    for index, entry in enumerate(rules):
        if entry:
            rule, _, detail = entry.partition(_SEPARATOR)
            counts[rule] += 1
            first.setdefault(rule, (index, detail))
    locate = SampleLocator(spec)

    def where(index: int) -> str:
        return locate(rows[index] if rows is not None else index)

    if strict and counts:
        index, detail, rule = min((index, detail, rule) for rule, (index, detail) in first.items())
        raise DataError(f"dataset {spec.name!r}: {where(index)}: {rule}{_SEPARATOR + detail if detail else ''} "
                        f"({_EXPLAINED[rule]}); `strict_data: true` refuses a dataset with an invalid sample: fix "
                        f"it, or set `strict_data: false` to skip such samples")
    fields = Counter(field for entry in numbers or [] if entry for field in entry.split("; "))
    if fields:
        first_number = next(index for index, entry in enumerate(numbers) if entry)
        logger.warning("dataset %r: %d of %d samples hold a number where text belongs (%s; first at %s): each was "
                       "read as its text, 42 as \"42\"", spec.name, sum(1 for entry in numbers if entry), len(rules),
                       ", ".join(f"{field}: {count}" for field, count in fields.most_common()), where(first_number))
    report = DatasetReport(spec.name, spec.where, len(rules), {
        rule: RuleCount(count, where(first[rule][0]), first[rule][1]) for rule, count in counts.most_common()})
    if report.kept == 0:
        usage = "as pre-training text" if stage == "pt" else f"as `formatting: {spec.formatting}` for stage {stage}"
        reasons = "; ".join(f"{skipped.count} {rule} ({_EXPLAINED[rule]}; first at {skipped.first_case()})"
                            for rule, skipped in report.skipped.items())
        raise DataError(f"dataset {spec.name!r} ({spec.where}): none of its {len(rules)} samples is usable {usage}: "
                        f"{reasons or 'the dataset is empty'}")
    return report
