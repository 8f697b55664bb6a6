"""The dpo stage (and its shorthands orpo and simpo) end to end on a tiny random model and the demo preference data:
each loss learns to prefer the chosen replies, with the reference the config asks for, and logs LLaMA-Factory's
metrics. The data is built so that the preference is learnable: helpful chosen replies against dismissive ones
(`dpo_demo`), the right identity against a wrong one (`identity_preference`).
"""

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import tunelab
from helpers import LF_DATA, assert_two_processes_train_as_accumulation, read_log, run_config


def dpo_config(model_dir, output_dir, **overrides) -> dict:
    return run_config(model_dir, output_dir, **{"stage": "dpo", "dataset": "dpo_demo", "logging_steps": 1,
                                                "save_steps": 100, **overrides})


def series(output_dir, key: str) -> list[float]:
    return [r[key] for r in read_log(output_dir) if key in r and "eval_loss" not in r]


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


@pytest.fixture
def model_loads(monkeypatch) -> list[str]:
    """The models transformers loads during a test, counted at its one entry point for causal LMs."""
    loads = []
    original = AutoModelForCausalLM.from_pretrained

    def counting(*args, **kwargs):
        loads.append(str(args[0]))
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", counting)
    return loads


def test_lora_dpo_learns_with_the_policy_without_adapter_as_reference(tiny_model_dir, tmp_path, model_loads):
    out = tmp_path / "run"
    tunelab.train(dpo_config(tiny_model_dir, out, max_steps=16))
    assert len(model_loads) == 1, f"a second model was loaded for the reference: {model_loads}"
    rewards_chosen, rewards_rejected = series(out, "rewards/chosen"), series(out, "rewards/rejected")
    losses, margins, accuracies = series(out, "loss"), series(out, "rewards/margins"), series(out, "rewards/accuracies")
    # Step 1: LoRA's B matrices are 0, so the policy equals its adapter-off self: log-ratios and rewards are exactly 0.
    assert rewards_chosen[0] == 0.0 and rewards_rejected[0] == 0.0 and accuracies[0] == 0.0
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)
    # Then the chosen replies gain on the rejected ones.
    assert mean(accuracies[-3:]) >= 0.8, accuracies
    assert mean(margins[-3:]) > 1.0 and mean(margins[-3:]) > mean(margins[:3]) + 1.0, margins
    assert mean(rewards_rejected[-3:]) < 0 < mean(rewards_chosen[-3:])
    assert mean(losses[-3:]) < 0.4 * math.log(2) and all(math.isfinite(v) for v in losses), losses
    record = read_log(out)[0]
    for key in ("logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected"):
        assert math.isfinite(record[key]), key


@pytest.mark.parametrize("method, extra", [
    ("full", {"learning_rate": 1e-3}),                           # ref_model named explicitly (below)
    ("freeze", {"learning_rate": 5e-3, "freeze_trainable_layers": 1}),   # no ref_model: a frozen copy of the base
])
def test_full_and_freeze_dpo_train_against_a_separate_reference(tiny_model_dir, tmp_path, model_loads, method, extra):
    out = tmp_path / "run"
    if method == "full":
        extra = {**extra, "ref_model": str(tiny_model_dir)}
    tunelab.train(dpo_config(tiny_model_dir, out, finetuning_type=method, max_steps=16, **extra))
    assert len(model_loads) == 2, model_loads
    margins, accuracies = series(out, "rewards/margins"), series(out, "rewards/accuracies")
    assert margins[0] == 0.0, "policy and reference start from the same weights"
    assert mean(accuracies[-3:]) >= 0.8 and mean(margins[-3:]) > 1.0, (accuracies, margins)
    before = load_file(tiny_model_dir / "model.safetensors")
    changed = [name for name, tensor in load_file(out / "model.safetensors").items()
               if not torch.equal(tensor, before[name])]
    assert changed and (method == "full" or all(".layers.1." in name for name in changed)), changed


@pytest.fixture(scope="module")
def dpo_adapter(tiny_model_dir, tmp_path_factory):
    """A LoRA adapter trained by dpo to prefer the chosen replies of dpo_demo."""
    trained = tmp_path_factory.mktemp("dpo_adapter")
    tunelab.train(dpo_config(tiny_model_dir, trained, max_steps=8))
    return trained


@pytest.mark.parametrize("quantization_bit", [None, 8])
def test_ref_model_with_adapters_and_quantization_is_the_reference(tiny_model_dir, dpo_adapter, tmp_path,
                                                                    quantization_bit):
    if quantization_bit:
        pytest.importorskip("bitsandbytes")
    out = tmp_path / "run"
    quantization = {"ref_model_quantization_bit": quantization_bit} if quantization_bit else {}
    tunelab.train(dpo_config(tiny_model_dir, out, max_steps=2, ref_model=str(tiny_model_dir),
                             ref_model_adapters=str(dpo_adapter), **quantization))
    first = read_log(out)[0]
    # The reference is the base plus the adapter that learned to prefer the chosen replies; the fresh policy (the
    # base) prefers them less, so at step 1 its log-ratios are negative on chosen replies and positive on rejected.
    assert first["rewards/chosen"] < 0 < first["rewards/rejected"], first
    assert first["rewards/margins"] < -0.5 and first["loss"] > math.log(2), first


@pytest.mark.parametrize("stage, beta", [("orpo", 1.0), ("simpo", 2.0)])
def test_orpo_and_simpo_train_without_any_reference(tiny_model_dir, tmp_path, model_loads, stage, beta):
    out = tmp_path / "run"
    # Full fine-tuning: a reference would be a second model here, and none must be loaded.
    tunelab.train(dpo_config(tiny_model_dir, out, stage=stage, pref_beta=beta, finetuning_type="full",
                             learning_rate=1e-3, logging_steps=2))
    assert len(model_loads) == 1, model_loads
    for record in (r for r in read_log(out) if "rewards/chosen" in r):
        # Without a reference the reward is beta x the average log-prob of the reply.
        assert record["rewards/chosen"] == pytest.approx(beta * record["logps/chosen"], rel=1e-4, abs=1e-5)
    losses, margins = series(out, "loss"), series(out, "rewards/margins")
    assert mean(series(out, "rewards/accuracies")[-3:]) >= 0.8
    assert mean(margins[-3:]) > mean(margins[:2]) + 0.5, margins
    assert mean(losses[-3:]) < 0.9 * losses[0], losses


@pytest.mark.parametrize("loss, first_loss", [("hinge", 1.0), ("ipo", (1 / (2 * 0.1)) ** 2)])
def test_hinge_and_ipo_start_where_their_formulas_say_and_fall(tiny_model_dir, tmp_path, loss, first_loss):
    out = tmp_path / "run"
    tunelab.train(dpo_config(tiny_model_dir, out, pref_loss=loss, max_steps=4))
    losses = series(out, "loss")
    # At step 1 the policy is its reference (d = 0): hinge relu(1 - 0) = 1, ipo (0 - 1 / (2 beta))^2 = 25.
    assert losses[0] == pytest.approx(first_loss, rel=1e-5)
    assert losses[-1] < 0.95 * losses[0], losses


def test_pref_ftx_adds_an_sft_term_on_the_chosen_replies(tiny_model_dir, tmp_path):
    runs = {}
    for ftx in (0.0, 1.0):
        out = tmp_path / f"ftx{ftx}"
        tunelab.train(dpo_config(tiny_model_dir, out, pref_ftx=ftx, max_steps=12))
        runs[ftx] = out
    plain, with_sft = series(runs[0.0], "loss"), series(runs[1.0], "loss")
    # Same data and seed: step 1 differs by exactly the SFT term, the mean negative log-prob per chosen token, which
    # for an untrained model over an 800-token vocabulary is close to log(800) = 6.7.
    assert 5.0 < with_sft[0] - plain[0] < 9.0, (plain[0], with_sft[0])
    # The SFT term pulls the chosen replies up beyond what DPO alone does, and the preference is still learned.
    assert mean(series(runs[1.0], "rewards/chosen")[-3:]) > mean(series(runs[0.0], "rewards/chosen")[-3:]) + 0.5
    assert mean(series(runs[1.0], "rewards/margins")[-3:]) > 1.0


def test_alpaca_preference_data_with_evaluation_and_plots(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    tunelab.train(dpo_config(tiny_model_dir, out, dataset="identity_preference", val_size=0.25, eval_strategy="steps",
                             eval_steps=8, logging_steps=2, max_steps=16, plot_loss=True))
    evaluations = [r for r in read_log(out) if "eval_loss" in r]
    assert len(evaluations) >= 2
    assert evaluations[-1]["eval_rewards/accuracies"] >= 0.8
    assert evaluations[-1]["eval_loss"] < 0.5 * math.log(2)
    results = json.loads((out / "eval_results.json").read_text())
    for key in ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_logps/chosen"):
        assert key in results, key
    for name in ("training_loss.png", "training_eval_loss.png", "training_rewards_accuracies.png",
                 "training_rewards_margins.png"):
        assert (out / name).exists(), name


def test_batch_times_accumulation_gives_the_same_losses_and_rewards(tiny_model_dir, tmp_path):
    """4 pairs x 1 step and 2 pairs x 2 accumulation steps must train the same model: the loss is a mean over pairs."""
    runs = {}
    for batch, accumulation in ((4, 1), (2, 2)):
        out = tmp_path / f"b{batch}"
        tunelab.train(dpo_config(tiny_model_dir, out, finetuning_type="full", learning_rate=1e-3, max_steps=3,
                                 per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation))
        runs[batch] = out
    for key in ("loss", "rewards/margins", "rewards/accuracies"):
        assert series(runs[4], key) == pytest.approx(series(runs[2], key), rel=1e-4, abs=1e-6), key
    assert series(runs[4], "rewards/margins")[-1] != 0.0, "the runs must have moved for the comparison to count"


@pytest.mark.distributed
def test_two_processes_train_dpo_as_one_process_with_accumulation_does(tiny_model_dir, tmp_path):
    """Same losses, same reward margins (gathered from both processes), same adapter."""
    records = assert_two_processes_train_as_accumulation(
        lambda out, **more: dpo_config(tiny_model_dir, out, max_steps=4, logging_steps=2, per_device_train_batch_size=2,
                                       **more),
        tmp_path, 29541, keys=("loss", "rewards/margins"), weights=("adapter_model.safetensors",))
    assert [r["current_steps"] for r in records] == [2, 4]


@pytest.mark.skipif(not LF_DATA.is_dir(), reason="../shared/lf_data (LLaMA-Factory's demo data) is absent")
def test_llamafactory_dpo_en_demo_trains(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    tunelab.train(dpo_config(tiny_model_dir, out, dataset="dpo_en_demo", dataset_dir=str(LF_DATA), max_samples=8,
                             max_steps=2))
    records = [r for r in read_log(out) if "loss" in r]
    assert [r["current_steps"] for r in records] == [1, 2]
    assert all(math.isfinite(r["loss"]) and "rewards/accuracies" in r for r in records)
