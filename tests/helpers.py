"""What several test modules share: the repository's paths, a standard training config and reading a run's log,
running `tunelab train` under torchrun, and the reward stand-ins of the ppo and grpo tests. Test modules import
from here, never from each other."""

import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunelab.model.value_head import ValueHeadModel

REPO = Path(__file__).resolve().parents[1]
#: Data and tokenizers of other projects, beside the repository; tests that read them skip when it is absent.
SHARED = REPO.parent / "shared"
LF_DATA = SHARED / "lf_data"
TOKENIZERS = SHARED / "tokenizers"
#: The SFT LoRA config of the user's documents (LLaMA-Factory's llama3_lora_sft.yaml), verbatim.
SEED_YAML = """\
model_name_or_path: meta-llama/Meta-Llama-3-8B-Instruct

stage: sft
do_train: true
finetuning_type: lora
lora_target: all

dataset: identity,alpaca_en_demo
template: llama3
cutoff_len: 1024
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 16

output_dir: saves/llama3-8b/lora/sft
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true

per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000

val_size: 0.1
per_device_eval_batch_size: 1
eval_strategy: steps
eval_steps: 500
"""

#: The pictures of LLaMA-Factory's demo data that the `picture_adapter` fixture learns to tell apart, and its answers.
PICTURE_ANSWERS = {"1.jpg": "Two cats sleeping on a sofa.", "2.jpg": "A man riding a horse."}
PICTURE_QUESTION = "What is in the picture?"

PROMPTS = ["Who are you?", "What is the capital of France? Answer in one word.", "Hi"]


def run_config(model_dir: Path, output_dir: Path, **overrides) -> dict:
    config = {
        "model_name_or_path": str(model_dir),
        "stage": "sft",
        "do_train": True,
        "finetuning_type": "lora",
        "dataset": "identity",
        "dataset_dir": str(REPO / "data"),
        "template": "chatml",
        "cutoff_len": 128,
        "output_dir": str(output_dir),
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-2,
        "max_steps": 24,
        "logging_steps": 2,
        "save_steps": 12,
        "lr_scheduler_type": "constant",
        "report_to": "none",
        "seed": 0,
    }
    config.update(overrides)
    return config


def train_with_two_processes(config: dict, folder: Path, port: int) -> str:
    """`tunelab train` on `config` under torchrun with 2 CPU processes (DDP over gloo, or the engine the config names);
    the test fails on an error. Returns what the run wrote to stderr (tunelab's log)."""
    path = folder / "two_processes.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2", "MASTER_PORT": str(port),
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "tunelab", "train", str(path)], capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


def assert_two_processes_train_as_accumulation(config_for: Callable[..., dict], folder: Path, port: int,
                                               keys: tuple[str, ...], weights: tuple[str, ...],
                                               steps_apart: float = 0.1) -> list[dict]:
    """Train `config_for(output_dir, **overrides)` (batch 2 per device) with 2 processes under torchrun and with 1
    process and gradient accumulation 2: both see the same samples per step, so the logged `keys` and the saved
    `weights` files must be the same. Returns the distributed run's log records.

    Weights to `steps_apart` learning rates (by default a tenth of one Adam step): the all-reduce sums gradients in
    another order than accumulation does, and for the few entries whose gradient is near zero (rounding noise,
    which differs by CPU kernel) Adam's division by the root of the second moment turns that noise into steps of
    up to the learning rate."""
    from safetensors.torch import load_file

    import tunelab

    two, one = folder / "two", folder / "one"
    step = config_for(two)["learning_rate"]
    train_with_two_processes(config_for(two), folder, port)
    tunelab.train(config_for(one, gradient_accumulation_steps=2))
    records = {run: [r for r in read_log(run) if "loss" in r] for run in (two, one)}
    assert [r["current_steps"] for r in records[two]] == [r["current_steps"] for r in records[one]]
    for key in keys:
        assert [r[key] for r in records[two]] == pytest.approx([r[key] for r in records[one]], rel=1e-4, abs=1e-6)
    for name in weights:
        ddp, accumulated = load_file(two / name), load_file(one / name)
        assert ddp.keys() == accumulated.keys()
        for tensor in ddp:
            torch.testing.assert_close(ddp[tensor], accumulated[tensor], rtol=1e-4, atol=step * steps_apart)
    return records[two]


#: The file a run saves its trained weights in, per method.
WEIGHTS = {"lora": "adapter_model.safetensors", "full": "model.safetensors", "freeze": "model.safetensors"}


def engine_config(model_dir: Path, out: Path, method: str, **more) -> dict:
    """A short run (4 steps of batch 2, a checkpoint every 2) for comparing engines: DeepSpeed, FSDP, several nodes."""
    return run_config(model_dir, out, **{"finetuning_type": method, "max_steps": 4, "save_steps": 2,
                                         "logging_steps": 1, "per_device_train_batch_size": 2,
                                         "learning_rate": 1e-2 if method == "lora" else 1e-3, **more})


def assert_same_training(sharded: Path, whole: Path, method: str, rel: float = 1e-5, atol: float = 1e-5,
                         logged: tuple[str, ...] = ("loss", "grad_norm")) -> None:
    """Two runs of `engine_config` logged the same losses and gradient norms at every step and saved the same
    weights (same names: nothing trained that the other left alone)."""
    from safetensors.torch import load_file

    records = {run: [r for r in read_log(run) if "loss" in r] for run in (sharded, whole)}
    assert [r["current_steps"] for r in records[sharded]] == [1, 2, 3, 4]
    for key in logged:
        assert [r[key] for r in records[sharded]] == pytest.approx([r[key] for r in records[whole]], rel=rel)
    got, expected = load_file(sharded / WEIGHTS[method]), load_file(whole / WEIGHTS[method])
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=max(rel, atol), atol=atol)


def assert_resumes_exactly(out: Path, rerun: Callable[[], Any], checkpoint: int = 2) -> None:
    """Keep only `checkpoint-N` and the log of a finished run in `out`, run again (it resumes from the checkpoint),
    and check that the steps after N log the losses of the uninterrupted run."""
    uninterrupted = {r["current_steps"]: r["loss"] for r in read_log(out) if "loss" in r}
    for path in out.iterdir():
        if path.name not in (f"checkpoint-{checkpoint}", "trainer_log.jsonl"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    rerun()
    resumed = {r["current_steps"]: r["loss"] for r in read_log(out) if "loss" in r}
    later = sorted(step for step in uninterrupted if step > checkpoint)
    assert later and [resumed[step] for step in later] == pytest.approx([uninterrupted[s] for s in later], rel=1e-5)


def read_log(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "trainer_log.jsonl").read_text().splitlines()]


def losses(output_dir: Path) -> list[float]:
    return [r["loss"] for r in read_log(output_dir) if "loss" in r]


@contextmanager
def reward_server(score: Callable[[list[str]], list]) -> Iterator[str]:
    """A real HTTP reward server on a free local port, answering `{"scores": score(messages)}`; yields its URL.
    Every request body it got is kept in `reward_server.requests`."""
    requests = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            requests.append(body)
            data = json.dumps({"scores": score(body["messages"])}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    reward_server.requests = requests
    try:
        yield f"http://127.0.0.1:{server.server_port}/score"
    finally:
        server.shutdown()
        server.server_close()


def make_rm_adapter(model_dir: Path, folder: Path, seed: int = 1) -> Path:
    """An rm stage's output as the rm stage writes it: a ValueHeadModel over a peft LoRA model, saved with
    `save_pretrained` (adapter files + value_head.safetensors). Its weights are random, so it scores something."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    lora = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                      init_lora_weights=False)
    model = ValueHeadModel(get_peft_model(base, lora))
    torch.nn.init.normal_(model.v_head.weight, std=0.5)
    model.save_pretrained(folder)
    return folder


@functools.lru_cache
def favourite_token(model_dir: Path) -> int:
    """The token the untrained model finds likeliest to open its answer to "Who are you?": a reward counting it has
    something to find from the first step (a random model gives every token about the same small chance)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    prompt_ids, _ = prompt_batch(tokenizer, PROMPTS[:1])
    with torch.no_grad():
        return int(model(prompt_ids).logits[0, -1].argmax())


def prompt_batch(tokenizer, texts: list[str] = PROMPTS) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True)
            for t in texts]
    rows = [row["input_ids"] if hasattr(row, "keys") else row for row in rows]
    padded = tokenizer.pad({"input_ids": rows}, padding_side="left", return_tensors="pt")
    return padded["input_ids"], padded["attention_mask"]


def make_batch(tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    """The texts as one padded batch, every real token a label."""
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch


def train_steps(model, batch: dict, steps: int = 8, lr: float = 1e-2) -> list[float]:
    """`steps` AdamW steps of the model on one batch; the losses."""
    # No weight decay: a weight that changes must have been moved by its gradient.
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    values = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        values.append(loss.item())
    return values


def eval_logits(model, batch: dict) -> torch.Tensor:
    """The model's float32 logits for the batch, in eval mode."""
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
