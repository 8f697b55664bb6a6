"""ppo and grpo under DeepSpeed ZeRO-2 and ZeRO-3, 2 CPU processes over gloo: each run samples, scores and trains
what the same 2 processes sample, score and train under plain DDP with the same seed.

Under ZeRO-3 every model is sharded: the policy generates with its layers gathered as they run (all processes step
together), a full run's reference model and a separate reward model run in inference engines of their own, and
checkpoints hold each process's optimizer partition in DeepSpeed's format. ppo scores with a reward model (an rm
adapter on the policy's base under ZeRO-2, a separate model under ZeRO-3) plus the reward function.

Tolerance: logged figures to 1e-4 relative, weights to 1e-4. ZeRO sums gradients in buckets and keeps a float32
master copy, so sums run in another order than DDP's (rounding near 1e-7); Adam, dividing by the root of tiny second
moments, magnifies that for a few entries. The sampled tokens themselves are the same, or the rewards would differ.
"""

import pytest
import torch
from helpers import (REPO, assert_resumes_exactly, favourite_token, make_rm_adapter, read_log, run_config,
                     train_with_two_processes)
from transformers import AutoModelForCausalLM

from tunelab.model.value_head import ValueHeadModel

pytest.importorskip("deepspeed", reason="the DeepSpeed tests need `pip install 'tunelab[deepspeed]'`")
pytestmark = pytest.mark.distributed

REWARD_FILE = """
def favourite(prompts, completions, completion_ids, **kwargs):
    return [float(sum(token == {target} for token in ids)) for ids in completion_ids]
"""
LOGGED = ("loss", "reward", "kl")


@pytest.fixture
def reward_funcs(tiny_model_dir, tmp_path) -> str:
    path = tmp_path / "rewards.py"
    path.write_text(REWARD_FILE.format(target=favourite_token(tiny_model_dir)))
    return f"{path}:favourite"


@pytest.fixture
def reward_models(tiny_model_dir, tmp_path) -> dict:
    """The `reward_model` keys of an rm adapter on the policy's base, and of a separate whole reward model."""
    torch.manual_seed(2)
    whole = ValueHeadModel(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    torch.nn.init.normal_(whole.v_head.weight, std=0.5)
    whole.save_pretrained(tmp_path / "rm_full")
    return {"lora": {"reward_model": str(make_rm_adapter(tiny_model_dir, tmp_path / "rm_lora")),
                     "reward_model_type": "lora"},
            "full": {"reward_model": str(tmp_path / "rm_full"), "reward_model_type": "full"}}


def rollout_config(model_dir, out, stage, method, reward_funcs, **more) -> dict:
    return run_config(model_dir, out, **{
        "stage": stage, "finetuning_type": method, "reward_funcs": reward_funcs, "cutoff_len": 64,
        "max_new_tokens": 8, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2, "max_steps": 2, "logging_steps": 1, "save_steps": 1, "seed": 0,
        "learning_rate": 1e-2 if method == "lora" else 1e-3, **more})


def assert_same_rollouts(zero: dict, ddp: dict, weights: str) -> None:
    from safetensors.torch import load_file

    records = {run: read_log(run) for run in (zero, ddp)}
    assert [r["current_steps"] for r in records[zero]] == [1, 2]
    for key in LOGGED:
        assert [r[key] for r in records[zero]] == pytest.approx([r[key] for r in records[ddp]], rel=1e-4, abs=1e-6)
    got, expected = load_file(zero / weights), load_file(ddp / weights)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("stage, method, zero, port, reward", [
    ("ppo", "lora", "z2", 29601, "lora"),
    ("ppo", "lora", "z3", 29603, "full"),
    # A full grpo run keeps a frozen copy of the starting model as its reference: sharded in its own engine.
    ("grpo", "full", "z3", 29607, None)])
def test_rollout_stages_under_zero_sample_and_train_as_under_ddp(tiny_model_dir, tmp_path, reward_funcs,
                                                                  reward_models, stage, method, zero, port, reward):
    more = reward_models[reward] if reward else {"num_generations": 2, "grpo_beta": 0.1}
    sharded, ddp = tmp_path / "zero", tmp_path / "ddp"
    deepspeed = str(REPO / "examples" / "deepspeed" / f"ds_{zero}_config.json")
    config = rollout_config(tiny_model_dir, sharded, stage, method, reward_funcs, deepspeed=deepspeed, **more)
    log = train_with_two_processes(config, tmp_path, port)
    assert f"DeepSpeed ZeRO-{zero[1]} over 2 processes: each holds {'50%' if zero == 'z3' else '100%'}" in log
    train_with_two_processes(rollout_config(tiny_model_dir, ddp, stage, method, reward_funcs, **more), tmp_path,
                             port + 1)
    weights = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    assert_same_rollouts(sharded, ddp, weights)
    if stage == "ppo":
        assert_same_rollouts(sharded, ddp, "value_head.safetensors")
        assert (sharded / "checkpoint-1" / "deepspeed").is_dir()
    if zero == "z3" and stage == "ppo":
        # Resuming reads each process's optimizer partition back: the second step is logged again, the same.
        assert_resumes_exactly(sharded, lambda: train_with_two_processes(config, tmp_path, port + 2), checkpoint=1)
