"""`do_predict` with `predict_with_generate` (stage sft): the files LLaMA-Factory writes, batched generation that
changes no prediction, stopping at the end of turn, prediction after training and from a saved adapter, and the
BLEU/ROUGE scores against hand-computed values.

Runs generate a few tokens per sample with the tiny random model (a second or two each).
"""

import json
import shutil
import sys
from pathlib import Path

import pytest

import tunelab
from tunelab.config import ConfigError
from tunelab.eval.text_metrics import mean_similarity, similarity
from helpers import REPO, train_with_two_processes

FIELDS = {"prompt", "predict", "label"}
SCORES = ("predict_bleu-4", "predict_rouge-1", "predict_rouge-2", "predict_rouge-l")

#: Prompts of very different lengths, so a batch of 4 holds rows padded by many tokens.
SAMPLES = [
    ("Hi", "Hello there."),
    ("Tell me a long story about a cat who lives in a big old house by the sea, and what it eats", "Once upon a time."),
    ("What is two plus two?", "Four."),
    ("Translate to French: good morning, my friend", "Bonjour, mon ami."),
    ("我喜欢北京吗？", "你喜欢北京。"),
    ("Name a colour", "Blue"),
]


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("predict_data")
    rows = [{"instruction": question, "input": "", "output": answer} for question, answer in SAMPLES]
    (folder / "questions.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    (folder / "dataset_info.json").write_text(json.dumps({"questions": {"file_name": "questions.json"}}))
    return folder


def predict_config(model_dir: Path, output_dir: Path, **overrides) -> dict:
    config = {
        "model_name_or_path": str(model_dir),
        "stage": "sft",
        "do_predict": True,
        "predict_with_generate": True,
        "template": "chatml",
        "output_dir": str(output_dir),
        "do_sample": False,
        "max_new_tokens": 12,
        "report_to": "none",
        "seed": 0,
    }
    config.update(overrides)
    return config


def read_predictions(output_dir: Path) -> list[dict]:
    lines = (output_dir / "generated_predictions.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def read_results(output_dir: Path) -> dict:
    return json.loads((output_dir / "predict_results.json").read_text())


def test_predict_only_writes_llamafactory_files_and_batching_changes_no_prediction(tiny_model_dir, eval_data,
                                                                                  tmp_path):
    runs = {}
    for batch_size in (4, 1):
        out = tmp_path / f"batch{batch_size}"
        tunelab.train(predict_config(tiny_model_dir, out, eval_dataset="questions", dataset_dir=str(eval_data),
                                     per_device_eval_batch_size=batch_size))
        runs[batch_size] = read_predictions(out)
    records = runs[4]
    assert [set(r) for r in records] == [FIELDS] * len(SAMPLES)
    # In the dataset's order, whatever order the length-sorted batches ran in.
    for record, (question, answer) in zip(records, SAMPLES):
        assert record["prompt"] == f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
        assert record["label"] == answer, "the label is the reference reply, without its end of turn"
        assert record["predict"], "a random model never ends its turn within 12 tokens"
    # The equivalence: left-padded batches of 4 give exactly the one-at-a-time greedy replies.
    assert [r["predict"] for r in records] == [r["predict"] for r in runs[1]]

    results = read_results(tmp_path / "batch4")
    assert set(SCORES) | {"predict_runtime", "predict_samples_per_second"} <= set(results)
    assert results["predict_samples_per_second"] > 0
    # The scores are the per-sample scores of the written pairs, averaged.
    expected = mean_similarity([r["predict"] for r in records], [r["label"] for r in records])
    assert [results[key] for key in SCORES] == pytest.approx([expected[key[len("predict_"):]] for key in SCORES])
    assert json.loads((tmp_path / "batch4" / "all_results.json").read_text())["predict_rouge-l"] == \
        results["predict_rouge-l"]


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, tmp_path_factory):
    """A LoRA run that trains on the identity data and then predicts its held-out samples, in one run."""
    out = tmp_path_factory.mktemp("trained") / "run"
    config = predict_config(tiny_model_dir, out, do_train=True, finetuning_type="lora", dataset="identity",
                            dataset_dir=str(REPO / "data"), val_size=0.2, cutoff_len=128,
                            per_device_train_batch_size=4, learning_rate=1e-2, max_steps=24, logging_steps=4,
                            save_steps=100, lr_scheduler_type="constant", max_new_tokens=64,
                            skip_special_tokens=False, per_device_eval_batch_size=4)
    tunelab.train(config)
    return config, out


def test_prediction_after_training_stops_at_the_end_of_turn_and_matches_the_saved_adapter(tiny_model_dir,
                                                                                         trained_run, tmp_path):
    config, out = trained_run
    records = read_predictions(out)
    assert len(records) == 8  # val_size 0.2 of the 36 identity samples
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    for record in records:
        # Kept special tokens would show an end of turn the reply did not stop at; it ended well before the cap of 64.
        assert "<|im_end|>" not in record["predict"] and "<|im_start|>" not in record["predict"], record
        assert len(tokenizer.encode(record["predict"], add_special_tokens=False)) < 48, record
    trained = read_results(out)
    assert trained["predict_rouge-1"] > 25 and trained["predict_bleu-4"] > 15, trained

    # The untrained model scores next to nothing on the same samples: the scores see what training taught.
    base = tmp_path / "base"
    tunelab.train({**config, "do_train": False, "output_dir": str(base)})
    assert read_results(base)["predict_rouge-1"] < 10

    # Predict-only with the saved adapter (merged into the weights) gives the replies of the model in memory.
    reloaded = tmp_path / "reloaded"
    tunelab.train({**config, "do_train": False, "adapter_name_or_path": str(out), "output_dir": str(reloaded)})
    assert [r["predict"] for r in read_predictions(reloaded)] == [r["predict"] for r in records]


def test_prediction_adds_files_to_a_finished_run(trained_run, tmp_path):
    """LLaMA-Factory users point a predict-only run at the folder of a finished run: it adds its files and removes
    or changes none of the trained ones."""
    config, trained = trained_run
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    for name in ("generated_predictions.jsonl", "predict_results.json"):
        (out / name).unlink()
    before = {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()}
    tunelab.train({**config, "do_train": False, "adapter_name_or_path": str(out), "output_dir": str(out)})
    after = {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()}
    assert set(after) - set(before) == {"generated_predictions.jsonl", "predict_results.json"}
    for name, content in before.items():
        if name != "all_results.json":
            assert after[name] == content, name
    combined = json.loads(after["all_results.json"])
    assert "train_loss" in combined and "predict_bleu-4" in combined
    assert read_predictions(out) == read_predictions(trained)


@pytest.mark.distributed
def test_two_processes_predict_what_one_does(tiny_model_dir, eval_data, tmp_path):
    """Under torchrun each process generates its share; the main process writes them all, in the dataset's order."""
    single, double = tmp_path / "one", tmp_path / "two"
    common = {"eval_dataset": "questions", "dataset_dir": str(eval_data), "per_device_eval_batch_size": 2}
    tunelab.train(predict_config(tiny_model_dir, single, **common))
    train_with_two_processes(predict_config(tiny_model_dir, double, **common), tmp_path, 29571)
    assert read_predictions(double) == read_predictions(single)
    assert read_results(double)["predict_rouge-l"] == read_results(single)["predict_rouge-l"]


@pytest.mark.distributed
@pytest.mark.parametrize("engine, port", [("deepspeed", 29575), ("fsdp", 29577)])
def test_a_sharded_model_predicts_what_its_saved_folder_predicts(tiny_model_dir, tmp_path, engine, port):
    """After training under ZeRO-3 or FSDP the shards generate together (5 prompts: one process pads its share with
    a dropped row), and predict what one process predicts from the saved adapter."""
    pytest.importorskip("deepspeed")
    from helpers import engine_config

    sharding = ({"deepspeed": str(REPO / "examples" / "deepspeed" / "ds_z3_config.json")} if engine == "deepspeed"
                else {"fsdp": "full_shard auto_wrap",
                      "fsdp_config": {"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}})
    sharded, single = tmp_path / "sharded", tmp_path / "single"
    config = engine_config(tiny_model_dir, sharded, "lora", max_steps=2, save_strategy="no", val_size=5,
                           do_predict=True, predict_with_generate=True, do_sample=False, max_new_tokens=8,
                           per_device_eval_batch_size=2)
    train_with_two_processes({**config, **sharding}, tmp_path, port)
    tunelab.train({**config, "do_train": False, "adapter_name_or_path": str(sharded), "output_dir": str(single)})
    assert len(read_predictions(sharded)) == 5
    assert read_predictions(sharded) == read_predictions(single)


@pytest.mark.distributed
def test_prediction_alone_under_zero3_predicts_what_one_process_does(tiny_model_dir, eval_data, tmp_path):
    """`do_train: false` under ZeRO-3: the model loads in shards and generates in an inference engine."""
    pytest.importorskip("deepspeed")
    single, double = tmp_path / "one", tmp_path / "two"
    common = {"eval_dataset": "questions", "dataset_dir": str(eval_data), "per_device_eval_batch_size": 2}
    tunelab.train(predict_config(tiny_model_dir, single, **common))
    train_with_two_processes(predict_config(tiny_model_dir, double, **common, deepspeed=str(
        REPO / "examples" / "deepspeed" / "ds_z3_config.json")), tmp_path, 29579)
    assert read_predictions(double) == read_predictions(single)


def test_missing_metrics_extra_is_named_before_the_model_loads(tiny_model_dir, eval_data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "rouge_chinese", None)  # what an environment without the package looks like
    with pytest.raises(ConfigError, match=r"needs the `rouge_chinese` package, which is not installed: "
                                          r"pip install 'tunelab\[metrics\]'"):
        tunelab.train(predict_config(tiny_model_dir, tmp_path / "run", eval_dataset="questions",
                                     dataset_dir=str(eval_data)))


# ---------------------------------------------------------------- scores against hand-computed values


def test_identical_and_disjoint_texts_score_100_and_0():
    assert similarity("I am Kestrel.", "I am Kestrel.") == {"bleu-4": 100.0, "rouge-1": 100.0, "rouge-2": 100.0,
                                                            "rouge-l": 100.0}
    # Not one character in common, so not one word either.
    assert similarity("abc", "xyz") == {"bleu-4": 0.0, "rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}


def test_empty_prediction_or_reference_scores_0():
    zero = {"bleu-4": 0.0, "rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    assert similarity("", "I am Kestrel.") == zero
    assert similarity("I am Kestrel.", "") == zero
    # Whitespace holds no word for ROUGE (BLEU, on characters, still counts the spaces it shares).
    blank = similarity(" \n", "I am Kestrel.")
    assert (blank["rouge-1"], blank["rouge-2"], blank["rouge-l"]) == (0.0, 0.0, 0.0)


def test_scores_of_one_changed_word_computed_by_hand():
    """Prediction "a b x d", reference "a b c d".

    ROUGE on words: unigrams share a, b, d: P = R = 3/4, F = 75. Bigrams {ab, bx, xd} vs {ab, bc, cd} share ab:
    F = 1/3. The longest common subsequence a b d has 3 words: F = 75.
    BLEU-4 on the 7 characters (spaces count): 1-grams 6/7 match; 2-grams "a ", " b", "b ", " d" of 6 = 4/6; 3-grams
    "a b", " b " of 5 = 2/5; 4-grams "a b " of 4 = 1/4. Equal lengths, no brevity penalty:
    (6/7 * 4/6 * 2/5 * 1/4) ** (1/4) = (2/35) ** (1/4) = 0.48892.
    """
    scores = similarity("a b x d", "a b c d")
    assert scores["rouge-1"] == pytest.approx(75.0)
    assert scores["rouge-2"] == pytest.approx(100 / 3, abs=1e-4)
    assert scores["rouge-l"] == pytest.approx(75.0)
    assert scores["bleu-4"] == pytest.approx(100 * (2 / 35) ** 0.25, abs=1e-4)


def test_chinese_is_scored_by_words_not_characters():
    """"我喜欢南京" vs "我喜欢北京" (I like Nanjing / Beijing): jieba cuts both into 我 / 喜欢 / X京.

    By words, 2 of 3 unigrams match: ROUGE-1 = ROUGE-L = 66.67 (by characters 4 of 5 would give 80). Bigrams
    {我喜欢, 喜欢南京} vs {我喜欢, 喜欢北京}: 1 of 2, ROUGE-2 = 50.
    BLEU-4 stays on characters (as in LLaMA-Factory): 1-grams 4/5, 2-grams 2/4, 3-grams 1/3, 4-grams 0/2, which
    smoothing method 3 replaces by 1 / (2 * 2): (4/5 * 2/4 * 1/3 * 1/4) ** (1/4) = (1/30) ** (1/4) = 0.42729.
    """
    scores = similarity("我喜欢南京", "我喜欢北京")
    assert scores["rouge-1"] == pytest.approx(200 / 3, abs=1e-4)
    assert scores["rouge-l"] == pytest.approx(200 / 3, abs=1e-4)
    assert scores["rouge-2"] == pytest.approx(50.0)
    assert scores["bleu-4"] == pytest.approx(100 * (1 / 30) ** 0.25, abs=1e-4)


def test_mean_similarity_averages_the_samples():
    scores = mean_similarity(["I am Kestrel.", ""], ["I am Kestrel.", "I am Kestrel."])
    assert scores == {"bleu-4": 50.0, "rouge-1": 50.0, "rouge-2": 50.0, "rouge-l": 50.0}
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        mean_similarity(["a", "b"], ["a"])
