"""The grpo stage on a tiny random model: a Python reward function favouring one token raises the mean reward with a
finite, non-negative KL; `grpo_beta: 0` runs without a reference; a reward server works as the reward model; 2
processes under torchrun train.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/training/test_stage_grpo.py -q

The reward counts the token the untrained model already finds likeliest: a random model gives every token about the
same small chance, so a property like "short answers" would never vary within a group and teach nothing.
"""

import json
import math
from pathlib import Path

import pytest

import tunelab
from helpers import favourite_token, read_log, reward_server, run_config, train_with_two_processes

LOG_FIELDS = {"current_steps", "total_steps", "loss", "lr", "epoch", "percentage", "elapsed_time", "remaining_time",
              "reward", "reward_std", "kl", "completion_length", "clip_ratio"}

REWARD_FILE = """
TARGET = {target}

def favourite(prompts, completions, completion_ids, **kwargs):
    return [float(sum(token == TARGET for token in ids)) for ids in completion_ids]

def longer(prompts, completions, **kwargs):
    return [len(text) / 100 for text in completions]
"""


def grpo_config(model_dir: Path, output_dir: Path, **overrides) -> dict:
    values = dict(stage="grpo", cutoff_len=64, max_new_tokens=8, temperature=1.0, top_p=1.0, top_k=0,
                  per_device_train_batch_size=4, num_generations=4, max_steps=30, logging_steps=5, save_steps=100,
                  seed=0)
    values.update(overrides)
    return run_config(model_dir, output_dir, **values)


@pytest.fixture
def reward_file(tiny_model_dir, tmp_path) -> Path:
    path = tmp_path / "rewards.py"
    path.write_text(REWARD_FILE.format(target=favourite_token(tiny_model_dir)))
    return path


def test_lora_grpo_raises_the_reward_of_a_python_function(tiny_model_dir, tmp_path, reward_file):
    out = tmp_path / "run"
    tunelab.train(grpo_config(tiny_model_dir, out, reward_funcs=f"{reward_file}:favourite", plot_loss=True))
    records = read_log(out)
    assert LOG_FIELDS <= set(records[0]), records[0]
    favourite = [r["reward"] for r in records]
    # The favourite token starts rare (about 1 in 100 tokens) and ends up in most completions.
    assert favourite[0] < 0.3, favourite
    assert favourite[-1] > 1.0 and favourite[-1] > 4 * favourite[0], favourite
    kls = [r["kl"] for r in records]
    assert all(math.isfinite(k) and k >= 0 for k in kls) and kls[-1] > kls[0], kls
    assert all(math.isfinite(r["loss"]) for r in records)
    for name in ("adapter_model.safetensors", "train_results.json", "trainer_state.json", "training_loss.png",
                 "training_reward.png", "training_kl.png"):
        assert (out / name).exists(), name
    assert not (out / "value_head.safetensors").exists(), "grpo trains no value head"


def test_without_kl_there_is_no_reference_and_iterations_reuse_rollouts(tiny_model_dir, tmp_path, reward_file):
    out = tmp_path / "run"
    tunelab.train(grpo_config(tiny_model_dir, out, reward_funcs=f"{reward_file}:favourite", grpo_beta=0.0,
                              grpo_iterations=2, finetuning_type="full", learning_rate=1e-3, max_steps=2,
                              logging_steps=1))
    records = read_log(out)
    assert [r["current_steps"] for r in records] == [1, 2]
    assert all("kl" not in r for r in records), "no reference, no KL"
    assert all(math.isfinite(r["loss"]) and 0 <= r["clip_ratio"] <= 1 for r in records)
    assert (out / "model.safetensors").exists()


def test_a_reward_server_is_the_reward_model_beside_a_function(tiny_model_dir, tmp_path, reward_file):
    out = tmp_path / "run"
    with reward_server(lambda messages: [-len(m) / 100 for m in messages]) as url:
        tunelab.train(grpo_config(tiny_model_dir, out, reward_model=url, reward_model_type="api",
                                  reward_funcs=f"{reward_file}:longer", max_steps=2, logging_steps=1,
                                  gradient_accumulation_steps=2))
        requests = reward_server.requests
    records = read_log(out)
    # One request per round, for all 4 x 2 prompts x 4 completions.
    assert [len(r["messages"]) for r in requests] == [32, 32]
    assert [r["current_steps"] for r in records] == [1, 2]
    for r in records:
        assert r["rewards/reward_model"] < 0 < r["rewards/longer"]
        assert r["reward"] == pytest.approx(r["rewards/reward_model"] + r["rewards/longer"], abs=1e-5)


@pytest.mark.distributed
def test_grpo_under_torchrun_with_two_processes(tiny_model_dir, tmp_path, reward_file):
    out = tmp_path / "run"
    config = grpo_config(tiny_model_dir, out, reward_funcs=f"{reward_file}:favourite", max_steps=2, logging_steps=1,
                         per_device_train_batch_size=2)
    train_with_two_processes(config, tmp_path, 29561)
    assert [r["current_steps"] for r in read_log(out)] == [1, 2], "only rank 0 writes the log"
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2
    assert (out / "adapter_model.safetensors").exists()
