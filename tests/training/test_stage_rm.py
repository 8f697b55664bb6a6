"""The rm stage on a tiny random model: the pairwise loss teaches it to score chosen replies above rejected ones, the
saved folder reloads and scores exactly as training did, a run resumes exactly, and 2 processes train.

Scores are checked against an independent computation: transformers (and peft, merged) for the last hidden state of
each unpadded sequence, times the two tensors read from value_head.safetensors.
"""

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tunelab
from tunelab.config import load_config
from tunelab.data import load_datasets, prepare_template
from tunelab.model import load_tokenizer
from tunelab.model.frozen import load_full_reward_model
from tunelab.model.value_head import ValueHeadModel, last_token_scores
from tunelab.data import PairwiseCollator
from helpers import LF_DATA, assert_two_processes_train_as_accumulation, read_log, run_config



def rm_config(model_dir: Path, output_dir: Path, **overrides) -> dict:
    """LoRA rm on tunelab's alpaca (identity_preference) and sharegpt (dpo_demo) preference data, 61 train pairs and
    16 evaluated in one batch (so eval accuracy is exactly the share of pairs ranked right)."""
    values = dict(stage="rm", dataset="identity_preference,dpo_demo", cutoff_len=96, val_size=0.2,
                  per_device_eval_batch_size=32, max_steps=24, logging_steps=2, save_steps=24,
                  lr_scheduler_type="cosine", seed=1)
    values.update(overrides)
    return run_config(model_dir, output_dir, **values)


def eval_rows(config: dict) -> list[dict]:
    """The tokenized evaluation pairs of a run (the same split the run held out: same data, seed and val_size)."""
    loaded = load_config(config)
    tokenizer = load_tokenizer(loaded)
    return list(load_datasets(loaded, tokenizer, prepare_template(loaded, tokenizer)).eval)


def independent_scores(sequences: list[list[int]], model_dir: Path, head_dir: Path,
                       adapter_dir: Path | None = None) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    head = load_file(head_dir / "value_head.safetensors")
    weight, bias = head["v_head.summary.weight"][0], head["v_head.summary.bias"][0]
    with torch.no_grad():
        return torch.stack([model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0, -1]
                            @ weight + bias for ids in sequences])


def pair_scores(rows: list[dict], model_dir: Path, head_dir: Path,
                adapter_dir: Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    chosen = independent_scores([r["chosen_input_ids"] for r in rows], model_dir, head_dir, adapter_dir)
    rejected = independent_scores([r["rejected_input_ids"] for r in rows], model_dir, head_dir, adapter_dir)
    return chosen, rejected


def reward_model_scores(rows: list[dict], tokenizer_dir: Path, **reward_keys) -> torch.Tensor:
    """Scores of a padded batch (chosen rows, then rejected) from the reward model a ppo run would load."""
    config = load_config({"model_name_or_path": str(tokenizer_dir), "stage": "ppo", "dataset": "identity",
                          "template": "chatml", "reward_model_type": "full", **reward_keys})
    tokenizer = load_tokenizer(config)
    scorer = load_full_reward_model(config, tokenizer)
    batch = PairwiseCollator(tokenizer)(rows)
    with torch.no_grad():
        return last_token_scores(scorer(**batch).values, batch["attention_mask"])


def train_log(output_dir: Path, key: str) -> list[float]:
    return [r[key] for r in read_log(output_dir) if key in r]


def assert_pairwise_loss_fell(losses: list[float], factor: float) -> None:
    """Two-sided: the head starts near 0, so the first loss is near log 2; the last ones are clearly lower, finite."""
    assert 0.55 < losses[0] < 0.85, losses
    assert sum(losses[-3:]) / 3 < factor * losses[0], losses
    assert all(math.isfinite(v) for v in losses), losses


def test_lora_reward_model_learns_and_its_saved_folder_scores_as_training_did(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    config = rm_config(tiny_model_dir, out, eval_strategy="steps", eval_steps=12, eval_on_start=True,
                       plot_loss=True)
    tunelab.train(config)

    assert_pairwise_loss_fell(train_log(out, "loss"), factor=0.4)
    assert sum(train_log(out, "rewards/accuracies")[-3:]) / 3 >= 0.8
    first_eval = next(r for r in read_log(out) if "eval_loss" in r)
    results = json.loads((out / "eval_results.json").read_text())
    assert first_eval["current_steps"] == 0 and 0.6 < first_eval["eval_loss"] < 0.8
    assert results["eval_rewards/accuracies"] >= 0.85 > first_eval["eval_rewards/accuracies"]
    assert results["eval_loss"] < 0.5 * first_eval["eval_loss"]
    for name in ("adapter_model.safetensors", "adapter_config.json", "value_head.safetensors", "tokenizer.json",
                 "checkpoint-24/adapter_model.safetensors", "checkpoint-24/value_head.safetensors",
                 "training_loss.png", "training_eval_loss.png", "training_rewards_accuracies.png",
                 "training_eval_rewards_accuracies.png"):
        assert (out / name).exists(), name
    first_train = next(r for r in read_log(out) if "loss" in r)
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"} <= set(first_train)

    # The saved adapter and head, rebuilt without tunelab, rank the evaluation pairs as the trained model did.
    rows = eval_rows(config)
    assert len(rows) == 16
    chosen, rejected = pair_scores(rows, tiny_model_dir, out, adapter_dir=out)
    assert (chosen > rejected).float().mean().item() == pytest.approx(results["eval_rewards/accuracies"], abs=1e-6)
    assert chosen.mean().item() == pytest.approx(results["eval_rewards/chosen"], abs=1e-5)
    assert rejected.mean().item() == pytest.approx(results["eval_rewards/rejected"], abs=1e-5)
    # A later run loads it as its reward model (base + the rm adapter) and scores a padded batch the same way.
    scores = reward_model_scores(rows, tiny_model_dir, reward_model=str(tiny_model_dir),
                                 reward_model_adapters=[str(out)])
    torch.testing.assert_close(scores, torch.cat([chosen, rejected]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("method, extra", [("full", {"learning_rate": 2e-3}),
                                           ("freeze", {"learning_rate": 1e-2, "freeze_trainable_layers": 1})])
def test_full_and_freeze_reward_models_reload_as_full_reward_models(tiny_model_dir, tmp_path, method, extra):
    out = tmp_path / "run"
    config = rm_config(tiny_model_dir, out, finetuning_type=method, max_steps=16, save_steps=16, do_eval=True,
                       lr_scheduler_type="constant", **extra)
    tunelab.train(config)
    assert_pairwise_loss_fell(train_log(out, "loss"), factor=0.7)
    for name in ("model.safetensors", "config.json", "value_head.safetensors", "tokenizer.json"):
        assert (out / name).exists(), name

    before, after = load_file(tiny_model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    for name in before:
        # A score never passes through lm_head, so only the decoder (all of it, or its last layer) moves.
        should_move = ".layers.1." in name if method == "freeze" else not name.startswith("lm_head")
        assert (not torch.equal(before[name], after[name])) == should_move, name

    results = json.loads((out / "eval_results.json").read_text())
    rows = eval_rows(config)
    chosen, rejected = pair_scores(rows, out, out)
    assert (chosen > rejected).float().mean().item() == pytest.approx(results["eval_rewards/accuracies"], abs=1e-6)
    assert (chosen - rejected).mean().item() == pytest.approx(results["eval_rewards/margins"], abs=1e-5)
    scores = reward_model_scores(rows, tiny_model_dir, reward_model=str(out))
    torch.testing.assert_close(scores, torch.cat([chosen, rejected]), rtol=0, atol=1e-5)

    if method == "full":
        # Under DeepSpeed ZeRO-3 the Trainer saves from the gathered state dict of the wrapper: the files are the same.
        from transformers import AutoModelForCausalLM

        model = ValueHeadModel(AutoModelForCausalLM.from_pretrained(out))
        model.load_value_head(out)
        model.save_pretrained(tmp_path / "from_state_dict", state_dict=model.state_dict())
        for name in ("model.safetensors", "value_head.safetensors"):
            expected, saved = load_file(out / name), load_file(tmp_path / "from_state_dict" / name)
            assert expected.keys() == saved.keys() and all(torch.equal(expected[k], saved[k]) for k in expected)
        # An rm run that starts from the folder continues with its head: evaluating it alone gives the same results.
        again = tunelab.train(rm_config(out, tmp_path / "eval_only", finetuning_type="full", do_train=False,
                                        do_eval=True))
        for key in ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins"):
            assert again[key] == pytest.approx(results[key], abs=1e-5), key


@pytest.mark.parametrize("method", ["lora", "full"])
def test_interrupted_reward_model_resumes_to_the_same_head(tiny_model_dir, tmp_path, method):
    out = tmp_path / "run"
    extra = {"learning_rate": 1e-3} if method == "full" else {}
    config = rm_config(tiny_model_dir, out, finetuning_type=method, val_size=0.0, max_steps=12, save_steps=6,
                       **extra)
    tunelab.train(config)
    weights = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    uninterrupted = {name: load_file(out / name) for name in ("value_head.safetensors", weights)}
    losses = {r["current_steps"]: r["loss"] for r in read_log(out) if "loss" in r}
    # As a run killed between its checkpoints leaves output_dir: checkpoint-6 and the log so far.
    for path in out.iterdir():
        if path.name not in ("checkpoint-6", "trainer_log.jsonl"):
            subprocess.run(["rm", "-rf", str(path)], check=True)
    tunelab.train(config)

    resumed_losses = {r["current_steps"]: r["loss"] for r in read_log(out) if "loss" in r}
    assert sorted(resumed_losses) == sorted(losses), "the log reads as one run"
    for step in (8, 10, 12):
        assert resumed_losses[step] == pytest.approx(losses[step], rel=1e-4), step
    for name, expected in uninterrupted.items():
        resumed = load_file(out / name)
        for key in expected:
            torch.testing.assert_close(resumed[key], expected[key], rtol=1e-4, atol=1e-4)
    head = uninterrupted["value_head.safetensors"]["v_head.summary.weight"]
    assert not torch.equal(head, load_file(out / "checkpoint-6" / "value_head.safetensors")["v_head.summary.weight"])


@pytest.mark.distributed
def test_two_processes_train_a_reward_model_as_one_process_with_accumulation_does(tiny_model_dir, tmp_path):
    """Same losses and accuracies, same adapter and value head."""
    records = assert_two_processes_train_as_accumulation(
        lambda out, **more: rm_config(tiny_model_dir, out, max_steps=4, per_device_train_batch_size=2, val_size=0.0,
                                      **more),
        tmp_path, 29531, keys=("loss", "rewards/accuracies"),
        weights=("adapter_model.safetensors", "value_head.safetensors"))
    assert [r["current_steps"] for r in records] == [2, 4]


@pytest.mark.skipif(not LF_DATA.is_dir(), reason="../shared/lf_data (LLaMA-Factory's demo data) is absent")
def test_llamafactory_dpo_en_demo_trains_a_reward_model(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    tunelab.train(rm_config(tiny_model_dir, out, dataset="dpo_en_demo", dataset_dir=str(LF_DATA), max_samples=16,
                            val_size=0.0, cutoff_len=128, max_steps=2, logging_steps=1, save_steps=2))
    records = [r for r in read_log(out) if "loss" in r]
    assert [r["current_steps"] for r in records] == [1, 2]
    assert all(0.3 < r["loss"] < 1.5 and 0.0 <= r["rewards/accuracies"] <= 1.0 for r in records), records
    assert (out / "value_head.safetensors").exists()
