"""`tunelab eval`: score a model on a multiple-choice benchmark (see `tasks.py` for which questions), from the
next-token logits of the answer letters.

    tunelab eval examples/smollm2_eval.yaml

Each question is asked after `n_shot` solved questions of its subject's dev split, as user/assistant turns rendered
by the run's chat template exactly as training renders them; the subject's intro opens the first user turn. The
predicted answer is whichever of the four letter tokens gets the highest next-token logit after the generation
prompt. Accuracy is counted per subject, per category and overall (over questions, not averaged over subjects).

It runs its own batched forward passes rather than an inference engine: one step per question needs no sampling.
"""

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab.config import Config, ConfigError
from tunelab.data import DataError, Template
from tunelab.eval.tasks import CATEGORIES, CHOICES, Question, Subject, load_task, parse_task
from tunelab.model import load_model
from tunelab.model.inference import load_tokenizer_and_template, to_inference_device

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

#: lang -> (intro opening each subject's first user turn, the word the answer follows).
PROMPTS = {
    "en": ("The following are multiple choice questions (with answers) about {subject}.\n\n", "Answer:"),
    "zh": ("以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n", "答案："),
}


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


def _empty_save_dir(save_dir: str | None) -> Path | None:
    if save_dir is None:
        return None
    path = Path(save_dir)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ConfigError(f"`save_dir`: {save_dir} already exists and is not an empty folder; choose a new one so "
                          f"earlier scores are not overwritten")
    return path


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
