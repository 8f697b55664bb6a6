"""`tunelab train CONFIG --dry-run` against the run itself: the dry run's peak memory and step time are within 25% of
what the same config measures when it trains (peak resident memory of the process, the median step after the
first), and its breakdown adds up as the parameter counts say it must.

    .venv/bin/python -m pytest tests/training/test_dry_run.py -q      # about 2 minutes on 2 shared CPU cores

The model is a random 26M-parameter Llama (hidden 512, 8 layers, tunelab's tiny tokenizer): float32 weights of
100 MiB, so that weights, optimizer state and activations are a good part of a process whose Python and torch
alone take about 480 MiB. Each run is a fresh process, as a user's would be; the dry run and the run of a case go
side by side, one thread each, so that other work on the machine slows both alike.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from statistics import median

import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from tunelab.config import ConfigError, load_config
from tunelab.model import build_tiny_model
from tunelab.training.dry_run import dry_run
from helpers import REPO, run_config

TOLERANCE = 0.25
MIB = 2**20
HIDDEN, LAYERS = 512, 8


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = build_tiny_model(tmp_path_factory.mktemp("llama_26m"))
    tiny = LlamaConfig.from_pretrained(folder)
    config = LlamaConfig(vocab_size=tiny.vocab_size, hidden_size=HIDDEN, intermediate_size=1536,
                         num_hidden_layers=LAYERS, num_attention_heads=8, num_key_value_heads=4,
                         max_position_embeddings=1024,
                         tie_word_embeddings=False, eos_token_id=tiny.eos_token_id, pad_token_id=tiny.pad_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(folder)
    return folder


CASES = {
    # LoRA with accumulation 2: the step is two micro-steps and one optimizer step.
    "lora_sft": {"gradient_accumulation_steps": 2},
    # Full fine-tuning: gradients and AdamW's two states are the size of the weights.
    "full_sft": {"finetuning_type": "full", "learning_rate": 1e-5},
    # dpo: pairs, the reference being the policy with its adapter off, logits chunked.
    "lora_dpo": {"stage": "dpo", "dataset": "identity_preference", "per_device_train_batch_size": 2},
}


def tunelab_train(config_file: Path, *flags: str) -> tuple[str, float]:
    """`tunelab train` in a fresh process: what it printed, and its peak resident memory in MiB."""
    # One thread: with two on a 2-core machine shared with other work, OpenMP's waiting threads make step times
    # swing threefold as other processes come and go. Its own data cache: the two runs of a case start together.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TUNELAB_CACHE": str(config_file.with_suffix(".cache"))}
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "tunelab", "train", str(config_file), *flags],
                                   stdout=stdout, stderr=stderr, text=True, env=env)
        # wait4 gives this child's own peak (RUSAGE_CHILDREN would give the largest of every child so far).
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        stdout.seek(0)
        stderr.seek(0)
        assert process.returncode == 0, stderr.read()[-3000:]
        return stdout.read(), usage.ru_maxrss / 1024


def read_report(stdout: str) -> tuple[dict[str, float], float]:
    """The dry run's memory rows in MiB by name, and its seconds per training step."""
    rows = {name: float(size.replace(",", "")) * (1024 if unit == "GiB" else 1) for name, size, unit
            in re.findall(r"^  (\w[\w ,]*?) +(-?[\d,.]+) (MiB|GiB)", stdout, flags=re.MULTILINE)}
    return rows, float(re.search(r"training step +([\d.]+) s", stdout)[1])


def step_seconds(output_dir: Path) -> list[float]:
    """Seconds of each logged step, from trainer_log.jsonl: a line's throughput is its tokens over the seconds since
    training began, so the seconds are tokens / throughput (the elapsed_time column is rounded to the second)."""
    records = [json.loads(line) for line in (output_dir / "trainer_log.jsonl").read_text().splitlines()]
    elapsed = [r["total_tokens"] / r["throughput"] for r in records if "loss" in r]
    return [later - earlier for earlier, later in zip([0.0, *elapsed], elapsed)]


def dry_run_beside_run(model_dir: Path, folder: Path, case: str) -> dict:
    """The dry run of a case and the run itself, side by side so that whatever else the machine runs slows both
    alike: the dry run's report, and the run's peak memory in MiB and step times after the first (a warm-up)."""
    for name in ("dry", "run"):
        config = run_config(model_dir, folder / name, cutoff_len=256, max_steps=4, logging_steps=1,
                            save_strategy="no", **CASES[case])
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(config))
    with ThreadPoolExecutor(2) as pool:
        dry = pool.submit(tunelab_train, folder / "dry.yaml", "--dry-run")
        run = pool.submit(tunelab_train, folder / "run.yaml")
        (report, _), (_, peak) = dry.result(), run.result()
    assert not (folder / "dry").exists(), "the dry run wrote to output_dir"
    rows, step = read_report(report)
    return {"case": case, "report": report, "rows": rows, "step": step, "peak": peak,
            "steps": step_seconds(folder / "run")[1:]}


@pytest.fixture(scope="module", params=CASES)
def runs(request, model_dir, tmp_path_factory) -> dict:
    return dry_run_beside_run(model_dir, tmp_path_factory.mktemp(request.param), request.param)


@pytest.mark.slow
def test_dry_run_peak_memory_is_the_runs(runs):
    estimated, measured = runs["rows"]["peak"], runs["peak"]
    print(f"{runs['case']}: peak {estimated:.0f} MiB estimated, {measured:.0f} MiB measured "
          f"({estimated / measured:.2f})")
    assert estimated == pytest.approx(measured, rel=TOLERANCE)


@pytest.mark.slow
def test_dry_run_step_time_is_the_runs(runs, model_dir, tmp_path):
    estimated, measured = runs["step"], median(runs["steps"])
    if estimated != pytest.approx(measured, rel=TOLERANCE):
        # Other work on a shared machine can slow one run and not the other: one more pair decides.
        again = dry_run_beside_run(model_dir, tmp_path, runs["case"])
        estimated, measured = again["step"], median(again["steps"])
    print(f"{runs['case']}: step {estimated:.3f} s estimated, {measured:.3f} s measured ({estimated / measured:.2f})")
    assert estimated == pytest.approx(measured, rel=TOLERANCE)


@pytest.mark.slow
def test_dry_run_breakdown_adds_up(runs):
    """Against what the parameter counts and shapes say: float32 weights and gradients, AdamW's two float32 states
    per trainable weight, activations of at least each decoder layer's input (all a checkpointed layer keeps)."""
    rows, report = runs["rows"], runs["report"]
    total, trainable = (int(n.replace(",", "")) for n in re.findall(r"([\d,]+) (?:total|trainable)", report))
    assert rows["weights"] == pytest.approx(4 * total / MIB, abs=0.1)
    assert rows["gradients"] == pytest.approx(4 * trainable / MIB, abs=0.1)
    assert rows["optimizer state"] == pytest.approx(2 * 4 * trainable / MIB, abs=0.2)
    batch_rows, tokens = map(int, re.search(r"longest batch \((\d+) x (\d+) tokens\)", report).groups())
    layer_inputs = LAYERS * batch_rows * tokens * HIDDEN * 4 / MIB
    checkpointed = float(re.search(r"as the run trains; on: ([\d,.]+) MiB", report)[1].replace(",", ""))
    assert layer_inputs <= checkpointed < rows["activations"] / 2
    if runs["case"] == "lora_dpo":   # its loss applies the output head a chunk of positions at a time (logprobs.py)
        assert "largest chunk of positions" in report


def test_dry_run_refuses_what_it_cannot_measure(tiny_model_dir, tmp_path):
    rewards = f"{REPO / 'examples' / 'rewards.py'}:brevity"
    with pytest.raises(ConfigError, match="mostly generation"):
        dry_run(load_config(run_config(tiny_model_dir, tmp_path, stage="grpo", reward_funcs=rewards)))
    with pytest.raises(ConfigError, match="streaming: false"):
        dry_run(load_config(run_config(tiny_model_dir, tmp_path, streaming=True)))
