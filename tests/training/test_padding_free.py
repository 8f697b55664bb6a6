"""`padding_free`: a micro-batch's samples as one row without padding, each attending only to itself.

The flattened row must give every sample the logits, loss and gradients it has alone, with `sdpa_segments` (each
sample's block through sdpa's causal kernel) as with transformers' own block-diagonal mask; and a training run must
repeat the padded run's losses and weights, step for step.
"""

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

import tunelab
from tunelab.config import ConfigError, load_config
from tunelab.data import DataCollator
from tunelab.data.collator import flatten, split_padding_free
from tunelab.data.processing import IGNORE_INDEX
from tunelab.model.segment_attention import (NAME, sample_starts, use_padding_free, use_segment_attention,
                                             wants_padding_free)
from helpers import read_log, run_config


def block_causal(starts: list[int], length: int) -> torch.Tensor:
    """The [1, 1, T, T] mask of samples starting at `starts`, each attending causally to itself."""
    grid = torch.zeros(length, length, dtype=torch.bool)
    for start, end in zip(starts, [*starts[1:], length]):
        grid[start:end, start:end] = torch.ones(end - start, end - start, dtype=torch.bool).tril()
    return grid[None, None]


def test_only_a_one_row_block_diagonal_causal_mask_is_split_into_samples():
    assert sample_starts(block_causal([0, 3, 7], 10)) == [0, 3, 7]
    assert sample_starts(block_causal([0], 6)) == [0]
    leaking = block_causal([0, 3, 7], 10)
    leaking[0, 0, 5, 1] = True  # a token of the second sample sees one of the first
    sliding = block_causal([0], 8) & ~block_causal([0], 8).tril(-3)  # each token sees the 3 before it at most
    for mask in (leaking, sliding, block_causal([0, 3], 6).expand(2, 1, 6, 6),  # two rows (a padded batch)
                 block_causal([0, 3], 6).float(), block_causal([0, 3], 6)[..., :5, :], None):
        assert sample_starts(mask) is None


def samples(lengths: list[int], prompt: int = 3) -> list[dict]:
    """Rows of random tokens; the first `prompt` labels of each are not trained."""
    generator = torch.Generator().manual_seed(0)
    rows = []
    for length in lengths:
        ids = torch.randint(5, 200, (length,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return rows


def summed_loss(model, batch: dict) -> torch.Tensor:
    """The next-token cross-entropy summed over the batch's trained tokens."""
    logits = model(**batch, use_cache=False).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                             ignore_index=IGNORE_INDEX, reduction="sum")


@pytest.mark.parametrize("segments, multiple", [(True, None), (False, None), (True, 8)],
                         ids=["sdpa_segments", "transformers-mask", "sdpa_segments-padded-to-8"])
def test_a_flattened_batch_gives_each_sample_its_own_loss_and_gradients(tiny_model_dir, segments, multiple):
    """Also with each sample padded at its end to a multiple of 8 (as bf16 on a CPU pads to 64): no token of a sample
    sees its padding, and token_mask marks the samples' own tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = samples([9, 23, 5, 16])
    alone_logits, alone_grads = [], []
    for row in rows:
        batch = DataCollator(tokenizer)([row])
        loss = summed_loss(model, batch)
        loss.backward()
        alone_logits.append(model(**batch, use_cache=False).logits[0].detach())
    alone_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()

    if segments:
        use_segment_attention(model)
        assert model.config._attn_implementation == NAME
    flat = DataCollator(tokenizer, pad_to_multiple_of=multiple, padding_free=True)(rows)
    lengths = [9, 23, 5, 16] if multiple is None else [16, 24, 8, 16]
    assert flat["input_ids"].shape == (1, sum(lengths))
    assert flat["position_ids"][0].tolist() == [position for length in lengths for position in range(length)]
    if multiple is None:
        assert set(flat) == {"input_ids", "labels", "position_ids"}
    else:
        token_mask = flat.pop("token_mask")[0].tolist()
        assert token_mask == [1] * 9 + [0] * 7 + [1] * 23 + [0] + [1] * 5 + [0] * 3 + [1] * 16
    summed_loss(model, flat).backward()
    logits = model(**flat, use_cache=False).logits[0].detach()
    start = 0
    for row, expected, length in zip(rows, alone_logits, lengths):
        torch.testing.assert_close(logits[start:start + len(row["input_ids"])], expected, atol=1e-5, rtol=1e-4)
        start += length
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, alone_grads[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("batch, accumulation", [(4, 2), (1, 8)])
def test_padding_free_training_repeats_the_padded_run(tiny_model_dir, tmp_path, batch, accumulation):
    """A padding-free step's 8 samples come as one row, run in passes of at most batch x the longest sample's tokens
    (at 4 x 2, about 2 passes of 4 samples; at 1 x 8, passes of one to a few), as the defaults do: the padded run's
    losses, gradient norms, weights and token counts."""
    runs = {}
    for name, more in (("padded", {"padding_free": False}), ("padding_free", {})):   # padding-free by default
        out = tmp_path / name
        tunelab.train(run_config(tiny_model_dir, out, max_steps=6, logging_steps=1, save_steps=6, cutoff_len=64,
                                 per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                                 **more))
        runs[name] = (read_log(out), load_file(out / "adapter_model.safetensors"), out)
        tokens = json.loads((out / "trainer_state.json").read_text())["num_input_tokens_seen"]
        assert tokens == runs.setdefault("tokens", tokens), "the same tokens are counted, padding left out"
    (padded, padded_weights, _), (flat, flat_weights, out) = runs["padded"], runs["padding_free"]
    steps = [record for record in padded if "loss" in record]
    assert len(steps) == 6 and steps[-1]["loss"] < steps[0]["loss"]
    for one, other in zip(steps, [record for record in flat if "loss" in record]):
        assert one["loss"] == pytest.approx(other["loss"], rel=1e-5)
        assert one["grad_norm"] == pytest.approx(other["grad_norm"], rel=1e-4)
    for name, weight in padded_weights.items():
        torch.testing.assert_close(flat_weights[name], weight, atol=1e-5, rtol=1e-4)
    # The attention implementation is the run's own: the saved model loads with transformers' default.
    assert NAME not in (out / "adapter_config.json").read_text()
    assert NAME not in json.dumps(json.loads((out / "checkpoint-6" / "adapter_config.json").read_text()))


def test_padding_free_in_bf16_on_a_cpu_pads_each_sample_and_counts_only_its_tokens(tiny_model_dir, tmp_path):
    """bf16 on a CPU pads each sample of a padding-free row to a multiple of 64: the run counts the tokens the
    padded run counts, and its losses are the padded run's to bf16's rounding."""
    runs = {}
    for name, more in (("padded", {"padding_free": False}), ("padding_free", {})):   # padding-free by default
        out = tmp_path / name
        tunelab.train(run_config(tiny_model_dir, out, max_steps=3, logging_steps=1, save_steps=6, bf16=True,
                                 per_device_train_batch_size=4, gradient_accumulation_steps=2, **more))
        state = json.loads((out / "trainer_state.json").read_text())
        runs[name] = ([record["loss"] for record in read_log(out) if "loss" in record], state["num_input_tokens_seen"])
    assert runs["padding_free"][1] == runs["padded"][1]
    assert runs["padding_free"][0] == pytest.approx(runs["padded"][0], rel=1e-2)


def test_a_padding_free_row_splits_into_passes_of_whole_samples():
    row = {name: torch.tensor([values]) for name, values in flatten(samples([5, 3, 4, 6, 3])).items()}
    pieces = split_padding_free(row, 8)
    # Four passes at most 8 long is the fewest (4 + 6 and 6 + 3 do not fit); filled in order they would be 8, 4, 6, 3,
    # but 5, 3 + 4, 6, 3 is as few and its largest is smaller.
    assert [piece["input_ids"].shape[1] for piece in pieces] == [5, 7, 6, 3]
    for name in row:
        assert torch.equal(torch.cat([piece[name] for piece in pieces], dim=1), row[name]), name
    assert all(piece["position_ids"][0, 0] == 0 for piece in pieces), "each piece starts a sample"
    # A sample longer than a pass goes alone.
    assert [piece["input_ids"].shape[1] for piece in split_padding_free(row, 4)] == [5, 3, 4, 6, 3]
    # Two passes of at most 10: 6 + 8, not 9 + 5.
    row = {name: torch.tensor([values]) for name, values in flatten(samples([3, 3, 3, 3, 2])).items()}
    assert [piece["input_ids"].shape[1] for piece in split_padding_free(row, 10)] == [6, 8]
    assert [piece["input_ids"].shape[1] for piece in split_padding_free(row, 14)] == [14]


def test_padding_free_switches_sdpa_to_segment_attention(tiny_model_dir, tmp_path):
    from tunelab.model import load_model, load_tokenizer

    for keys, used, attention in (({}, True, NAME), ({"padding_free": False}, False, "sdpa"),
                                  ({"padding_free": True}, True, NAME),
                                  ({"padding_free": True, "flash_attn": "eager"}, True, "eager"),
                                  ({"flash_attn": "eager"}, False, "eager")):  # unset: eager would score whole rows
        config = load_config(run_config(tiny_model_dir, tmp_path, **keys))
        model = load_model(config, load_tokenizer(config), trainable=True)
        assert use_padding_free(config, model) is used, keys
        assert model.config._attn_implementation == attention, keys


def test_padding_free_left_unset_is_on_for_sft_on_text_only(tiny_model_dir, tiny_qwen2_vl_dir, tmp_path):
    # A row of 16 x 1024 tokens: sdpa's [T, T] mask of it is 256 MiB, the most the default allows.
    for keys in ({}, {"per_device_train_batch_size": 16, "cutoff_len": 1024}):
        assert wants_padding_free(load_config(run_config(tiny_model_dir, tmp_path, **keys))), keys
    for keys in ({"stage": "pt", "dataset": "pretrain_demo"}, {"stage": "rm", "dataset": "dpo_demo"},
                 {"stage": "dpo", "dataset": "dpo_demo"}, {"packing": True}, {"neat_packing": True},
                 {"neftune_noise_alpha": 5}, {"per_device_train_batch_size": 32, "cutoff_len": 1024},
                 {"val_size": 0.2, "per_device_eval_batch_size": 256},  # an evaluation row would be 32k tokens
                 {"model_name_or_path": str(tiny_qwen2_vl_dir), "template": "qwen2_vl"}):
        assert not wants_padding_free(load_config(run_config(tiny_model_dir, tmp_path, **keys))), keys


def test_padding_free_left_unset_is_off_on_a_gpu_unless_flash_attention_splits_the_row(tiny_model_dir, tmp_path,
                                                                                       monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert not wants_padding_free(load_config(run_config(tiny_model_dir, tmp_path)))
    for keys in ({"flash_attn": "fa2"}, {"flash_attn": "fa3"}, {"use_cpu": True}, {"padding_free": True}):
        assert wants_padding_free(load_config(run_config(tiny_model_dir, tmp_path, **keys))), keys


def test_padding_free_is_refused_where_whole_samples_are_scored(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="`padding_free` applies to"):
        load_config(run_config(tiny_model_dir, tmp_path, stage="rm", padding_free=True))


def test_padding_free_is_refused_for_a_model_class_from_remote_code(tiny_model_dir, tmp_path):
    """Remote code may build its attention mask without reading the position ids: its samples would see each other."""
    import shutil

    folder = shutil.copytree(tiny_model_dir, tmp_path / "remote")
    (folder / "modeling_remote.py").write_text("from transformers import LlamaForCausalLM\n\n\n"
                                               "class RemoteLlama(LlamaForCausalLM):\n    pass\n")
    model_config = json.loads((folder / "config.json").read_text())
    model_config["auto_map"] = {"AutoModelForCausalLM": "modeling_remote.RemoteLlama"}
    (folder / "config.json").write_text(json.dumps(model_config))
    from tunelab.model import load_model, load_tokenizer

    config = load_config(run_config(folder, tmp_path / "out", trust_remote_code=True))
    model = load_model(config, load_tokenizer(config), trainable=True)
    with pytest.raises(ConfigError, match="`padding_free` needs a model class of transformers.*RemoteLlama comes "
                                          "from the model's own code"):
        use_padding_free(replace(config, padding_free=True), model)
    # Left unset, it stays off: config.json announces the remote class before anything loads, so the step keeps
    # its padded micro-batches; and were the class not announced there, the loaded model would still turn it off.
    assert not wants_padding_free(config)
    assert not use_padding_free(replace(config, trust_remote_code=False), model)
