"""DeepSpeed ZeRO-2, ZeRO-3 and ZeRO-3 with offload under `tunelab train`, with 2 CPU processes over gloo (the same
code runs on GPUs over NCCL): each trains what one process without DeepSpeed trains with the same global batch.

Tolerance: losses and gradient norms to 1e-5 relative, weights to 1e-5. ZeRO keeps an fp32 master copy of the
trained weights in flat partitions and reduces gradients in buckets, so sums run in another order than in one
process: float32 rounding (about 1e-7 per operation) over a few steps, far under the 1e-3 a step moves a weight here.

Each run logs the engine it really ran under, read off the wrapped model ("DeepSpeed ZeRO-3 over 2 processes: each
holds 50% of the weights"); on CPUs accelerate alone would have run plain DDP (training/engines.py).

The first DeepSpeed run on a machine compiles DeepSpeed's shared-memory communication op (g++, 1 to 3 minutes, then
cached in ~/.cache/torch_extensions).
"""

import pytest
import torch
from helpers import (REPO, assert_resumes_exactly, assert_same_training, engine_config, read_log,
                     train_with_two_processes)

import tunelab

pytest.importorskip("deepspeed", reason="the DeepSpeed tests need `pip install 'tunelab[deepspeed]'`")
pytestmark = pytest.mark.distributed


def zero(name: str) -> str:
    return str(REPO / "examples" / "deepspeed" / f"ds_{name}_config.json")


@pytest.mark.parametrize("stage, method, held, port", [
    ("z0", "lora", "100%", 29511), ("z2", "lora", "100%", 29521), ("z2", "freeze", "100%", 29513),
    ("z3", "lora", "50%", 29523), ("z3_offload", "lora", "50%", 29525), ("z3", "full", "50%", 29527)])
def test_zero_trains_what_one_process_trains(tiny_model_dir, tmp_path, stage, method, held, port):
    two, one = tmp_path / "two", tmp_path / "one"
    sharded = engine_config(tiny_model_dir, two, method, deepspeed=zero(stage))
    log = train_with_two_processes(sharded, tmp_path, port)
    assert f"DeepSpeed ZeRO-{stage[1]} over 2 processes: each holds {held} of the" in log
    tunelab.train(engine_config(tiny_model_dir, one, method, gradient_accumulation_steps=2))
    # Same names too: ZeRO-3 once resized the embeddings (it read a partition's shape, 0) and trained them as well.
    # ZeRO-0 in float32 clips the gradients without keeping their norm (DeepSpeed reports none), so none is logged.
    assert_same_training(two, one, method, logged=("loss",) if stage == "z0" else ("loss", "grad_norm"))
    if stage == "z3":
        # The partitioned optimizer state travels in the checkpoint: resuming gives the same later steps.
        assert_resumes_exactly(two, lambda: train_with_two_processes(sharded, tmp_path, port + 1))


def test_qlora_under_zero2_trains_what_one_process_trains(tiny_model_dir, tmp_path):
    """LoRA on an 8-bit base (bitsandbytes): ZeRO-2 partitions the adapter's optimizer state and leaves the frozen
    quantized weights whole on each process (ZeRO-3 with a quantized base is refused by a rule)."""
    pytest.importorskip("bitsandbytes")
    two, one = tmp_path / "two", tmp_path / "one"
    log = train_with_two_processes(engine_config(tiny_model_dir, two, "lora", deepspeed=zero("z2"),
                                                 quantization_bit=8), tmp_path, 29529)
    assert "DeepSpeed ZeRO-2 over 2 processes" in log
    tunelab.train(engine_config(tiny_model_dir, one, "lora", gradient_accumulation_steps=2, quantization_bit=8))
    assert_same_training(two, one, "lora")


def test_dpo_with_a_reference_model_under_zero3(tiny_model_dir, tmp_path):
    """A full dpo run keeps a frozen copy of the starting model as its reference; under ZeRO-3 it is sharded in an
    inference engine of its own, and the run trains what one process trains."""
    two, one = tmp_path / "two", tmp_path / "one"
    common = dict(stage="dpo", dataset="dpo_demo", pref_beta=0.1)
    train_with_two_processes(engine_config(tiny_model_dir, two, "full", deepspeed=zero("z3"), **common), tmp_path,
                             29533)
    tunelab.train(engine_config(tiny_model_dir, one, "full", gradient_accumulation_steps=2, **common))
    assert_same_training(two, one, "full")
    assert any(r.get("rewards/margins", 0) != 0 for r in read_log(two)), "the policy moved away from its reference"


def test_a_zero3_output_folder_loads_in_plain_transformers(tiny_model_dir, tmp_path):
    """`stage3_gather_16bit_weights_on_model_save`: the saved folder holds whole weights, not partitions."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "full"
    train_with_two_processes(engine_config(tiny_model_dir, out, "full", deepspeed=zero("z3"), max_steps=1,
                                           save_strategy="no"), tmp_path, 29534)
    trained = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for (name, weight), (_, before) in zip(trained.named_parameters(), base.named_parameters()):
        assert weight.shape == before.shape, name
    assert any(not torch.equal(w, b) for w, b in zip(trained.parameters(), base.parameters()))


@pytest.mark.parametrize("stage, dataset, port", [("pt", "pretrain_demo", 29535), ("rm", "dpo_demo", 29537),
                                                  ("kto", "kto_demo", 29539)])
def test_the_other_trainer_stages_under_zero3(tiny_model_dir, tmp_path, stage, dataset, port):
    """pt (the text stage), rm (its value head is created after loading, outside ZeRO-3's partitioned init) and kto
    (the policy with its adapter off as reference) train under ZeRO-3 what they train without it. kto is compared
    with plain DDP on 2 processes: its KL reference point is estimated over the batch of all processes, which one
    process with accumulation does not see. Weights to 1e-4: Adam divides by the root of tiny second moments for a
    few of the value head's and adapter's entries, which magnifies the float32 order-of-sums noise there."""
    zero3, other = tmp_path / "zero3", tmp_path / "other"
    common = dict(stage=stage, dataset=dataset)
    log = train_with_two_processes(engine_config(tiny_model_dir, zero3, "lora", deepspeed=zero("z3"), **common),
                                   tmp_path, port)
    assert "DeepSpeed ZeRO-3 over 2 processes" in log
    if stage == "kto":
        train_with_two_processes(engine_config(tiny_model_dir, other, "lora", **common), tmp_path, port + 1)
    else:
        tunelab.train(engine_config(tiny_model_dir, other, "lora", gradient_accumulation_steps=2, **common))
    assert_same_training(zero3, other, "lora", atol=1e-4)
    if stage == "rm":
        from safetensors.torch import load_file

        # The head's bias cancels in chosen minus rejected: its gradient is rounding noise, which Adam turns into
        # steps of arbitrary sign. The weight is what the loss trains.
        heads = [load_file(run / "value_head.safetensors")["v_head.summary.weight"] for run in (zero3, other)]
        torch.testing.assert_close(heads[0], heads[1], rtol=1e-4, atol=1e-4)
