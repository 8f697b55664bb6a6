"""`tunelab eval`: multiple-choice benchmarks in the MMLU / C-Eval / CMMLU layout, scored from next-token logits.

    tunelab eval examples/smollm2_eval.yaml

`task: <benchmark>_<split>` names a folder `task_dir/<benchmark>/` holding `mapping.json` (subject -> display name
and category) and one CSV file per subject and split, in any of the three layouts (`LAYOUTS`; see
evaluation/README.md). When no CSV of the split is there, the real benchmarks (`HUB`) are read from the hub.

Each question is asked after `n_shot` solved questions of its subject's dev split, as user/assistant turns rendered
by the run's chat template exactly as training renders them; the subject's intro opens the first user turn. The
predicted answer is whichever of the four letter tokens gets the highest next-token logit after the generation
prompt. Accuracy is counted per subject, per category and overall (over questions, not averaged over subjects).
"""

import csv
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab.config import Config, ConfigError
from tunelab.data import DataError, Template
from tunelab.infer.engine import load_tokenizer_and_template, to_inference_device
from tunelab.model import load_model

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

CHOICES = ("A", "B", "C", "D")
CATEGORIES = ("STEM", "Social Sciences", "Humanities", "Other")
#: lang -> (intro opening each subject's first user turn, the word the answer follows).
PROMPTS = {
    "en": ("The following are multiple choice questions (with answers) about {subject}.\n\n", "Answer:"),
    "zh": ("以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n", "答案："),
}
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


def run_benchmark(config: Config) -> dict[str, Any]:
    """Score the model on `config.task`; log the accuracy table and return (and with `save_dir` write) the scores."""
    benchmark, split = parse_task(config.task)
    save_dir = _empty_save_dir(config.save_dir)
    subjects = load_task(Path(config.task_dir), benchmark, split, config.n_shot)

    tokenizer, template = load_tokenizer_and_template(config)
    letter_ids = letter_token_ids(tokenizer, template)
    prompts = encode_task(tokenizer, template, subjects, config.lang, config.n_shot, config.cutoff_len)

    model = to_inference_device(load_model(config, tokenizer, trainable=False), config)
    started = time.perf_counter()
    picks = letter_logits(model, prompts, letter_ids, config.batch_size, tokenizer.pad_token_id).argmax(-1)
    logger.info("scored %d questions in %.1f s", len(prompts), time.perf_counter() - started)

    results, predictions = score(config.task, config.n_shot, subjects, [CHOICES[i] for i in picks.tolist()])
    _log_table(results)
    if save_dir is not None:
        save_dir.mkdir(parents=True, exist_ok=True)
        for name, content in (("results.json", results), ("predictions.json", predictions)):
            (save_dir / name).write_text(json.dumps(content, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        logger.info("scores and predictions written to %s", save_dir)
    return results


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


def _empty_save_dir(save_dir: str | None) -> Path | None:
    if save_dir is None:
        return None
    path = Path(save_dir)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ConfigError(f"`save_dir`: {save_dir} already exists and is not an empty folder; choose a new one so "
                          f"earlier scores are not overwritten")
    return path


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


# --- prompts and scoring ---

def format_question(question: Question, answer_word: str) -> str:
    options = "".join(f"\n{letter}. {choice}" for letter, choice in zip(CHOICES, question.choices))
    return f"{question.text}{options}\n{answer_word}"


def conversation(intro: str, answer_word: str, question: Question, shots: list[Question]) -> list[dict[str, str]]:
    """The solved examples as user/assistant turns, then the question; the subject's intro opens the first turn."""
    messages = []
    for shot in shots:
        messages += [{"role": "user", "content": format_question(shot, answer_word)},
                     {"role": "assistant", "content": shot.answer}]
    messages.append({"role": "user", "content": format_question(question, answer_word)})
    messages[0]["content"] = intro + messages[0]["content"]
    return messages


def encode_task(tokenizer: "PreTrainedTokenizerBase", template: Template, subjects: list[Subject], lang: str,
                n_shot: int, cutoff_len: int) -> list[list[int]]:
    """The prompt ids of every question, subject after subject."""
    intro, answer_word = PROMPTS[lang]
    prompts, cut = [], 0
    for subject in subjects:
        for question in subject.questions:
            ids, shortened = encode_question(tokenizer, template, intro.format(subject=subject.name), answer_word,
                                             question, subject.dev[:n_shot], cutoff_len)
            prompts.append(ids)
            cut += shortened
    if cut:
        logger.warning("%d of %d prompts were longer than cutoff_len (%d): their oldest solved examples were left "
                       "out (and the question cut from the left where even none fit)", cut, len(prompts), cutoff_len)
    return prompts


def encode_question(tokenizer: "PreTrainedTokenizerBase", template: Template, intro: str, answer_word: str,
                    question: Question, shots: list[Question], cutoff_len: int) -> tuple[list[int], bool]:
    """The prompt ids (the conversation and the generation prompt), and whether it had to be shortened: the oldest
    shots are left out until it fits `cutoff_len`; without any shot left, it is cut from the left."""
    for kept in range(len(shots), -1, -1):
        ids = template.encode_prompt(tokenizer, conversation(intro, answer_word, question, shots[len(shots) - kept:]))
        if len(ids) <= cutoff_len:
            return ids, kept < len(shots)
    return ids[-cutoff_len:], True


def letter_token_ids(tokenizer: "PreTrainedTokenizerBase", template: Template) -> list[int]:
    """The id of each letter as the model writes it as a whole reply: the first reply token when the template
    renders a conversation whose last assistant turn is that letter.

    Refused when the letter cannot be read from the one next-token step after the generation prompt: the prompt
    tokens change once the letter follows (it merges with the assistant header), or the reply starts with something
    else (a reasoning block)."""
    probe = [{"role": "user", "content": "?"}]
    prompt = template.encode_prompt(tokenizer, probe)
    ids = []
    for letter in CHOICES:
        turns = template.encode_turns(tokenizer, [*probe, {"role": "assistant", "content": letter}])
        head = [i for ask, reply in turns[:-1] for i in ask + reply] + turns[-1][0]
        reply = turns[-1][1]
        if head != prompt or not reply or tokenizer.decode(reply[:1]).strip() != letter:
            raise DataError(f"template {template.name!r}: a reply {letter!r} does not start with the letter's own "
                            f"token right after the generation prompt (it renders as {tokenizer.decode(reply)!r}), so "
                            f"the answer cannot be read from the next-token logits (with a reasoning template, set "
                            f"enable_thinking: false)")
        ids.append(reply[0])
    return ids


def letter_logits(model: "PreTrainedModel", prompts: list[list[int]], letter_ids: list[int], batch_size: int,
                  pad_id: int) -> "torch.Tensor":
    """The next-token logits of the letter tokens after each prompt, shape (len(prompts), len(letter_ids)), float32.

    Prompts are batched in length order (less padding), left padded, with position ids counted from each prompt's
    first real token, so a prompt scores as it would alone."""
    import torch

    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    scores = torch.empty((len(prompts), len(letter_ids)))
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, i in enumerate(rows):
            input_ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                           position_ids=positions.to(device), logits_to_keep=1).logits[:, -1]
        scores[rows] = logits[:, letter_ids].float().cpu()
    return scores


def score(task: str, n_shot: int, subjects: list[Subject], predicted: list[str]) -> tuple[dict, dict]:
    """(results: accuracy and counts per subject, category and overall; predictions per subject)."""
    results: dict[str, Any] = {"task": task, "n_shot": n_shot, "subjects": {}, "categories": {}}
    predictions: dict[str, list[dict]] = {}
    tally = {category: [0, 0] for category in CATEGORIES}
    answers = iter(predicted)
    for subject in subjects:
        rows = [{"index": i, "prediction": next(answers), "answer": q.answer}
                for i, q in enumerate(subject.questions)]
        predictions[subject.key] = rows
        correct = sum(r["prediction"] == r["answer"] for r in rows)
        results["subjects"][subject.key] = {"name": subject.name, "category": subject.category,
                                            **_accuracy(correct, len(rows))}
        tally[subject.category][0] += correct
        tally[subject.category][1] += len(rows)
    results["categories"] = {c: _accuracy(*counts) for c, counts in tally.items() if counts[1]}
    results.update(_accuracy(sum(c for c, _ in tally.values()), sum(n for _, n in tally.values())))
    return results, predictions


def _accuracy(correct: int, total: int) -> dict[str, Any]:
    return {"accuracy": correct / total, "correct": correct, "total": total}


def _log_table(results: dict[str, Any]) -> None:
    for key, row in results["subjects"].items():
        logger.debug("%-40s %6.2f  (%d/%d)", key, 100 * row["accuracy"], row["correct"], row["total"])
    lines = [f"{results['task']}, {results['n_shot']}-shot", f"{'category':<16} {'accuracy':>8} {'questions':>9}"]
    for name, row in [*results["categories"].items(), ("Average", results)]:
        lines.append(f"{name:<16} {100 * row['accuracy']:>8.2f} {row['total']:>9}")
    logger.info("\n".join(lines))
