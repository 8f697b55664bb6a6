"""The preference losses against independent computations: each formula written here in plain Python on floats, and
the dpo/kto trainers' loss on a real batch against log-probabilities taken here with a plain forward and log_softmax
(not through tunelab.training.logprobs)."""

import math

import pytest
import torch

from tunelab.config import load_config
from tunelab.data import DataCollator, PairwiseCollator, load_datasets, prepare_template
from tunelab.model import load_tokenizer
from tunelab.training.arguments import build_training_arguments
from tunelab.training.preference_losses import (dpo_hinge_loss, dpo_sigmoid_loss, ipo_loss, kto_loss, orpo_loss,
                                                simpo_loss)
from tunelab.training.stages.dpo import DPOTrainer
from tunelab.training.stages.kto import KTOTrainer
from helpers import REPO



def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return math.exp(log_sigmoid(x))


# The formulas, one pair (or one KTO sample) at a time. pc, pr: policy log-probs of chosen/rejected; rc, rr: the
# reference's (sums for sigmoid and hinge, per-token averages for ipo, orpo and simpo).
def expected_sigmoid(pc, pr, rc, rr, beta, eps=0.0):
    d = (pc - rc) - (pr - rr)
    return -(1 - eps) * log_sigmoid(beta * d) - eps * log_sigmoid(-beta * d)


def expected_hinge(pc, pr, rc, rr, beta):
    return max(0.0, 1 - beta * ((pc - rc) - (pr - rr)))


def expected_ipo(pc, pr, rc, rr, beta):
    return ((pc - rc) - (pr - rr) - 1 / (2 * beta)) ** 2


def expected_orpo(pc, pr, beta):
    log_odds = (pc - pr) - (math.log(1 - math.exp(pc)) - math.log(1 - math.exp(pr)))
    return -pc - beta * log_sigmoid(log_odds)


def expected_simpo(pc, pr, beta, gamma):
    return -log_sigmoid(beta * (pc - pr) - gamma)


def expected_kto(logratio, desirable, kl, beta, w_chosen, w_rejected):
    kl = max(kl, 0.0)
    if desirable:
        return w_chosen * (1 - sigmoid(beta * (logratio - kl)))
    return w_rejected * (1 - sigmoid(beta * (kl - logratio)))


@pytest.fixture
def logps():
    """Fixed random log-probs of 8 pairs: sums over a reply, and per-token averages (all < 0)."""
    generator = torch.Generator().manual_seed(0)
    sums = -torch.rand(4, 8, generator=generator, dtype=torch.float64) * 60 - 1
    averages = -torch.rand(4, 8, generator=generator, dtype=torch.float64) * 4 - 0.01
    return sums, averages


@pytest.mark.parametrize("name, ours, expected, kwargs", [
    ("sigmoid", dpo_sigmoid_loss, expected_sigmoid, {"beta": 0.1}),
    ("sigmoid, label smoothing", dpo_sigmoid_loss, expected_sigmoid, {"beta": 0.1, "eps": 0.2}),
    ("hinge", dpo_hinge_loss, expected_hinge, {"beta": 0.1}),
    ("ipo", ipo_loss, expected_ipo, {"beta": 0.5}),
])
def test_reference_losses_match_their_formulas(logps, name, ours, expected, kwargs):
    (pc, pr, rc, rr), averages = logps
    if name == "ipo":
        pc, pr, rc, rr = averages
    kwargs_ours = {("label_smoothing" if k == "eps" else k): v for k, v in kwargs.items()}
    got = ours(pc - rc, pr - rr, **kwargs_ours)
    want = [expected(*values, **kwargs) for values in zip(*(t.tolist() for t in (pc, pr, rc, rr)))]
    assert got.tolist() == pytest.approx(want, abs=1e-5)
    assert len(set(round(w, 4) for w in want)) > 4, "the pairs must give different losses to test anything"


def test_orpo_and_simpo_match_their_formulas(logps):
    _, (pc, pr, _, _) = logps
    pairs = list(zip(pc.tolist(), pr.tolist()))
    assert orpo_loss(pc, pr, beta=0.3).tolist() == pytest.approx([expected_orpo(c, r, 0.3) for c, r in pairs],
                                                                  abs=1e-5)
    assert simpo_loss(pc, pr, beta=2.0, gamma=0.5).tolist() == pytest.approx(
        [expected_simpo(c, r, 2.0, 0.5) for c, r in pairs], abs=1e-5)


@pytest.mark.parametrize("kl", [0.7, -0.4])
def test_kto_matches_its_formula_with_both_weights(logps, kl):
    (policy, reference, _, _), _ = logps
    logratios = (policy - reference) / 10
    desirable = torch.tensor([True, False, True, True, False, False, True, False])
    got = kto_loss(logratios, desirable, torch.tensor(kl, dtype=torch.float64), beta=0.3, chosen_weight=1.5,
                   rejected_weight=0.6)
    want = [expected_kto(r, d, kl, 0.3, 1.5, 0.6) for r, d in zip(logratios.tolist(), desirable.tolist())]
    assert got.tolist() == pytest.approx(want, abs=1e-5)


# ---- the trainers' loss on one real batch ----------------------------------------------------------------------

def independent_logprobs(model, rows: dict) -> tuple[list[float], list[int]]:
    """Summed log-probs of each row's labels and their counts: a plain forward, log_softmax in float64, a loop."""
    with torch.no_grad():
        logits = model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).logits
    logp = torch.log_softmax(logits.double(), dim=-1)
    sums, counts = [], []
    for row, labels in enumerate(rows["labels"].tolist()):
        picked = [logp[row, t - 1, label].item() for t, label in enumerate(labels) if t > 0 and label != -100]
        sums.append(sum(picked))
        counts.append(len(picked))
    return sums, counts


def build(tiny_model_dir, tmp_path, **overrides):
    """Config, tokenizer, train split, a policy (the tiny model, weights nudged), the untouched model as reference."""
    from transformers import AutoModelForCausalLM

    config = load_config({"model_name_or_path": str(tiny_model_dir), "do_train": True, "finetuning_type": "full",
                          "dataset_dir": str(REPO / "data"), "template": "chatml", "cutoff_len": 128,
                          "output_dir": str(tmp_path / "run"), "report_to": "none", **overrides})
    tokenizer = load_tokenizer(config)
    splits = load_datasets(config, tokenizer, prepare_template(config, tokenizer))
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in policy.parameters():
            param.add_(0.03 * torch.randn(param.shape, generator=generator))
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    return config, tokenizer, splits.train, policy, reference


@pytest.mark.parametrize("overrides", [
    {"pref_loss": "sigmoid", "pref_beta": 0.1},
    {"pref_loss": "sigmoid", "pref_beta": 0.2, "dpo_label_smoothing": 0.1, "pref_ftx": 0.5},
    {"pref_loss": "hinge", "pref_beta": 0.1},
    {"pref_loss": "ipo", "pref_beta": 0.5},
    {"stage": "orpo", "pref_beta": 0.5},
    {"stage": "simpo", "pref_beta": 2.0, "simpo_gamma": 0.3, "pref_ftx": 0.2},
])
def test_dpo_trainer_loss_on_a_batch_matches_an_independent_computation(tiny_model_dir, tmp_path, overrides):
    config, tokenizer, train, policy, reference = build(tiny_model_dir, tmp_path, dataset="dpo_demo",
                                                         **{"stage": "dpo", **overrides})
    batch = PairwiseCollator(tokenizer)([train[i] for i in range(4)])
    uses_reference = config.pref_loss in ("sigmoid", "hinge", "ipo")
    trainer = DPOTrainer(model=policy, reference=reference if uses_reference else None, config=config,
                         args=build_training_arguments(config), data_collator=PairwiseCollator(tokenizer),
                         processing_class=tokenizer)
    loss = trainer.compute_loss(policy, batch).item()

    sums, counts = independent_logprobs(policy, batch)
    ref_sums, _ = independent_logprobs(reference, batch)
    averaged = config.pref_loss in ("ipo", "orpo", "simpo")
    policy_lp = [s / n for s, n in zip(sums, counts)] if averaged else sums
    reference_lp = [s / n for s, n in zip(ref_sums, counts)] if averaged else ref_sums
    beta, n = config.pref_beta, 4
    per_pair = []
    for i in range(n):
        pc, pr, rc, rr = policy_lp[i], policy_lp[n + i], reference_lp[i], reference_lp[n + i]
        value = {"sigmoid": lambda: expected_sigmoid(pc, pr, rc, rr, beta, config.dpo_label_smoothing),
                 "hinge": lambda: expected_hinge(pc, pr, rc, rr, beta),
                 "ipo": lambda: expected_ipo(pc, pr, rc, rr, beta),
                 "orpo": lambda: expected_orpo(pc, pr, beta),
                 "simpo": lambda: expected_simpo(pc, pr, beta, config.simpo_gamma)}[config.pref_loss]()
        per_pair.append(value - config.pref_ftx * sums[i] / counts[i])
    expected = sum(per_pair) / n
    assert loss == pytest.approx(expected, abs=1e-5)
    if uses_reference:
        assert abs(sums[0] - ref_sums[0]) > 0.1, "the nudged policy must differ from its reference"


def test_kto_trainer_loss_on_a_batch_matches_an_independent_computation(tiny_model_dir, tmp_path):
    config, tokenizer, train, nudged, untouched = build(
        tiny_model_dir, tmp_path, stage="kto", dataset="kto_demo", pref_beta=0.2, kto_chosen_weight=1.5,
        kto_rejected_weight=0.6, pref_ftx=0.3)
    # The nudged model is the reference here: with this seed the KL estimate is then positive, so it is not clamped
    # to 0 and enters the loss.
    policy, reference = untouched.train(), nudged.eval()
    tags = train["kto_tags"]
    rows = [i for i, tag in enumerate(tags) if tag][:2] + [i for i, tag in enumerate(tags) if not tag][:2]
    batch = DataCollator(tokenizer)([train[i] for i in rows])
    trainer = KTOTrainer(model=policy, reference=reference, config=config, args=build_training_arguments(config),
                         data_collator=DataCollator(tokenizer), processing_class=tokenizer)
    loss = trainer.compute_loss(policy, batch).item()

    def part(prefix):
        return {name: batch[prefix + name] for name in ("input_ids", "attention_mask", "labels")}

    sums, counts = independent_logprobs(policy, part(""))
    ref_sums, _ = independent_logprobs(reference, part(""))
    kl_sums, _ = independent_logprobs(policy, part("kl_"))
    kl_ref_sums, _ = independent_logprobs(reference, part("kl_"))
    kl = sum(p - r for p, r in zip(kl_sums, kl_ref_sums)) / len(rows)
    desirable = batch["kto_tags"].tolist()
    per_sample = [expected_kto(s - r, d, kl, 0.2, 1.5, 0.6) - (0.3 * s / c if d else 0.0)
                  for s, r, c, d in zip(sums, ref_sums, counts, desirable)]
    assert desirable == [True, True, False, False]
    assert kl > 0.5, kl
    assert loss == pytest.approx(sum(per_sample) / len(rows), abs=1e-5)
