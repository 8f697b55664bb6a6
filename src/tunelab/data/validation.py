"""The rules every sample must meet, and the report of what they removed: named by file, sample, line and rule.

    report = check_dataset(spec, rules, stage="sft", strict=config.strict_data)
    report.summary()   # "kept 588 of 1000 samples; 412 skipped: assistant turn missing (first at data/x.json,
                       #  sample 17 (line 19): the last turn is user)"

The converters in formats.py raise `Invalid(rule, detail)` where a row cannot become a sample, and `check_sample`
enforces what a stage's data kind needs of the converted sample. The rule of each row (or "" for a valid one)
travels in the `_rule` column; `check_dataset` counts them per rule, finds the first offending sample of each in its
file, and refuses the dataset when nothing survives, or, with `strict_data`, at its first invalid sample.

Samples count from 0, as `dataset[i]` does; lines count from 1, as editors do.
"""

import csv
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.data.spec import DataError, DatasetSpec, json_error

#: rule -> what it asks of a sample. Rule names are short and stable: reports group samples by them.
RULES = {
    "malformed messages": "the messages column must hold a list of message objects",
    "unknown role": "every message's role must be one of the user, assistant, observation, function and system tags",
    "not text": "prompts, replies and system prompts must be text",
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
                  rows: list[int] | None = None) -> DatasetReport:
    """The report of one converted dataset, from the `_rule` of each of its samples ("" for a valid one).

    Raises DataError when no sample survives (naming the rules that removed them), or with `strict` at the first
    invalid sample. `rows` maps positions in `rules` to rows of the files (when num_samples resampled them).
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
    report = DatasetReport(spec.name, spec.where, len(rules), {
        rule: RuleCount(count, where(first[rule][0]), first[rule][1]) for rule, count in counts.most_common()})
    if report.kept == 0:
        usage = "as pre-training text" if stage == "pt" else f"as `formatting: {spec.formatting}` for stage {stage}"
        reasons = "; ".join(f"{skipped.count} {rule} ({_EXPLAINED[rule]}; first at {skipped.first_case()})"
                            for rule, skipped in report.skipped.items())
        raise DataError(f"dataset {spec.name!r} ({spec.where}): none of its {len(rules)} samples is usable {usage}: "
                        f"{reasons or 'the dataset is empty'}")
    return report


# ---------------------------------------------------------------- finding a sample in its file


class SampleLocator:
    """Names sample `index` of a dataset: its file (in a folder, the files in order), its index there, its line."""

    def __init__(self, spec: DatasetSpec) -> None:
        self.spec = spec
        self._files: list[tuple[Path, list[int | None]]] | None = None  # each file with the line of each sample

    def __call__(self, index: int) -> str:
        if self.spec.path is None:
            return f"{self.spec.where} (split {self.spec.split}), sample {index}"
        if self._files is None:  # read the files only once a sample must be named
            self._files = [(path, RECORD_LINES[self.spec.builder()](path)) for path in self.spec.files()]
        for path, lines in self._files:
            if index < len(lines):
                return f"{path}, sample {index}" + (f" (line {lines[index]})" if lines[index] else "")
            index -= len(lines)
        # `datasets` counted more rows than we did (a file changed since it was read): name the folder at least.
        return f"{self.spec.where}, sample {index}"


def json_records(path: Path) -> list[tuple[int, Any]]:
    """Every sample of a .json or .jsonl file with the line it starts on; DataError at a syntax error.

    A file that parses as one document is an array of samples (or one sample); otherwise it is JSON lines.
    """
    text = path.read_text(encoding="utf-8")
    try:
        document = json.loads(text)
    except json.JSONDecodeError as whole:
        if text.lstrip().startswith("["):
            raise json_error(path, whole) from None
        return _json_lines(path, text)
    if isinstance(document, list):
        return list(zip(_element_lines(text), document))
    return [(1 + text[:len(text) - len(text.lstrip())].count("\n"), document)]


def _json_lines(path: Path, text: str) -> list[tuple[int, Any]]:
    records = []
    for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines: JSON strings may hold U+2028
        if line.strip():
            try:
                records.append((lineno, json.loads(line)))
            except json.JSONDecodeError as err:
                raise json_error(path, err, line=lineno) from None
    return records


_GAP = re.compile(r"[\s,]*")


def _element_lines(text: str) -> list[int]:
    """The line each element of a valid JSON array starts on."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    line, lines = 1 + text.count("\n", 0, pos), []
    while True:
        start = _GAP.match(text, pos).end()
        if text.startswith("]", start):
            return lines
        end = decoder.raw_decode(text, start)[1]
        line += text.count("\n", pos, start)
        lines.append(line)
        line += text.count("\n", start, end)
        pos = end


def find_json_error(files: list[Path]) -> str | None:
    """`file:line:column: problem` of the first .json/.jsonl file `datasets` cannot read: a syntax error, or a
    sample that is not an object. None when every file is fine."""
    for path in files:
        try:
            records = json_records(path)
        except DataError as err:
            return str(err)
        for index, (line, record) in enumerate(records):
            if not isinstance(record, dict):
                return (f"{path}:{line}: sample {index} is {type(record).__name__}, not an object: every sample must "
                        f"be an object of named columns")
    return None


def _text_lines(path: Path) -> list[int | None]:
    with path.open(encoding="utf-8") as handle:
        return list(range(1, sum(1 for _ in handle) + 1))


def _csv_lines(path: Path) -> list[int | None]:
    """The line each csv record starts on (a quoted field may span lines); blank lines are no records."""
    lines, start = [], 1
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        for record in reader:
            if record:
                lines.append(start)
            start = reader.line_num + 1
    return lines[1:]  # the header


def _parquet_lines(path: Path) -> list[int | None]:
    import pyarrow.parquet as pq

    return [None] * pq.ParquetFile(path).metadata.num_rows


def _arrow_lines(path: Path) -> list[int | None]:
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        return [None] * pa.ipc.open_stream(source).read_all().num_rows


#: builder -> the line each sample of one of its files starts on (None where a file has no lines).
RECORD_LINES = {"json": lambda path: [line for line, _ in json_records(path)], "text": _text_lines,
                "csv": _csv_lines, "parquet": _parquet_lines, "arrow": _arrow_lines}
