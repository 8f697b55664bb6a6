"""Peak memory of a dpo run whose model has Qwen's 151,936-word vocabulary: what the [tokens, vocabulary] logits cost.

    .venv/bin/python benchmarks/dpo_memory.py [--steps 4] [--optim sgd]   # needs ../shared (tokenizer, data)

The run: a random Qwen2 of 64 hidden units and 2 layers with the real Qwen2.5 tokenizer (so its output head is
151,936 x 64), LoRA on all linear layers, `pref_loss: sigmoid` with the policy's adapter off as reference,
LLaMA-Factory's `dpo_en_demo` (../shared/lf_data), cutoff 1024, batch 2 (2 chosen + 2 rejected rows), float32,
`--steps` steps with `--optim` (AdamW by default), in a fresh process. It prints the process's peak resident
memory (ru_maxrss) and the logged losses, so that two versions of tunelab can be compared on the same machine:
run it with each on PYTHONPATH (`git worktree add`).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def worker(folder: Path, steps: int, optim: str) -> None:
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    import tunelab

    tokenizer = AutoTokenizer.from_pretrained(SHARED / "tokenizers" / "qwen2.5-instruct")
    config = Qwen2Config(vocab_size=151_936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tunelab.train({"model_name_or_path": str(folder / "model"), "stage": "dpo", "do_train": True,
                   "finetuning_type": "lora", "lora_target": "all", "dataset": "dpo_en_demo",
                   "dataset_dir": str(SHARED / "lf_data"), "template": "qwen", "cutoff_len": 1024,
                   "per_device_train_batch_size": 2, "max_steps": steps, "logging_steps": 1, "learning_rate": 1e-4,
                   "optim": optim, "output_dir": str(folder / "run"), "save_strategy": "no", "report_to": "none",
                   "seed": 0,
                   "cache_dir": str(folder / "cache")})
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    losses = [json.loads(line)["loss"] for line in (folder / "run" / "trainer_log.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    print(json.dumps({"peak_mib": peak / 1024, "before_training_mib": start / 1024, "losses": losses}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--optim", default="adamw_torch")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(Path(args.worker), args.steps, args.optim)
        return
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        result = subprocess.run([sys.executable, __file__, "--worker", tmp, "--steps", str(args.steps),
                                 "--optim", args.optim], env=env,
                                capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(result.stderr[-3000:])
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"peak resident memory: {figures['peak_mib']:,.0f} MiB (before training: "
          f"{figures['before_training_mib']:,.0f} MiB)")
    print("losses:", ", ".join(f"{loss:.6f}" for loss in figures["losses"]))


if __name__ == "__main__":
    main()
