"""The SFT loss variants (DFT, EAFT, ASFT) and the router loss of mixture-of-experts models, trained for real on tiny
random models.

Every loss the Trainer logs is recomputed here from the model's logits with plain per-token loops (`direct_losses`),
sample by sample and without padding, so neither the shift, the masking nor the reduction is taken on trust.
"""

import logging
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralConfig, MixtralForCausalLM

import tunelab
from tunelab.config.load import load_config
from tunelab.data import load_datasets, prepare_template
from tunelab.model import load_tokenizer
from tunelab.training.chunked_loss import token_losses
from tunelab.training.moe import enable_router_loss, router_loss_coef
from tunelab.training.sft_losses import dft_weights, eaft_weights, trained_positions
from helpers import assert_two_processes_train_as_accumulation, losses, read_log, run_config

#: Four identity samples, trained as one batch of 4 per step and also used as the evaluation set, so the first
#: logged loss and the final eval_loss are each one forward over exactly these samples.
SAMPLES = dict(max_samples=4, per_device_train_batch_size=4, per_device_eval_batch_size=4, logging_steps=1,
               save_steps=100)
EAFT_ALPHA = 0.5
# Small enough that the anchor lets the tiny model learn its samples within a few steps.
ASFT_ALPHA = 0.05
VARIANTS = {"dft": {"use_dft_loss": True}, "eaft": {"use_eaft_loss": True, "eaft_alpha": EAFT_ALPHA},
            "asft": {"use_asft_loss": True, "asft_alpha": ASFT_ALPHA}}


def tokenized_samples(config: dict) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of the training rows, as the data layer builds them for the Trainer."""
    cfg = load_config({**config, "do_train": True})
    tokenizer = load_tokenizer(cfg)
    rows = load_datasets(cfg, tokenizer, prepare_template(cfg, tokenizer)).train
    return [(row["input_ids"], row["labels"]) for row in rows]


@torch.no_grad()
def direct_losses(model, samples, reference=None) -> dict[str, float]:
    """Each variant written out token by token: the logits at t score the label at t + 1 where it is not -100."""
    terms = {"ce": [], "dft": [], "eaft": [], "kl": []}
    for input_ids, labels in samples:
        logits = model(torch.tensor([input_ids])).logits[0].double()
        ref_logits = reference(torch.tensor([input_ids])).logits[0].double() if reference is not None else None
        for t in range(len(input_ids) - 1):
            target = labels[t + 1]
            if target == -100:
                continue
            log_p = torch.log_softmax(logits[t], dim=-1)
            ce = -log_p[target]
            top20 = torch.softmax(torch.sort(logits[t], descending=True).values[:20], dim=-1)
            entropy = -(top20 * top20.log()).sum()
            terms["ce"].append(ce)
            terms["dft"].append(ce * torch.exp(-ce))
            terms["eaft"].append(ce * (entropy / 3.0) ** EAFT_ALPHA)
            if ref_logits is not None:
                log_q = torch.log_softmax(ref_logits[t], dim=-1)
                terms["kl"].append((log_q.exp() * (log_q - log_p)).sum())
    means = {name: float(sum(values) / len(values)) for name, values in terms.items() if values}
    if reference is not None:
        means["asft"] = means["dft"] + ASFT_ALPHA * means["kl"]
    return means


def load_lora(model_dir, adapter_dir):
    from peft import PeftModel

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter_dir).eval()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_variant_is_its_formula_in_training_and_evaluation(variant, tiny_model_dir, tmp_path):
    """The first logged loss is the variant on the untrained model; after training, eval_loss is the variant on the
    trained model (the same four samples); and the model learned the samples."""
    out = tmp_path / "run"
    config = run_config(tiny_model_dir, out, max_steps=16, do_eval=True, eval_dataset="identity", **SAMPLES,
                        **VARIANTS[variant])
    metrics = tunelab.train(config)
    samples = tokenized_samples(config)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    before = direct_losses(base, samples, reference=base)
    after = direct_losses(load_lora(tiny_model_dir, out), samples, reference=base)

    logged = losses(out)
    # A fresh LoRA adapter leaves the model unchanged, so step 1 scores the untrained model.
    assert logged[0] == pytest.approx(before[variant], rel=1e-4)
    assert metrics["eval_loss"] == pytest.approx(after[variant], rel=1e-4)
    # Two-sided: the samples' cross-entropy fell clearly, from a sane start (a random model: about log(vocab)).
    assert 5.0 < before["ce"] < 8.0 and after["ce"] < 0.85 * before["ce"], (before, after)
    assert all(math.isfinite(value) for value in logged)
    if variant == "eaft":
        # EAFT's value falls with the loss and the entropy.
        assert sum(logged[-3:]) / 3 < 0.7 * logged[0], logged
    else:
        # DFT's per-token value p x (-log p) is at most 1/e and rises while p < 1/e, as on a random model: the
        # gradient is that of -p, and it is p that rises. ASFT adds the KL to the untrained model, which grows.
        assert logged[0] < 0.05 and logged[-1] > 2 * logged[0], logged
        bound = 1 / math.e + (ASFT_ALPHA * after["kl"] * 2 if variant == "asft" else 0.0)
        assert all(value < bound for value in logged), logged


def test_token_weights_scale_the_gradient_without_being_trained():
    """The weights are constants: d(loss)/d(logits) at a trained position is weight x (softmax - one_hot) / N. A
    weight left in the graph would add its own gradient (for DFT: the gradient of -p log p instead of -p)."""
    torch.manual_seed(0)
    logits = (3 * torch.randn(2, 5, 30, dtype=torch.float64)).requires_grad_()
    labels = torch.tensor([[-100, 4, 7, -100, 2], [-100, -100, 1, 9, 3]])
    for name, weigh in {"dft": dft_weights, "eaft": eaft_weights(EAFT_ALPHA)}.items():
        token_logits, targets = trained_positions(logits, labels)
        loss = token_losses(token_logits, targets, weigh)[0].mean()
        (grad,) = torch.autograd.grad(loss, logits)
        expected = torch.zeros_like(logits)
        trained = [(b, t) for b in range(2) for t in range(4) if labels[b, t + 1] != -100]
        for b, t in trained:
            p = torch.softmax(logits[b, t].detach(), dim=-1)
            ce = -torch.log(p[labels[b, t + 1]])
            top20 = torch.softmax(torch.sort(logits[b, t].detach(), descending=True).values[:20], dim=-1)
            weight = torch.exp(-ce) if name == "dft" else (-(top20 * top20.log()).sum() / 3.0) ** EAFT_ALPHA
            expected[b, t] = weight * (p - torch.nn.functional.one_hot(labels[b, t + 1], 30)) / len(trained)
        torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("variant", ["ce", "dft", "eaft", "asft"])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_head_loss_equals_whole_logits(variant, bias, monkeypatch):
    """The chunked head (gradients written out by hand, 3 positions per chunk) gives the loss, KL and gradients of
    autograd through whole logits, for the hidden states, the head's weight and bias."""
    from tunelab.training import chunked_loss

    monkeypatch.setattr(chunked_loss, "CHUNK_ELEMENTS", 3 * 50)
    weigh = {"ce": None, "dft": dft_weights, "eaft": eaft_weights(EAFT_ALPHA), "asft": dft_weights}[variant]
    alpha = ASFT_ALPHA if variant == "asft" else 0.0
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=bias)
    reference_head = torch.nn.Linear(16, 50, bias=bias).requires_grad_(False)
    hidden = torch.randn(11, 16, requires_grad=True)
    reference_hidden = torch.randn(11, 16)
    targets = torch.randint(0, 50, (11,))
    reference = (reference_hidden, reference_head) if variant == "asft" else None

    total, kl = chunked_loss.head_cross_entropy(hidden, head, targets, weigh, reference, alpha)
    chunked_grads = torch.autograd.grad(2.5 * total, [hidden, *head.parameters()])
    losses, kls = token_losses(head(hidden), targets, weigh, reference_head(reference_hidden) if reference else None,
                               alpha)
    whole_grads = torch.autograd.grad(2.5 * losses.sum(), [hidden, *head.parameters()])
    torch.testing.assert_close(total, losses.sum())
    torch.testing.assert_close(kl, kls.sum())
    assert (kl > 0) == (variant == "asft")
    for chunked, whole in zip(chunked_grads, whole_grads):
        torch.testing.assert_close(chunked, whole)
    with torch.no_grad():   # evaluation: the same value
        torch.testing.assert_close(chunked_loss.head_cross_entropy(hidden, head, targets, weigh, reference, alpha)[0],
                                   losses.sum())


def test_dft_with_gradient_accumulation_trains_as_the_bigger_batch(tiny_model_dir, tmp_path):
    """2 x 2 accumulated = 4 x 1: DFT divides by the trained tokens of the whole step, not of each micro-batch."""
    common = dict(use_dft_loss=True, finetuning_type="full", learning_rate=3e-3, max_steps=3, logging_steps=1,
                  save_steps=100, max_samples=12)
    big, accumulated = tmp_path / "big", tmp_path / "accumulated"
    tunelab.train(run_config(tiny_model_dir, big, per_device_train_batch_size=4, **common))
    tunelab.train(run_config(tiny_model_dir, accumulated, per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, **common))
    assert losses(big) == pytest.approx(losses(accumulated), rel=1e-4)
    assert len(set(losses(big))) == 3, "the steps must differ, or the comparison shows nothing"


@pytest.mark.parametrize("method", ["lora", "full"])
def test_asft_kl_starts_at_zero_and_grows(method, tiny_model_dir, tmp_path):
    """The reference is the model before training (the adapter switched off for LoRA, a frozen copy for full), so the
    policy equals it at step 1 and drifts away as it trains."""
    out = tmp_path / "run"
    extra = {"learning_rate": 3e-3} if method == "full" else {}
    tunelab.train(run_config(tiny_model_dir, out, finetuning_type=method, max_steps=8, use_asft_loss=True,
                             **{**SAMPLES, **extra}))
    kl = [record["kl"] for record in read_log(out) if "kl" in record]
    assert len(kl) == 8
    assert kl[0] == pytest.approx(0.0, abs=1e-6)
    assert kl[-1] > 0.01 and kl[-1] > 100 * abs(kl[0]), kl


@pytest.fixture(scope="module")
def tiny_moe_dir(tiny_model_dir, tmp_path_factory):
    """A tiny random Mixtral (2 layers, 4 experts, 2 per token) with the tiny llama's tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = MixtralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=1024, tie_word_embeddings=False, bos_token_id=None,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                           initializer_range=0.1)
    folder = tmp_path_factory.mktemp("tiny_mixtral")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        MixtralForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("variant", ["plain", "dft"])
def test_router_loss_is_added_with_its_coefficient_and_logged(variant, tiny_moe_dir, tmp_path):
    """Same batch, same weights at step 1: the run with coefficient 0.5 logs 0.5 x aux_loss more than the run with
    0, whether the loss is the model's own or a variant."""
    common = dict(finetuning_type="full", learning_rate=3e-3, **SAMPLES,
                  **({"use_dft_loss": True} if variant == "dft" else {}))
    weighted, unweighted = tmp_path / "weighted", tmp_path / "unweighted"
    tunelab.train(run_config(tiny_moe_dir, weighted, moe_aux_loss_coef=0.5, max_steps=12, **common))
    tunelab.train(run_config(tiny_moe_dir, unweighted, moe_aux_loss_coef=0.0, max_steps=1, **common))
    first, first_unweighted = read_log(weighted)[0], read_log(unweighted)[0]
    # Switch Transformer's balance loss with top-2 of 4 experts: 2 when perfectly balanced, up to 4.
    assert 1.5 < first["aux_loss"] < 4.5
    assert first["aux_loss"] == pytest.approx(first_unweighted["aux_loss"], rel=1e-5)
    assert first["loss"] - first_unweighted["loss"] == pytest.approx(0.5 * first["aux_loss"], rel=1e-4)
    records = [record for record in read_log(weighted) if "loss" in record]
    assert all("aux_loss" in record for record in records)
    if variant == "plain":
        values = [record["loss"] for record in records]
        assert 5.0 < values[0] < 10.0 and sum(values[-3:]) / 3 < 0.8 * values[0], values


def test_router_loss_on_a_peft_wrapped_moe_and_a_warning_for_a_dense_model(tiny_moe_dir, tiny_model_dir, caplog,
                                                                          monkeypatch):
    from peft import LoraConfig, get_peft_model

    ids = torch.tensor([[5, 60, 70, 80, 90, 100]])
    moe = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_moe_dir),
                         LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"]))
    assert router_loss_coef(moe) == 0.0, "router logits are off in the saved config"
    with torch.no_grad():
        plain = moe(input_ids=ids, labels=ids).loss
        assert enable_router_loss(moe, 0.25) and router_loss_coef(moe) == 0.25
        out = moe(input_ids=ids, labels=ids)
    assert float(out.loss) == pytest.approx(float(plain + 0.25 * out.aux_loss), rel=1e-5)

    dense = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    # tunelab's logger stops at its own handler once a run has set it up; caplog listens at the root.
    monkeypatch.setattr(logging.getLogger("tunelab"), "propagate", True)
    with caplog.at_level(logging.WARNING, logger="tunelab"):
        assert not enable_router_loss(dense, 0.25)
    assert "`moe_aux_loss_coef` is ignored" in caplog.text and "llama" in caplog.text
    assert router_loss_coef(dense) == 0.0


@pytest.mark.distributed
@pytest.mark.parametrize(("variant", "port"), [("dft", 29651), ("asft", 29652)])
def test_loss_variants_train_alike_with_two_processes(variant, port, tiny_model_dir, tmp_path):
    """Each token's weight is divided by the tokens of the whole step, across processes: two processes of batch 2
    train as one process accumulating two batches of 2 (ASFT's reference is the LoRA policy with its adapter off)."""
    records = assert_two_processes_train_as_accumulation(
        lambda out, **more: run_config(tiny_model_dir, out, **VARIANTS[variant], max_steps=6,
                                       per_device_train_batch_size=2, learning_rate=5e-3, **more),
        tmp_path, port, keys=("loss",), weights=("adapter_model.safetensors",))
    assert len(records) == 3


@pytest.mark.parametrize("variant", ["ce", "eaft"])
def test_chunked_head_loss_under_bf16_autocast_equals_whole_logits(variant, monkeypatch):
    """Under bfloat16 autocast (`bf16: true`) the chunked head computes its matmuls in bfloat16 as F.linear would,
    with the last chunk padded to a whole one on the CPU (11 positions, 3 per chunk): the loss and gradients of
    autograd through whole logits under the same autocast, to bfloat16's rounding of the gradients."""
    from tunelab.training import chunked_loss

    monkeypatch.setattr(chunked_loss, "CHUNK_ELEMENTS", 3 * 50)
    weigh = eaft_weights(EAFT_ALPHA) if variant == "eaft" else None
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(11, 16, requires_grad=True)
    targets = torch.randint(0, 50, (11,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, _ = chunked_loss.head_cross_entropy(hidden, head, targets, weigh)
        chunked_grads = torch.autograd.grad(total, [hidden, head.weight])
        losses, _ = token_losses(head(hidden), targets, weigh)
        whole_grads = torch.autograd.grad(losses.sum(), [hidden, head.weight])
    torch.testing.assert_close(total, losses.sum(), rtol=1e-5, atol=1e-5)
    for chunked, whole in zip(chunked_grads, whole_grads):
        assert chunked.dtype == whole.dtype == torch.float32
        torch.testing.assert_close(chunked, whole, rtol=1e-2, atol=1e-2 * float(whole.abs().max()))
