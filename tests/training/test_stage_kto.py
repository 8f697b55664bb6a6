"""The kto stage end to end on a tiny random model and `kto_demo` (the right identity and helpful answers marked
desirable, wrong identities and dismissive answers undesirable): it learns to raise the one and lower the other,
weighs the two kinds as configured, and reads LLaMA-Factory's `kto_en_demo`.
"""

import math

import pytest

import tunelab
from helpers import LF_DATA, read_log, run_config


def kto_config(model_dir, output_dir, **overrides) -> dict:
    return run_config(model_dir, output_dir, **{"stage": "kto", "dataset": "kto_demo", "logging_steps": 1,
                                                "save_steps": 100, **overrides})


def train_records(output_dir) -> list[dict]:
    return [r for r in read_log(output_dir) if "loss" in r]


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def test_lora_kto_learns_to_separate_desirable_from_undesirable(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    tunelab.train(kto_config(tiny_model_dir, out, val_size=0.2, eval_strategy="steps", eval_steps=24,
                             plot_loss=True))
    records = train_records(out)
    first = records[0]
    # Step 1: the policy is its adapter-off reference, so every log-ratio and the KL estimate are 0 and each
    # sample's loss is 1 - sigmoid(0) = 0.5.
    assert first["kl"] == 0.0 and first["loss"] == pytest.approx(0.5, abs=1e-6)
    assert all(r["count/chosen"] + r["count/rejected"] == 4 for r in records)
    assert all(math.isfinite(r["kl"]) and r["kl"] >= 0 for r in records)
    assert any(r["kl"] > 0 for r in records), "the KL estimate never moved"
    margins = [r["rewards/margins"] for r in records if "rewards/margins" in r]
    assert mean(margins[-3:]) > mean(margins[:3]) + 1.0 and mean(margins[-3:]) > 1.0, margins
    assert mean([r["loss"] for r in records[-3:]]) < 0.6 * first["loss"]
    evaluation = [r for r in read_log(out) if "eval_loss" in r][-1]
    assert evaluation["eval_rewards/margins"] > 0.5 and evaluation["eval_kl"] >= 0
    for name in ("training_loss.png", "training_rewards_margins.png", "training_kl.png"):
        assert (out / name).exists(), name


def test_kto_weights_scale_each_kind_of_sample_as_the_formula_says(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    tunelab.train(kto_config(tiny_model_dir, out, kto_chosen_weight=2.0, kto_rejected_weight=0.5, max_steps=1))
    record = train_records(out)[0]
    # At step 1 every sample loses w * (1 - sigmoid(0)) = w / 2, with w its kind's weight; the loss is the mean.
    chosen, rejected = record["count/chosen"], record["count/rejected"]
    assert chosen > 0 and rejected > 0, record
    assert record["loss"] == pytest.approx((2.0 * chosen + 0.5 * rejected) / 2 / (chosen + rejected), abs=1e-6)


def test_kto_with_pref_ftx_and_a_frozen_copy_as_reference(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    tunelab.train(kto_config(tiny_model_dir, out, finetuning_type="full", learning_rate=1e-3, pref_ftx=1.0,
                             max_steps=8))
    records = train_records(out)
    # The SFT term adds the mean negative log-prob per desirable token (about log(800) = 6.7 for a random model)
    # for each desirable sample of the batch.
    sft_share = records[0]["count/chosen"] / 4
    assert records[0]["loss"] - 0.5 == pytest.approx(6.7 * sft_share, rel=0.25)
    assert records[0]["kl"] == 0.0, "the reference starts as an exact copy of the policy"
    assert mean([r["loss"] for r in records[-3:]]) < records[0]["loss"]
    assert mean([r["rewards/chosen"] for r in records[-3:] if "rewards/chosen" in r]) > 0


@pytest.mark.skipif(not LF_DATA.is_dir(), reason="../shared/lf_data (LLaMA-Factory's demo data) is absent")
def test_llamafactory_kto_en_demo_trains(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    tunelab.train(kto_config(tiny_model_dir, out, dataset="kto_en_demo", dataset_dir=str(LF_DATA), max_samples=8,
                             max_steps=2))
    records = train_records(out)
    assert [r["current_steps"] for r in records] == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["kl"] >= 0 for r in records)
