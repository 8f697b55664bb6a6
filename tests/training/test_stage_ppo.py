"""The ppo stage on a tiny random model: with a reward server favouring one token, the mean reward rises while the
KL to the reference stays bounded; an interrupted run resumes exactly; full, freeze, an rm adapter as the reward
model, and 2 processes under torchrun all run.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/training/test_stage_ppo.py -q

The reward counts the token the untrained model already finds likeliest (a random model gives every token about the
same small chance, so "short answers" would give no signal to learn from); `ppo_score_norm` turns its rare hits
into clear advantages.
"""

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

import tunelab
from tunelab.training.stages.ppo import ScoreStatistics, gae
from helpers import favourite_token, make_rm_adapter, read_log, reward_server, run_config, train_with_two_processes

LOG_FIELDS = {"current_steps", "total_steps", "loss", "lr", "epoch", "percentage", "elapsed_time", "remaining_time",
              "reward", "kl", "kl_coef", "policy_loss", "value_loss", "clipfrac", "response_length"}


def ppo_config(model_dir: Path, output_dir: Path, url: str, **overrides) -> dict:
    values = dict(stage="ppo", reward_model=url, reward_model_type="api", cutoff_len=64, max_new_tokens=8,
                  temperature=1.0, top_p=1.0, top_k=0, per_device_train_batch_size=16, ppo_epochs=1,
                  ppo_score_norm=True, max_steps=30, logging_steps=5, save_steps=100, seed=0)
    values.update(overrides)
    return run_config(model_dir, output_dir, **values)


@pytest.fixture(scope="module")
def counting_server(tiny_model_dir):
    """A reward server scoring each completion by how often it holds the favourite token's text."""
    target = AutoTokenizer.from_pretrained(tiny_model_dir).decode([favourite_token(tiny_model_dir)])

    def score(messages: list[str]) -> list[float]:
        return [float(m.rsplit("<|im_start|>assistant\n", 1)[1].count(target)) for m in messages]

    with reward_server(score) as url:
        yield url


def test_gae_equals_the_discounted_sum_of_td_errors():
    torch.manual_seed(0)
    rewards, values = torch.randn(3, 5), torch.randn(3, 5)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]]).float()
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    for row in range(3):
        n = int(mask[row].sum())
        r, v = rewards[row, :n], torch.cat([values[row, :n], torch.zeros(1)])
        deltas = r + 0.9 * v[1:] - v[:-1]
        expected = torch.stack([sum((0.9 * 0.8) ** k * deltas[t + k] for k in range(n - t)) for t in range(n)])
        torch.testing.assert_close(advantages[row, :n], expected)
        torch.testing.assert_close(returns[row, :n], expected + values[row, :n])


def test_running_score_statistics_equal_those_of_all_scores_so_far():
    batches = [torch.tensor([1.0, 2.0, 4.0]), torch.tensor([0.0, 0.0]), torch.tensor([3.0, 5.0, 8.0, 1.0])]
    statistics = ScoreStatistics()
    for n, batch in enumerate(batches, start=1):
        statistics.update(batch)
        seen = torch.cat(batches[:n])
        assert statistics.mean == pytest.approx(seen.mean().item())
        assert statistics.var == pytest.approx(seen.var(unbiased=False).item())


def test_lora_ppo_raises_the_reward_with_bounded_kl(tiny_model_dir, tmp_path, counting_server):
    out = tmp_path / "run"
    metrics = tunelab.train(ppo_config(tiny_model_dir, out, counting_server, plot_loss=True))
    records = read_log(out)
    assert LOG_FIELDS <= set(records[0]), records[0]
    rewards = [r["reward"] for r in records]
    kls = [r["kl"] for r in records]
    assert all(math.isfinite(v) for r in records for v in (r["reward"], r["kl"], r["loss"], r["value_loss"]))
    # The favourite token starts rare (about 1 in 100 tokens) and ends up in most completions.
    assert rewards[0] < 0.3, rewards
    assert rewards[-1] > 0.6 and rewards[-1] > 3 * rewards[0], rewards
    # The KL penalty, adapted towards ppo_target (6), keeps the policy near the reference.
    assert abs(kls[0]) < 2 and max(kls) < 15, kls
    assert records[-1]["kl_coef"] != records[0]["kl_coef"], "the KL controller adapts"
    for name in ("adapter_model.safetensors", "adapter_config.json", "value_head.safetensors", "tokenizer.json",
                 "trainer_log.jsonl", "trainer_state.json", "train_results.json", "all_results.json",
                 "training_loss.png", "training_reward.png", "training_kl.png"):
        assert (out / name).exists(), name
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 30
    assert metrics["train_runtime"] > 0 and metrics["num_input_tokens_seen"] > 0
    assert records[-1]["current_steps"] == 30 and records[-1]["percentage"] == 100.0


def test_interrupted_run_resumes_from_its_checkpoint_exactly(tiny_model_dir, tmp_path, counting_server):
    out = tmp_path / "run"
    config = ppo_config(tiny_model_dir, out, counting_server, max_steps=6, save_steps=3, logging_steps=1,
                        ppo_epochs=2, per_device_train_batch_size=4, gradient_accumulation_steps=2)
    tunelab.train(config)
    uninterrupted = {r["current_steps"]: r for r in read_log(out)}
    checkpoint = out / "checkpoint-3"
    for name in ("adapter_model.safetensors", "value_head.safetensors", "optimizer.pt", "scheduler.pt",
                 "rng_state_0.pth", "trainer_state.json", "stage_state.json"):
        assert (checkpoint / name).exists(), name
    # As a run killed after its first checkpoint leaves output_dir: checkpoint-3 and the log so far.
    for path in out.iterdir():
        if path.name not in ("checkpoint-3", "trainer_log.jsonl"):
            subprocess.run(["rm", "-rf", str(path)], check=True)
    tunelab.train(config)
    resumed = read_log(out)
    assert [r["current_steps"] for r in resumed] == [1, 2, 3, 4, 5, 6], "the log reads as one run"
    for record in resumed[3:]:
        before = uninterrupted[record["current_steps"]]
        for key in ("reward", "kl", "kl_coef", "loss", "value_loss"):
            assert record[key] == pytest.approx(before[key], rel=1e-4, abs=1e-6), (record["current_steps"], key)


@pytest.mark.parametrize("method, extra", [("full", {"learning_rate": 1e-3}),
                                           ("freeze", {"freeze_trainable_layers": 1, "learning_rate": 1e-3})])
def test_full_and_freeze_ppo_train_their_weights_and_the_value_head(tiny_model_dir, tmp_path, counting_server,
                                                                    method, extra):
    out = tmp_path / "run"
    tunelab.train(ppo_config(tiny_model_dir, out, counting_server, finetuning_type=method, max_steps=2,
                             logging_steps=1, per_device_train_batch_size=4, ppo_whiten_rewards=True, **extra))
    records = read_log(out)
    assert [r["current_steps"] for r in records] == [1, 2]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["kl"]) for r in records)
    before, after = load_file(tiny_model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    expected = set(before) if method == "full" else {name for name in before if ".layers.1." in name}
    assert moved == expected
    assert (out / "value_head.safetensors").exists()


def test_an_rm_adapter_on_the_policy_base_is_the_reward_model(tiny_model_dir, tmp_path):
    folder = make_rm_adapter(tiny_model_dir, tmp_path / "rm")
    out = tmp_path / "run"
    tunelab.train(ppo_config(tiny_model_dir, out, str(folder), reward_model_type="lora", max_steps=2,
                             logging_steps=1, per_device_train_batch_size=4))
    records = read_log(out)
    assert [r["current_steps"] for r in records] == [1, 2]
    assert all(math.isfinite(r["reward"]) and r["reward"] != 0 for r in records)
    assert records[0]["rewards/reward_model"] == records[0]["reward"]
    # The policy's own adapter is saved, not the reward adapter beside it.
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 8
    assert not (out / "reward").exists()


@pytest.mark.distributed
def test_ppo_under_torchrun_with_two_processes(tiny_model_dir, tmp_path, counting_server):
    out = tmp_path / "run"
    config = ppo_config(tiny_model_dir, out, counting_server, max_steps=2, logging_steps=1,
                        per_device_train_batch_size=2)
    train_with_two_processes(config, tmp_path, 29551)
    assert [r["current_steps"] for r in read_log(out)] == [1, 2], "only rank 0 writes the log"
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2
    assert (out / "adapter_model.safetensors").exists() and (out / "value_head.safetensors").exists()
