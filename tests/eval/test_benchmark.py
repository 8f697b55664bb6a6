"""`tunelab eval`: multiple-choice benchmarks on a tiny random model.

The scores `tunelab eval` writes are recounted here from its predictions and the CSV files; its prompts, letter
logits and answers are recomputed with plain transformers (`apply_chat_template`, one forward pass); batching must
not change a logit. The three benchmark layouts and the errors for bad files are checked on small files.
"""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tunelab.config import ConfigError, load_config
from tunelab.data import DataError, get_template
from tunelab.eval.multiple_choice import (encode_question, encode_task, letter_logits, letter_token_ids,
                                          run_benchmark)
from tunelab.eval.tasks import CHOICES, Question, load_task, parse_task
from helpers import REPO, TOKENIZERS

SAMPLE = REPO / "evaluation" / "sample"
INTRO = "The following are multiple choice questions (with answers) about {}.\n\n"


def eval_config(model_dir: Path, **overrides):
    return load_config({"model_name_or_path": str(model_dir), "template": "chatml", "task": "sample_test",
                        "task_dir": str(REPO / "evaluation"), "n_shot": 3, "cutoff_len": 1024, **overrides})


def read_rows(path: Path) -> list[list[str]]:
    with path.open(encoding="utf-8", newline="") as file:
        return [row for row in csv.reader(file) if row]


def ask(row: list[str]) -> str:
    return f"{row[0]}\nA. {row[1]}\nB. {row[2]}\nC. {row[3]}\nD. {row[4]}\nAnswer:"


def reference_messages(name: str, shots: list[list[str]], row: list[str]) -> list[dict]:
    """The benchmark conversation, written out here independently of tunelab's code."""
    messages = []
    for shot in shots:
        messages += [{"role": "user", "content": ask(shot)}, {"role": "assistant", "content": shot[5]}]
    messages.append({"role": "user", "content": ask(row)})
    messages[0]["content"] = INTRO.format(name) + messages[0]["content"]
    return messages


@pytest.fixture(scope="module")
def cli_run(tiny_model_dir, tmp_path_factory):
    """`tunelab eval` on the shipped sample task (3-shot, batches of 4), as a user runs it."""
    folder = tmp_path_factory.mktemp("cli_eval")
    config = folder / "eval.yaml"
    config.write_text(f"model_name_or_path: {tiny_model_dir}\ntemplate: chatml\ntask: sample_test\n"
                      f"task_dir: {REPO / 'evaluation'}\nn_shot: 3\nbatch_size: 4\nsave_dir: {folder / 'scores'}\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "tunelab", "eval", str(config)], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    return folder / "scores", done.stderr


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """The tiny model and its tokenizer as plain transformers loads them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir), AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def test_cli_scores_match_an_independent_count(cli_run):
    save_dir, log = cli_run
    results = json.loads((save_dir / "results.json").read_text())
    predictions = json.loads((save_dir / "predictions.json").read_text())
    mapping = json.loads((SAMPLE / "mapping.json").read_text())
    assert list(predictions) == list(mapping) == list(results["subjects"])

    per_category: dict[str, list[int]] = {}
    for subject, rows in predictions.items():
        gold = [row[5] for row in read_rows(SAMPLE / "data" / "test" / f"{subject}_test.csv")]
        assert [r["index"] for r in rows] == list(range(len(gold)))
        assert [r["answer"] for r in rows] == gold
        assert all(r["prediction"] in CHOICES for r in rows)
        correct = sum(r["prediction"] == g for r, g in zip(rows, gold))
        scored = results["subjects"][subject]
        assert (scored["correct"], scored["total"]) == (correct, len(gold))
        assert scored["accuracy"] == pytest.approx(correct / len(gold))
        assert scored["category"] == mapping[subject]["category"]
        counts = per_category.setdefault(mapping[subject]["category"], [0, 0])
        counts[0] += correct
        counts[1] += len(gold)

    assert set(results["categories"]) == set(per_category) and len(per_category) >= 2
    for category, (correct, total) in per_category.items():
        scored = results["categories"][category]
        assert (scored["correct"], scored["total"]) == (correct, total)
        assert scored["accuracy"] == pytest.approx(correct / total)
    correct = sum(c for c, _ in per_category.values())
    total = sum(n for _, n in per_category.values())
    assert (results["correct"], results["total"]) == (correct, total) and total == 40
    assert results["accuracy"] == pytest.approx(correct / total)
    (average,) = [line.split() for line in log.splitlines() if line.startswith("Average")]
    assert average == ["Average", f"{100 * correct / total:.2f}", str(total)]


def test_predictions_match_plain_transformers(cli_run, reference):
    tokenizer, model = reference
    predictions = json.loads((cli_run[0] / "predictions.json").read_text())
    mapping = json.loads((SAMPLE / "mapping.json").read_text())
    letter_ids = [tokenizer.convert_tokens_to_ids(letter) for letter in CHOICES]
    for subject, rows in predictions.items():
        dev = read_rows(SAMPLE / "data" / "dev" / f"{subject}_dev.csv")
        for row, predicted in zip(read_rows(SAMPLE / "data" / "test" / f"{subject}_test.csv"), rows):
            text = tokenizer.apply_chat_template(reference_messages(mapping[subject]["name"], dev[:3], row),
                                                 add_generation_prompt=True, tokenize=False)
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
            with torch.no_grad():
                logits = model(ids).logits[0, -1, letter_ids]
            assert predicted["prediction"] == CHOICES[int(logits.argmax())], (subject, predicted)


@pytest.mark.parametrize("template", ["chatml", None])
def test_prompts_and_letter_logits_match_plain_transformers(tiny_model_dir, reference, template):
    """Our prompt ids are the tokenizer's own rendering of the conversation, token for token, and our (batched) letter
    logits are the plain forward pass's."""
    tokenizer, model = reference
    config = eval_config(tiny_model_dir, template=template)
    template_ = get_template(config, tokenizer)
    subjects = load_task(SAMPLE.parent, "sample", "test", n_shot=3)
    prompts = encode_task(tokenizer, template_, subjects, "en", 3, 1024)
    letter_ids = letter_token_ids(tokenizer, template_)
    assert letter_ids == [tokenizer.encode(letter, add_special_tokens=False)[0] for letter in CHOICES]
    ours = letter_logits(model, prompts, letter_ids, batch_size=4, pad_id=tokenizer.pad_token_id)

    expected_prompts, expected_logits = [], []
    for subject in subjects:
        dev = read_rows(SAMPLE / "data" / "dev" / f"{subject.key}_dev.csv")
        for row in read_rows(SAMPLE / "data" / "test" / f"{subject.key}_test.csv"):
            text = tokenizer.apply_chat_template(reference_messages(subject.name, dev[:3], row),
                                                 add_generation_prompt=True, tokenize=False)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            expected_prompts.append(ids)
            with torch.no_grad():
                expected_logits.append(model(torch.tensor([ids])).logits[0, -1, letter_ids])
    assert prompts == expected_prompts
    torch.testing.assert_close(ours, torch.stack(expected_logits), rtol=1e-4, atol=1e-4)


def test_batching_changes_no_logit_and_no_answer(tiny_model_dir, reference, cli_run, tmp_path):
    tokenizer, model = reference
    template = get_template(eval_config(tiny_model_dir), tokenizer)
    letter_ids = letter_token_ids(tokenizer, template)
    # Prompts of very different lengths (0 to 5 shots) in one list, so batches hold heavily padded rows.
    prompts = [p for n in (0, 5) for p in encode_task(tokenizer, template, load_task(SAMPLE.parent, "sample", "test",
                                                                                     n), "en", n, 1024)]
    assert max(map(len, prompts)) > 3 * min(map(len, prompts))
    single = letter_logits(model, prompts, letter_ids, batch_size=1, pad_id=tokenizer.pad_token_id)
    for batch_size in (4, 7):
        batched = letter_logits(model, prompts, letter_ids, batch_size=batch_size, pad_id=tokenizer.pad_token_id)
        torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-4)

    run_benchmark(eval_config(tiny_model_dir, batch_size=1, save_dir=str(tmp_path / "one")))
    one_by_one = json.loads((tmp_path / "one" / "predictions.json").read_text())
    assert one_by_one == json.loads((cli_run[0] / "predictions.json").read_text())


def test_n_shot_zero_needs_no_dev_files_and_more_than_dev_shows_them_all(tiny_model_dir, reference, tmp_path):
    tokenizer, _ = reference
    template = get_template(eval_config(tiny_model_dir), tokenizer)
    rows = read_rows(SAMPLE / "data" / "test" / "world_history_test.csv")
    write_task(tmp_path / "nodev", {"history": rows}, write_mmlu, splits=("test",))
    (subject,) = load_task(tmp_path, "nodev", "test", n_shot=0)
    assert subject.dev == [] and subject.questions[0] == Question(rows[0][0], tuple(rows[0][1:5]), rows[0][5])
    with pytest.raises(DataError, match="n_shot 2 needs solved examples"):
        load_task(tmp_path, "nodev", "test", n_shot=2)
    (prompt,) = encode_task(tokenizer, template, [subject], "en", 0, 1024)[:1]
    text = tokenizer.apply_chat_template(reference_messages("history", [], rows[0]), add_generation_prompt=True,
                                         tokenize=False)
    assert prompt == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert run_benchmark(eval_config(tiny_model_dir, task="nodev_test", task_dir=str(tmp_path), n_shot=0))["total"] \
        == len(rows)

    # The sample's subjects have 5 dev questions: asking for 50 shows those 5, no error.
    many = load_task(SAMPLE.parent, "sample", "test", n_shot=50)
    assert encode_task(tokenizer, template, many, "en", 50, 4096) == \
        encode_task(tokenizer, template, many, "en", 5, 4096) != encode_task(tokenizer, template, many, "en", 4, 4096)
    assert run_benchmark(eval_config(tiny_model_dir, n_shot=50))["total"] == 40


def test_long_prompts_lose_their_oldest_shots_first(tiny_model_dir, reference):
    tokenizer, _ = reference
    template = get_template(eval_config(tiny_model_dir), tokenizer)
    (subject,) = [s for s in load_task(SAMPLE.parent, "sample", "test", n_shot=5) if s.key == "world_history"]
    intro, question, shots = INTRO.format(subject.name), subject.questions[0], subject.dev[:3]

    def prompt(kept_shots, cutoff_len=4096):
        return encode_question(tokenizer, template, intro, "Answer:", question, kept_shots, cutoff_len)

    full, last_two, last_one, bare = (prompt(shots)[0], prompt(shots[1:])[0], prompt(shots[2:])[0], prompt([])[0])
    assert len(full) > len(last_two) > len(last_one) > len(bare)
    assert prompt(shots, len(full)) == (full, False)
    assert prompt(shots, len(full) - 1) == (last_two, True)
    assert prompt(shots, len(last_two) - 1) == (last_one, True)
    assert prompt(shots, len(bare) - 5) == (bare[5:], True)


# --- layouts and bad files (no model) ---

QUESTIONS = [["What is 1 + 1?", "1", "2", "3", "4", "B"],
             ["Which city is the capital of France?", "Paris", "Rome", "Oslo", "Bern", "A"],
             ["天空是什么颜色？", "红色", "绿色", "蓝色", "黑色", "C"],
             ["A question, with a comma\nand a second line", "x", "y, z", "\"quoted\"", "w", "D"]]
DEV = [["What is 2 + 2?", "4", "5", "6", "7", "A"], ["What is 3 + 3?", "5", "6", "7", "8", "B"]]


def write_mmlu(folder: Path, subject: str, split: str, rows: list[list[str]]) -> Path:
    return write_csv(folder / "data" / split / f"{subject}_{split}.csv", rows)


def write_ceval(folder: Path, subject: str, split: str, rows: list[list[str]]) -> Path:
    rows = [[str(i), *row, "explained"] for i, row in enumerate(rows)]
    return write_csv(folder / split / f"{subject}_{split}.csv", rows,
                     header=["id", "question", "A", "B", "C", "D", "answer", "explanation"])


def write_cmmlu(folder: Path, subject: str, split: str, rows: list[list[str]]) -> Path:
    return write_csv(folder / split / f"{subject}.csv", [[str(i), *row] for i, row in enumerate(rows)],
                     header=["", "Question", "A", "B", "C", "D", "Answer"], encoding="utf-8-sig")


def write_csv(path: Path, rows: list[list[str]], header: list[str] | None = None, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding=encoding) as file:
        csv.writer(file).writerows([header] if header else [])
        csv.writer(file).writerows(rows)
    return path


def write_task(folder: Path, subjects: dict[str, list[list[str]]], writer, splits=("dev", "test"),
               categories=("STEM", "Humanities")) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    mapping = {key: {"name": key.replace("_", " "), "category": category}
               for key, category in zip(subjects, categories)}
    (folder / "mapping.json").write_text(json.dumps(mapping))
    for key, rows in subjects.items():
        for split in splits:
            writer(folder, key, split, DEV if split == "dev" else rows)


@pytest.mark.parametrize("writer,task", [(write_mmlu, "bench_test"), (write_ceval, "bench_validation"),
                                         (write_cmmlu, "bench_test")])
def test_each_benchmark_layout_loads(tmp_path, writer, task):
    benchmark, split = parse_task(task)
    write_task(tmp_path / benchmark, {"math_and_more": QUESTIONS, "history": QUESTIONS[:2]}, writer,
               splits=("dev", split))
    subjects = load_task(tmp_path, benchmark, split, n_shot=2)
    assert [(s.key, s.name, s.category) for s in subjects] == [("math_and_more", "math and more", "STEM"),
                                                                ("history", "history", "Humanities")]
    expected = [Question(q[0], tuple(q[1:5]), q[5]) for q in QUESTIONS]
    assert subjects[0].questions == expected and subjects[1].questions == expected[:2]
    assert subjects[0].dev == [Question(q[0], tuple(q[1:5]), q[5]) for q in DEV]


def test_chinese_prompt_and_a_full_run_on_the_ceval_layout(tiny_model_dir, reference, tmp_path):
    tokenizer, _ = reference
    write_task(tmp_path / "ceval", {"chinese_history": QUESTIONS}, write_ceval, splits=("dev", "val"))
    subjects = load_task(tmp_path, *parse_task("ceval_validation"), n_shot=1)
    template = get_template(eval_config(tiny_model_dir), tokenizer)
    text = tokenizer.decode(encode_task(tokenizer, template, subjects, "zh", 1, 1024)[2])
    assert text.startswith("<|im_start|>user\n以下是中国关于chinese history考试的单项选择题，请选出其中的正确答案。\n\n"
                           "What is 2 + 2?\nA. 4\nB. 5\nC. 6\nD. 7\n答案：<|im_end|>\n"
                           "<|im_start|>assistant\nA<|im_end|>")
    assert text.endswith("天空是什么颜色？\nA. 红色\nB. 绿色\nC. 蓝色\nD. 黑色\n答案：<|im_end|>\n"
                         "<|im_start|>assistant\n")
    results = run_benchmark(eval_config(tiny_model_dir, task="ceval_validation", task_dir=str(tmp_path), lang="zh",
                                        n_shot=1))
    assert results["total"] == 4 and list(results["categories"]) == ["STEM"]


def test_missing_task_offline_names_what_was_expected(tiny_model_dir, tmp_path):
    with pytest.raises(DataError) as err:
        run_benchmark(eval_config(tiny_model_dir, task="mmlu_test", task_dir=str(tmp_path)))
    for part in ("'mmlu'", str(tmp_path / "mmlu"), "mapping.json", "data/test/<subject>_test.csv", "offline"):
        assert part in str(err.value), part
    with pytest.raises(DataError, match="'mybench'.*not one of the benchmarks read from the hub"):
        run_benchmark(eval_config(tiny_model_dir, task="mybench_validation", task_dir=str(tmp_path)))


def test_bad_files_are_named_with_their_line(tmp_path):
    bad_row = [*QUESTIONS, ["Only a question and", "two choices"]]  # the multi-line question spans lines 4 and 5
    write_task(tmp_path / "mm", {"s": bad_row}, write_mmlu)
    with pytest.raises(DataError, match=r"s_test\.csv, line 6: 2 columns, expected at least 6"):
        load_task(tmp_path, "mm", "test", n_shot=1)

    write_task(tmp_path / "ce", {"s": [*QUESTIONS[:1], ["q", "a", "b", "c", "d", "E"]]}, write_ceval,
               splits=("val",))
    with pytest.raises(DataError, match=r"s_val\.csv, line 3: the answer must be one of A, B, C, D, not 'E'"):
        load_task(tmp_path, "ce", "val", n_shot=0)

    write_task(tmp_path / "cat", {"s": QUESTIONS}, write_mmlu, categories=("Science",))
    with pytest.raises(DataError, match=r"mapping\.json: subject 's' needs .*one of STEM"):
        load_task(tmp_path, "cat", "test", n_shot=0)

    write_task(tmp_path / "part", {"a": QUESTIONS, "b": QUESTIONS}, write_mmlu)
    (tmp_path / "part" / "data" / "test" / "b_test.csv").unlink()
    with pytest.raises(DataError, match="subject 'b' of mapping.json has no test file"):
        load_task(tmp_path, "part", "test", n_shot=0)


def test_config_mistakes_are_refused_before_loading(tiny_model_dir, tmp_path):
    for task in ("mmlu", "sample_dev", None):
        with pytest.raises(ConfigError, match="task"):
            run_benchmark(eval_config(tiny_model_dir, task=task))
    (tmp_path / "old.json").write_text("{}")
    with pytest.raises(ConfigError, match="`save_dir`.*not an empty folder"):
        run_benchmark(eval_config(tiny_model_dir, save_dir=str(tmp_path)))


@pytest.mark.skipif(not TOKENIZERS.is_dir(), reason="../shared/tokenizers is not present")
def test_letter_tokens_of_real_tokenizers():
    from transformers import AutoTokenizer

    llama = AutoTokenizer.from_pretrained(TOKENIZERS / "llama-3.2-instruct")
    template = get_template(load_config({"model_name_or_path": "m", "template": "llama3"}), llama)
    assert letter_token_ids(llama, template) == [llama.encode(c, add_special_tokens=False)[0] for c in CHOICES]

    qwen3 = AutoTokenizer.from_pretrained(TOKENIZERS / "qwen3")
    thinking = get_template(load_config({"model_name_or_path": "m", "template": "qwen3"}), qwen3)
    with pytest.raises(DataError, match="enable_thinking: false"):
        letter_token_ids(qwen3, thinking)
    plain = get_template(load_config({"model_name_or_path": "m", "template": "qwen3", "enable_thinking": False}), qwen3)
    assert [qwen3.decode([i]) for i in letter_token_ids(qwen3, plain)] == list(CHOICES)
