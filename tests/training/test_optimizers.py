"""The optimizer methods (GaLore, APOLLO, LoRA+, BAdam, Adam-mini, Muon) train the tiny model, and each really is in
use: the checks read what a run leaves behind (the weights, and the optimizer state in its checkpoints), never the
code's own bookkeeping. Under two processes each method trains as one process with accumulation does, or the config
refuses it.

    .venv/bin/python -m pytest -q tests/training/test_optimizers.py -m "not distributed"
"""

import logging
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

import tunelab
from tunelab.config import ConfigError, load_config
from tunelab.training.arguments import ALL_LINEAR_BUT_HEADS, build_training_arguments
from helpers import assert_two_processes_train_as_accumulation, losses, read_log, run_config

N_LAYERS, HEADS, KV_HEADS, RANK = 2, 4, 2, 16
#: The tiny llama's linear layers inside each decoder layer.
LAYER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def assert_learned(values: list[float]) -> None:
    """Two-sided: the first loss is sane for a random model and the last ones are clearly lower, but finite."""
    assert 2.0 < values[0] < 12.0, values
    assert sum(values[-3:]) / 3 < 0.8 * values[0], values
    assert all(math.isfinite(v) for v in values), values


def optimizer_state(checkpoint) -> dict:
    # GaLore keeps its projector objects in the state, so this is a pickle, not plain tensors (our own file).
    return torch.load(checkpoint / "optimizer.pt", weights_only=False)


def full(model_dir, out, **overrides) -> dict:
    """Full fine-tuning for 12 steps with one checkpoint at the end, unless `overrides` say otherwise."""
    return run_config(model_dir, out, **{"finetuning_type": "full", "max_steps": 12, "save_steps": 12, **overrides})


def moved(before: dict, after: dict) -> set[str]:
    return {name for name in before if not torch.equal(before[name], after[name])}


@pytest.mark.parametrize("method", ["galore", "apollo"])
def test_galore_and_apollo_project_every_linear_layer_but_the_head(tiny_model_dir, tmp_path, method):
    out = tmp_path / "run"
    tunelab.train(full(tiny_model_dir, out, learning_rate=2e-3, weight_decay=0.01,
                       **{f"use_{method}": True, f"{method}_rank": RANK}))
    assert_learned(losses(out))
    state = optimizer_state(out / "checkpoint-12")
    projected = [g for g in state["param_groups"] if g.get("rank") == RANK]
    # `all`: the 7 linear layers of each decoder layer, not lm_head (nor the embeddings and norms).
    assert sum(len(g["params"]) for g in projected) == N_LAYERS * len(LAYER_LINEARS)
    for group in state["param_groups"]:
        for index in group["params"]:
            has_projector = "projector" in state["state"][index]
            assert has_projector == (group in projected), index
            if has_projector:
                # The moments live in the rank-16 space of the projection, not in the 64 x 64 (or 128) weight's.
                assert RANK in state["state"][index]["exp_avg"].shape
    # Weight decay, which transformers' integration leaves out: on the matrices, not on the norms.
    assert {g["weight_decay"] for g in projected} == {0.01}
    assert 0.0 in {g["weight_decay"] for g in state["param_groups"]}


def test_a_galore_target_that_names_no_linear_layer_is_refused(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="`galore_target`: No target modules found"):
        tunelab.train(full(tiny_model_dir, tmp_path / "run", use_galore=True, galore_target="no_such_proj"))


def test_layerwise_galore_steps_during_backward(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    tunelab.train(full(tiny_model_dir, out, learning_rate=3e-3, use_galore=True, galore_layerwise=True))
    assert_learned(losses(out))
    # The Trainer only holds transformers' placeholder (one dummy tensor); the real optimizers step from the hooks.
    state = optimizer_state(out / "checkpoint-12")
    assert [len(g["params"]) for g in state["param_groups"]] == [1] and not state["state"]
    assert moved(load_file(tiny_model_dir / "model.safetensors"), load_file(out / "model.safetensors"))


def test_loraplus_trains_the_b_matrices_faster(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    tunelab.train(run_config(tiny_model_dir, out, learning_rate=2e-3, loraplus_lr_ratio=16, lora_target="all",
                             max_steps=24, save_steps=24))
    assert_learned(losses(out))
    state = optimizer_state(out / "checkpoint-24")
    lora_rank = 8
    by_lr: dict[float, list[torch.Size]] = {}
    for group in state["param_groups"]:
        shapes = [state["state"][i]["exp_avg"].shape for i in group["params"]]
        by_lr.setdefault(round(group["lr"], 9), []).extend(shapes)
    a_shapes, b_shapes = by_lr[2e-3], by_lr[32e-3]
    # A matrices are rank x in, B matrices out x rank: 14 of each, one per targeted linear layer.
    assert len(a_shapes) == len(b_shapes) == N_LAYERS * len(LAYER_LINEARS)
    assert all(shape[0] == lora_rank for shape in a_shapes) and all(shape[1] == lora_rank for shape in b_shapes)


def test_badam_layer_mode_trains_one_decoder_layer_at_a_time(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    tunelab.train(full(tiny_model_dir, out, learning_rate=5e-3, max_steps=24, use_badam=True, badam_start_block=1,
                       badam_switch_mode="ascending", badam_switch_interval=6, save_steps=2))
    assert_learned(losses(out))
    start = load_file(tiny_model_dir / "model.safetensors")
    # After 2 steps only block 1 has moved; everything else is bit-identical.
    early = moved(start, load_file(out / "checkpoint-2" / "model.safetensors"))
    assert early == {name for name in start if name.startswith("model.layers.1.")}
    # By the end block 0 had its turn; the embeddings, the final norm and the head never train.
    assert moved(start, load_file(out / "model.safetensors")) == {name for name in start if ".layers." in name}
    # The config's weight decay (0 here) rules the active block's groups, not AdamW's default of 0.01.
    assert {g["weight_decay"] for g in optimizer_state(out / "checkpoint-24")["param_groups"]} == {0.0}


def test_badam_ratio_mode_updates_a_share_of_every_matrix(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    tunelab.train(full(tiny_model_dir, out, learning_rate=2e-2, use_badam=True, badam_mode="ratio",
                       badam_update_ratio=0.5, max_steps=24, save_steps=24))
    assert_learned(losses(out))
    start, end = load_file(tiny_model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    for name in start:
        share = (start[name] != end[name]).float().mean().item()
        if "embed_tokens" in name or "lm_head" in name:
            assert share == 0, name
        else:
            # The same mask all run long (it switches every 50 steps): half the entries, the rest untouched.
            assert 0.45 < share <= 0.5, (name, share)


def test_adam_mini_keeps_one_second_moment_per_block(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    tunelab.train(full(tiny_model_dir, out, learning_rate=2e-3, use_adam_mini=True))
    assert_learned(losses(out))
    state = optimizer_state(out / "checkpoint-12")["state"]
    second_moments = sum(s["vmean"].numel() if "vmean" in s else s["v"].numel() for s in state.values())
    weights = sum(t.numel() for t in load_file(out / "model.safetensors").values())
    assert second_moments < 0.02 * weights, (second_moments, weights)
    # One per head in the query and key matrices (the tiny llama has 4 query heads and 2 key/value heads).
    head_blocks = sorted(s["vmean"].shape[0] for s in state.values() if "head_per_gpu" in s)
    assert head_blocks == [KV_HEADS] * N_LAYERS + [HEADS] * N_LAYERS


def test_muon_orthogonalises_the_hidden_matrices_and_adamw_the_rest(tiny_model_dir, tmp_path):
    lr = 3e-3
    out = tmp_path / "run"
    tunelab.train(full(tiny_model_dir, out, learning_rate=lr, use_muon=True))
    assert_learned(losses(out))
    state = optimizer_state(out / "checkpoint-12")
    assert state.keys() == {"muon", "adamw"}
    assert sum(len(g["params"]) for g in state["muon"]["param_groups"]) == N_LAYERS * len(LAYER_LINEARS)

    one = tmp_path / "one_step"
    tunelab.train(full(tiny_model_dir, one, learning_rate=lr, use_muon=True, max_steps=1))
    start, step = load_file(tiny_model_dir / "model.safetensors"), load_file(one / "model.safetensors")
    for name in start:
        update = (step[name] - start[name]).double()
        if ".mlp." in name:
            # Muon's update is the momentum orthogonalised by Newton-Schulz (singular values within about 0.5-1.5,
            # as torch documents), scaled by 0.2 x lr x sqrt(max dimension) (match_rms_adamw). An AdamW first
            # step (lr x sign(grad)) has singular values spread over more than 10x.
            singular = torch.linalg.svdvals(update) / (0.2 * lr * math.sqrt(max(update.shape)))
            assert 0.5 < singular.min() and singular.max() < 1.5, (name, singular.min(), singular.max())
        elif name in ("model.embed_tokens.weight", "lm_head.weight"):
            # AdamW's first step moves each weight with a gradient by the learning rate exactly.
            assert update.abs().max().item() == pytest.approx(lr, rel=1e-3), name


@pytest.mark.parametrize("method", ["use_muon", "use_galore", "use_apollo", "use_adam_mini"])
def test_a_run_resumes_exactly_from_a_checkpoint(tiny_model_dir, tmp_path, method):
    """The optimizer's whole state travels in the checkpoint (Muon's two parts, GaLore's and APOLLO's projectors)."""
    out = tmp_path / "run"
    config = full(tiny_model_dir, out, learning_rate=3e-3, max_steps=6, save_steps=3, logging_steps=1, **{method: True})
    tunelab.train(config)
    uninterrupted = losses(out)
    for path in out.iterdir():
        if path.name not in ("checkpoint-3", "trainer_log.jsonl"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    tunelab.train(config)
    resumed = {r["current_steps"]: r["loss"] for r in read_log(out) if "loss" in r}
    assert [resumed[step] for step in (4, 5, 6)] == pytest.approx(uninterrupted[3:], rel=1e-5)


def test_low_rank_optimizers_are_transformers_arguments(tiny_model_dir, tmp_path):
    def arguments(**keys):
        return build_training_arguments(load_config(full(tiny_model_dir, tmp_path / "run", **keys)))

    galore = arguments(use_galore=True, galore_rank=8, galore_proj_type="left")
    assert galore.optim == "galore_adamw" and galore.optim_target_modules == ALL_LINEAR_BUT_HEADS
    assert galore.optim_args == "rank=8,update_proj_gap=200,scale=2.0,proj_type=left"
    apollo = arguments(use_apollo=True, apollo_layerwise=True, apollo_target="q_proj,v_proj")
    assert apollo.optim == "apollo_adamw_layerwise" and apollo.optim_target_modules == ["q_proj", "v_proj"]
    assert apollo.optim_args == "rank=16,proj=random,scale_type=channel,update_proj_gap=200,scale=32.0,proj_type=std"
    import re

    for name in ("model.layers.0.self_attn.q_proj", "model.layers.11.mlp.down_proj", "transformer.h.0.attn.c_attn"):
        assert re.fullmatch(ALL_LINEAR_BUT_HEADS, name), name
    for name in ("lm_head", "pretrained_model.lm_head", "v_head", "transformer.output_layer", "score"):
        assert not re.fullmatch(ALL_LINEAR_BUT_HEADS, name), name


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens without a GPU")
def test_gpu_only_keys_warn_and_train_without_them(tiny_model_dir, tmp_path, caplog, monkeypatch):
    # tunelab's logger stops at its own handler once a run has set it up; let pytest see the records too.
    monkeypatch.setattr(logging.getLogger("tunelab"), "propagate", True)
    with caplog.at_level(logging.WARNING, logger="tunelab.training.arguments"):
        args = build_training_arguments(load_config(run_config(
            tiny_model_dir, tmp_path / "run", enable_liger_kernel=True, use_unsloth=True, use_unsloth_gc=True,
            fp8=True)))
    assert not args.use_liger_kernel
    for text in ("`enable_liger_kernel` needs a CUDA GPU", "`use_unsloth`: tunelab does not integrate",
                 "`use_unsloth_gc`: tunelab does not integrate", "`fp8`: tunelab does not integrate FP8 training; "
                 "training in fp32"):
        assert text in caplog.text, text


@pytest.mark.parametrize("keys", [{"use_badam": True}, {"use_galore": True, "galore_layerwise": True},
                                  {"use_apollo": True, "apollo_layerwise": True}])
def test_single_process_methods_are_refused_under_two_processes(tiny_model_dir, tmp_path, monkeypatch, keys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="train with one process only"):
        load_config(full(tiny_model_dir, tmp_path / "run", **keys))


@pytest.mark.distributed
@pytest.mark.parametrize("keys, port", [
    pytest.param({"finetuning_type": "full", "use_galore": True, "learning_rate": 2e-3}, 29611, id="galore"),
    pytest.param({"finetuning_type": "full", "use_apollo": True, "learning_rate": 2e-3}, 29612, id="apollo"),
    pytest.param({"loraplus_lr_ratio": 16, "learning_rate": 1e-3}, 29613, id="loraplus"),
    pytest.param({"finetuning_type": "full", "use_adam_mini": True, "learning_rate": 2e-3}, 29614, id="adam_mini"),
    pytest.param({"finetuning_type": "full", "use_muon": True, "learning_rate": 3e-3}, 29615, id="muon"),
])
def test_two_processes_train_as_one_with_accumulation(tiny_model_dir, tmp_path, keys, port):
    weights = "adapter_model.safetensors" if "loraplus_lr_ratio" in keys else "model.safetensors"
    records = assert_two_processes_train_as_accumulation(
        lambda out, **more: run_config(tiny_model_dir, out, max_steps=4, per_device_train_batch_size=2,
                                       save_steps=100, **keys, **more),
        # torch's Muon orthogonalises the momentum in bfloat16: a rounding difference in its input can move an
        # entry's update by a share of the step that float32 sums never reach.
        tmp_path, port, keys=("loss",), weights=(weights,), steps_apart=0.5 if "use_muon" in keys else 0.1)
    assert records[-1]["loss"] < records[0]["loss"]
