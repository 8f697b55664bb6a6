"""SFT LoRA training speed and memory, tunelab and LLaMA-Factory on the same config, back to back on this machine.

    .venv/bin/python benchmarks/train_speed.py [--model llama-97m] [--steps 10] [--dtypes fp32 bf16] [--batch 1]
        [--llamafactory /tmp/lfvenv/bin/llamafactory-cli]      # needs ../shared (tokenizers, data)

The run (issue 15's benchmark): LoRA rank 8 on all linear layers, `identity,alpaca_en_demo` from ../shared/lf_data,
cutoff 1024, 8 samples a step as batch `--batch` x accumulation 8 / `--batch` (default 1 x 8), learning rate 1e-4,
seed 42, `--steps` optimizer steps. `--model`:

- `llama-97m`: a random Llama of SmolLM2-135M's shape with 19 of its 30 layers (95.6M parameters, tied embeddings,
  SmolLM2's 49,152-word tokenizer), template `smollm2`;
- `smollm2`: the real embedded SmolLM2-135M-Instruct (its GGUF converted to a folder both tools read);
- `qwen-vocab`: a random 2-layer, 64-wide Qwen2 with the real Qwen2.5 tokenizer (151,936 words), template `qwen`.

Rows, each in a fresh process, one at a time: tunelab with its defaults; with `--llamafactory`, LLaMA-Factory with
its defaults (gradient checkpointing on) and with checkpointing off (its fastest setting); in bf16 (`bf16: true`,
which LLaMA-Factory refuses on a CPU unless `use_cpu: true` is added) the same. tunelab's defaults run a step's
samples back to back without padding (`padding_free`, on by default for sft: passes of up to batch x the longest
sample's tokens); a second tunelab row pads, as before (`padding_free: false`); with `--batch` above 1, also
tunelab padded with `train_sampling_strategy: group_by_length` (padded batches of samples of similar length).
tokens/s counts the samples' tokens, not the padding (`include_num_input_tokens_seen: non_padding` in both tools),
from each run's trainer_log.jsonl (`total_tokens` over `elapsed_time`, whole seconds: give short runs more `--steps`)
between the first and the last step, so start-up, data preparation and the first step's warm-up are left out; peak
RSS is the process's ru_maxrss. "machine" is the share of the measured matmul rate for the dtype (a 2048^3 matmul on
all cores) that the run's matmuls reach, counting 2 x parameters FLOPs per token for each forward matmul and twice
that for the backward of trained weights and of the activations (attention scores and element-wise work not
counted). Run it with nothing else running.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TUNELAB = [str(REPO / ".venv" / "bin" / "tunelab"), "train"]

COMMON = {"stage": "sft", "do_train": True, "finetuning_type": "lora", "lora_rank": 8, "lora_target": "all",
          "dataset": "identity,alpaca_en_demo", "dataset_dir": str(SHARED / "lf_data"), "cutoff_len": 1024,
          "per_device_train_batch_size": 1, "gradient_accumulation_steps": 8, "learning_rate": 1e-4,
          "lr_scheduler_type": "cosine", "logging_steps": 1, "save_strategy": "no", "report_to": "none",
          "include_num_input_tokens_seen": "non_padding", "seed": 42, "overwrite_output_dir": True,
          "preprocessing_num_workers": 1}


def build_model(name: str, folder: Path) -> tuple[Path, str]:
    """The model folder for `name` and its template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    if name == "smollm2":
        from tunelab.model.embedded import resolve_embedded
        from tunelab.model.loader import forget_gguf_origin

        gguf = Path(resolve_embedded("tunelab:smollm2-135m-instruct"))
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        forget_gguf_origin(model)  # float weights now: saved as an ordinary model
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        template = "smollm2"
    elif name == "llama-97m":
        tokenizer = AutoTokenizer.from_pretrained(SHARED / "tokenizers" / "smollm2-135m-instruct-from-gguf")
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=576, intermediate_size=1536, num_hidden_layers=19,
            num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, max_position_embeddings=8192,
            rope_theta=100000.0, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
        template = "smollm2"
    elif name == "qwen-vocab":
        from transformers import Qwen2ForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(SHARED / "tokenizers" / "qwen2.5-instruct")
        model = Qwen2ForCausalLM(Qwen2Config(
            vocab_size=151_936, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id))
        template = "qwen"
    else:
        raise SystemExit(f"unknown --model {name!r}")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, template


def flops_per_token(model_dir: Path) -> float:
    """Matmul FLOPs of one trained token with LoRA: frozen weights forward + backward to the activations (4 per
    weight), LoRA weights also backward to themselves (6 per weight); the head counts once even when tied."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    hidden, layers, inner = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    kv = hidden // config.num_attention_heads * config.num_key_value_heads
    attention, mlp = 2 * hidden * hidden + 2 * hidden * kv, 3 * hidden * inner
    frozen = layers * (attention + mlp) + hidden * config.vocab_size
    lora = layers * 8 * (4 * hidden + hidden + kv + hidden + kv + 3 * (hidden + inner))
    return 4 * frozen + 6 * lora


def matmul_rate(dtype: torch.dtype) -> float:
    """FLOP/s of a 2048^3 matmul in `dtype` on this machine's cores (best of 5)."""
    a = torch.randn(2048, 2048, dtype=dtype)
    b = torch.randn(2048, 2048, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * 2048**3 / best


def seconds(elapsed: str | float) -> float:
    """trainer_log.jsonl's elapsed_time: "H:MM:SS" as LLaMA-Factory writes it (whole seconds), or a number."""
    if isinstance(elapsed, str):
        hours, minutes, secs = elapsed.split(":")
        return int(hours) * 3600 + int(minutes) * 60 + float(secs)
    return float(elapsed)


def run(command: list[str], config: dict, folder: Path) -> dict:
    """Train `config` with `command` in a fresh process; its tokens/s, peak RSS and losses."""
    folder.mkdir(parents=True)
    # YAML: LLaMA-Factory 0.9.5 fails to read a .json config (it passes a Path to json.load).
    config_file = folder / "config.yaml"
    config_file.write_text(yaml.safe_dump({**config, "output_dir": str(folder / "out")}))
    # LLaMA-Factory imports torchaudio at start-up, for which no build matches the CPU torch; the text path never
    # uses it, so its process finds an empty module of that name.
    stub = folder.parent / "stubs"
    (stub / "torchaudio").mkdir(parents=True, exist_ok=True)
    (stub / "torchaudio" / "__init__.py").touch()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "DISABLE_VERSION_CHECK": "1",
           "PYTHONPATH": str(stub) if command[0] != TUNELAB[0] else ""}
    with open(folder / "log.txt", "w") as log:
        process = subprocess.Popen([*command, str(config_file)], env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        sys.exit(f"{' '.join(command)} failed; see the end of its log:\n" + (folder / "log.txt").read_text()[-3000:])
    lines = [json.loads(line) for line in (folder / "out" / "trainer_log.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "loss" in line and "total_tokens" in line]
    first, last = steps[0], steps[-1]
    return {"tokens_per_s": (last["total_tokens"] - first["total_tokens"]) / (seconds(last["elapsed_time"])
                                                                              - seconds(first["elapsed_time"])),
            "peak_gib": usage.ru_maxrss / 2**20, "losses": [line["loss"] for line in steps]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-97m", choices=["llama-97m", "smollm2", "qwen-vocab"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--batch", type=int, default=1, choices=[1, 2, 4, 8], help="samples per micro-batch")
    parser.add_argument("--llamafactory", help="llamafactory-cli of a LLaMA-Factory venv, to run it side by side")
    parser.add_argument("--keep", help="keep the runs' folders here")
    args = parser.parse_args()

    work = Path(args.keep or tempfile.mkdtemp(prefix="train_speed_"))
    model_dir, template = build_model(args.model, work / "model")
    config = {**COMMON, "model_name_or_path": str(model_dir), "template": template, "max_steps": args.steps,
              "per_device_train_batch_size": args.batch, "gradient_accumulation_steps": 8 // args.batch}
    per_token = flops_per_token(model_dir)
    print(f"{args.model}: {per_token / 1e9:.2f} GFLOP per token; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {os.cpu_count()} CPUs; batch {args.batch} x {8 // args.batch}")

    rows = []
    for dtype in args.dtypes:
        precision = {"bf16": True} if dtype == "bf16" else {}
        rate = matmul_rate(torch.bfloat16 if dtype == "bf16" else torch.float32)
        print(f"{dtype} matmul: {rate / 1e9:.0f} GFLOP/s")
        runs = [(f"tunelab defaults (padding-free), {dtype}", TUNELAB, precision),
                (f"tunelab, padding_free: false, {dtype}", TUNELAB, {**precision, "padding_free": False})]
        if args.batch > 1:   # padded batches of samples of similar length (a different order, so other losses)
            runs.insert(1, (f"tunelab, padding_free: false, train_sampling_strategy: group_by_length, {dtype}",
                            TUNELAB, {**precision, "padding_free": False,
                                      "train_sampling_strategy": "group_by_length"}))
        if args.llamafactory:
            lf = [args.llamafactory, "train"]
            lf_precision = {**precision, "use_cpu": True} if dtype == "bf16" else {}
            runs.insert(0, (f"LLaMA-Factory, checkpointing off, {dtype}", lf,
                            {**lf_precision, "disable_gradient_checkpointing": True}))
            if dtype == "fp32":
                runs.insert(0, ("LLaMA-Factory defaults (checkpointing on), fp32", lf, {}))
        for label, command, extra in runs:
            result = run(command, {**config, **extra}, work / f"run{len(rows)}")
            result.update(label=label, machine=result["tokens_per_s"] * per_token / rate)
            rows.append(result)
            print(f"  {label}: {result['tokens_per_s']:.0f} tokens/s, peak {result['peak_gib']:.2f} GiB, "
                  f"losses {', '.join(f'{loss:.4f}' for loss in result['losses'][:3])} ...", flush=True)

    print("\n| run | tokens/s | peak RSS | machine | vs LLaMA-Factory's best (same dtype) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        dtype = row["label"].rsplit(", ", 1)[-1]
        best = max((r["tokens_per_s"] for r in rows if r["label"].startswith("LLaMA") and r["label"].endswith(dtype)),
                   default=None)
        ratio = f"{row['tokens_per_s'] / best:.2f}x" if best else "-"
        print(f"| {row['label']} | {row['tokens_per_s']:.0f} | {row['peak_gib']:.2f} GiB | {row['machine']:.0%} "
              f"| {ratio} |")


if __name__ == "__main__":
    main()
