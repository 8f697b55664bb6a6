"""Benchmark tasks of `tunelab eval`: which questions a `task: <benchmark>_<split>` names, read from local CSV files
in the MMLU / C-Eval / CMMLU layout or, when the split has none there, from the hub.

    subjects = load_task(Path("evaluation"), *parse_task("sample_test"), n_shot=3)

`task_dir/<benchmark>/` holds `mapping.json` (subject -> display name and category) and one CSV file per subject
and split, in any of the three layouts (`LAYOUTS`; see evaluation/README.md). When no CSV of the split is there, the
real benchmarks (`HUB`) are read from the hub.
"""

import csv
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

from tunelab.config import ConfigError
from tunelab.data import DataError

logger = logging.getLogger(__name__)

CHOICES = ("A", "B", "C", "D")
CATEGORIES = ("STEM", "Social Sciences", "Humanities", "Other")
SPLIT_ALIASES = {"validation": "val"}
#: Where a subject's CSV file of a split lives, in each benchmark's published layout (first match wins).
LAYOUTS = {
    "MMLU": "data/{split}/{subject}_{split}.csv",
    "C-Eval": "{split}/{subject}_{split}.csv",
    "CMMLU": "{split}/{subject}.csv",
}
# A CSV whose first row names these columns has a header (C-Eval, CMMLU); otherwise the columns are in this order
# (MMLU): question, the four choices, the answer letter.
COLUMNS = ("question", "a", "b", "c", "d", "answer")


@dataclass(frozen=True)
class Question:
    text: str
    choices: tuple[str, ...]
    answer: str


@dataclass(frozen=True)
class Subject:
    key: str
    name: str
    category: str
    dev: list[Question]
    questions: list[Question]


def parse_task(task: str | None) -> tuple[str, str]:
    """(benchmark, split) of `task`: the split follows the last underscore (`ceval_validation` -> ceval, val)."""
    if not task or "_" not in task.strip("_"):
        raise ConfigError(f"`task`: expected <benchmark>_<split> such as mmlu_test, ceval_validation or sample_test, "
                          f"not {task!r}")
    benchmark, split = task.rsplit("_", 1)
    split = SPLIT_ALIASES.get(split, split)
    if split == "dev":
        raise ConfigError(f"`task: {task}`: the dev split holds the solved examples shown before each question; "
                          f"evaluate val or test")
    return benchmark, split


# --- benchmark files ---

def load_task(task_dir: Path, benchmark: str, split: str, n_shot: int) -> list[Subject]:
    """The subjects of `task_dir/benchmark` with their questions of `split` (and dev questions when n_shot > 0),
    from the local CSV files, or from the hub when the split has none there."""
    folder = task_dir / benchmark
    mapping = _read_mapping(folder / "mapping.json")
    if mapping is not None:
        files = {key: _find_csv(folder, split, key) for key in mapping}
        if any(files.values()):
            return [_local_subject(folder, key, entry, split, files[key], n_shot) for key, entry in mapping.items()]
    return _hub_task(folder, benchmark, split, n_shot, mapping)


def _read_mapping(path: Path) -> dict[str, dict[str, str]] | None:
    """mapping.json: {subject: {"name": display name, "category": one of CATEGORIES}}, or None when absent."""
    if not path.is_file():
        return None
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot be read as JSON: {err}") from err
    if not isinstance(mapping, dict) or not mapping:
        raise DataError(f"{path}: expected an object {{subject: {{\"name\": ..., \"category\": ...}}}}")
    for key, entry in mapping.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("name"), str) and entry.get("category") in CATEGORIES):
            raise DataError(f"{path}: subject {key!r} needs a \"name\" and a \"category\" (one of "
                            f"{', '.join(CATEGORIES)}), not {entry!r}")
    return mapping


def _find_csv(folder: Path, split: str, subject: str) -> Path | None:
    paths = (folder / pattern.format(split=split, subject=subject) for pattern in LAYOUTS.values())
    return next((path for path in paths if path.is_file()), None)


def _expected_files(folder: Path, split: str) -> str:
    return ", ".join(f"{folder / pattern.format(split=split, subject='<subject>')} ({name})"
                     for name, pattern in LAYOUTS.items())


def _local_subject(folder: Path, key: str, entry: dict[str, str], split: str, path: Path | None,
                   n_shot: int) -> Subject:
    if path is None:
        raise DataError(f"{folder}: subject {key!r} of mapping.json has no {split} file; expected one of "
                        f"{_expected_files(folder, split).replace('<subject>', key)}")
    dev: list[Question] = []
    if n_shot > 0:
        dev_path = _find_csv(folder, "dev", key)
        if dev_path is None:
            raise DataError(f"{folder}: n_shot {n_shot} needs solved examples of subject {key!r}: expected one of "
                            f"{_expected_files(folder, 'dev').replace('<subject>', key)} (or set n_shot: 0)")
        dev = read_csv(dev_path)
        if len(dev) < n_shot:
            logger.info("%s: %d dev questions, fewer than n_shot (%d): all of them are shown", dev_path, len(dev),
                        n_shot)
    return Subject(key, entry["name"], entry["category"], dev, read_csv(path))


def read_csv(path: Path) -> list[Question]:
    """The questions of one CSV file: with a header naming question, A-D and answer (C-Eval, CMMLU; other columns
    are ignored), or without one, columns in MMLU's order. Blank lines are skipped."""
    with path.open(encoding="utf-8-sig", newline="") as file:
        reader = csv.reader(file)
        first = next(reader, None)
        if first is None:
            raise DataError(f"{path}: the file is empty")
        names = [cell.strip().lower() for cell in first]
        header = set(COLUMNS) <= set(names)
        index = [names.index(column) for column in COLUMNS] if header else list(range(len(COLUMNS)))
        rows = reader if header else chain([first], reader)
        questions = []
        for row in rows:
            if not row:
                continue
            where = f"{path}, line {reader.line_num}"
            if len(row) <= max(index):
                raise DataError(f"{where}: {len(row)} columns, expected at least {max(index) + 1} "
                                f"(question, A, B, C, D, answer{', as the header names them' if header else ''})")
            text, *choices, answer = (row[i] for i in index)
            questions.append(make_question(text, choices, answer, where))
    if not questions:
        raise DataError(f"{path}: holds no questions")
    return questions


def make_question(text: str, choices: list[str], answer: str, where: str) -> Question:
    answer = answer.strip()
    if answer not in CHOICES:
        raise DataError(f"{where}: the answer must be one of {', '.join(CHOICES)}, not {answer!r}"
                        + (" (C-Eval's test answers are not public: evaluate its val split)" if not answer else ""))
    if len(choices) != len(CHOICES):
        raise DataError(f"{where}: {len(choices)} choices, expected {len(CHOICES)}")
    return Question(text, tuple(choices), answer)


# --- the real benchmarks on the hub (not reachable from tunelab's tests: kept small) ---

@dataclass(frozen=True)
class HubBenchmark:
    repo: str
    splits: dict[str, str]  # our split name -> the dataset's
    row: Callable[[dict], tuple[str, list[str], str]]  # a dataset row -> (question, choices, answer letter)


HUB = {
    "mmlu": HubBenchmark("cais/mmlu", {"dev": "dev", "val": "validation", "test": "test"},
                         lambda r: (r["question"], list(r["choices"]), CHOICES[r["answer"]])),
    "ceval": HubBenchmark("ceval/ceval-exam", {"dev": "dev", "val": "val", "test": "test"},
                          lambda r: (r["question"], [r[c] for c in CHOICES], r["answer"])),
    "cmmlu": HubBenchmark("haonan-li/cmmlu", {"dev": "dev", "test": "test"},
                          lambda r: (r["Question"], [r[c] for c in CHOICES], r["Answer"])),
}
# Configs of those datasets that are not subjects.
_NOT_SUBJECTS = {"all", "auxiliary_train"}


def _hub_task(folder: Path, benchmark: str, split: str, n_shot: int,
              mapping: dict[str, dict[str, str]] | None) -> list[Subject]:
    from huggingface_hub import is_offline_mode

    missing = (f"task {benchmark!r} (split {split}): no question files under {folder}; expected mapping.json and "
               f"per subject one of {_expected_files(folder, split)}")
    source = HUB.get(benchmark)
    if source is None:
        raise DataError(f"{missing}. It is not one of the benchmarks read from the hub ({', '.join(HUB)})")
    if split not in source.splits:
        raise DataError(f"{missing}. {source.repo} has no {split} split (it has {', '.join(source.splits)})")
    if is_offline_mode():
        raise DataError(f"{missing}, and the hub is offline (HF_HUB_OFFLINE): download the benchmark into {folder}")
    from datasets import get_dataset_config_names, load_dataset

    try:
        if mapping is None:
            logger.warning("%s has no mapping.json: every subject is counted under Other (put the benchmark's "
                           "mapping.json there for per-category scores)", folder)
            names = [n for n in get_dataset_config_names(source.repo) if n not in _NOT_SUBJECTS]
            mapping = {n: {"name": n.replace("_", " "), "category": "Other"} for n in names}
        subjects = []
        for key, entry in mapping.items():
            data = load_dataset(source.repo, key)
            logger.info("read %s/%s from the hub", source.repo, key)
            dev = _hub_questions(source, data, key, "dev") if n_shot else []
            subjects.append(Subject(key, entry["name"], entry["category"], dev,
                                    _hub_questions(source, data, key, split)))
    except DataError:
        raise
    except Exception as err:  # no network, an unknown config, a changed dataset: all end the same way
        raise DataError(f"{missing}, and reading {source.repo} from the hub failed: {err}") from err
    return subjects


def _hub_questions(source: HubBenchmark, data: Any, subject: str, split: str) -> list[Question]:
    return [make_question(*source.row(row), f"{source.repo}/{subject} {split} row {i}")
            for i, row in enumerate(data[source.splits[split]])]
