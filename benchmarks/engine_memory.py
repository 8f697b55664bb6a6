"""Peak memory per process of one full fine-tune under each distributed engine, 2 CPU processes over gloo.

    .venv/bin/python benchmarks/engine_memory.py              # needs tunelab[deepspeed]; about 2 minutes on 2 cores

The same run each time: a random 50M-parameter Llama (hidden 768, 8 layers, tunelab's tiny tokenizer), full
fine-tuning with AdamW in float32, `identity` data, batch 2 per process, cutoff 256, 4 steps; DDP, DeepSpeed ZeRO-2,
ZeRO-3 and ZeRO-3 with optimizer and parameter offload (tunelab's examples/deepspeed JSONs), and FSDP2 (full_shard).
Before each optimizer step (the gradients held) and after it, every process measures two things (through a
callback the worker adds to each Trainer it builds): the bytes of all live tensors (weights, gradients, optimizer
state, the engine's buffers; each storage counted once), and its resident memory after giving freed heap pages back
to the system (malloc_trim), so that neither the allocator's cache nor the transient copies of loading and saving
inflate it. The table shows the largest figure over the steps and processes. On a CPU "offload" moves state from one
part of the same RAM to another, so it saves nothing here; on a GPU it moves that state out of GPU memory.
"""

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEEPSPEED = REPO / "examples" / "deepspeed"
ENGINES = {
    "DDP": {},
    "DeepSpeed ZeRO-2": {"deepspeed": str(DEEPSPEED / "ds_z2_config.json")},
    "DeepSpeed ZeRO-3": {"deepspeed": str(DEEPSPEED / "ds_z3_config.json")},
    "DeepSpeed ZeRO-3 + offload": {"deepspeed": str(DEEPSPEED / "ds_z3_offload_config.json")},
    "FSDP2 full_shard": {"fsdp": "full_shard auto_wrap",
                         "fsdp_config": {"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}},
}


def build_model(folder: Path) -> Path:
    """tunelab's tiny tokenizer with a 50M-parameter random Llama."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunelab.model import build_tiny_model

    build_tiny_model(folder)
    tiny = LlamaConfig.from_pretrained(folder)
    config = LlamaConfig(vocab_size=tiny.vocab_size, hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
                         num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=1024,
                         tie_word_embeddings=False, eos_token_id=tiny.eos_token_id, pad_token_id=tiny.pad_token_id)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    return folder


def live_tensor_mib() -> float:
    """MiB of every tensor storage alive in this process, each counted once."""
    import torch

    storages = {}
    for obj in gc.get_objects():
        if torch.is_tensor(obj) and obj.device.type == "cpu":
            try:
                storage = obj.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
            except RuntimeError:   # a wrapper without storage of its own (a DTensor); its local shard is counted
                continue
    return sum(storages.values()) / 2**20


def resident_mib() -> float:
    """Resident memory after freed heap pages are returned to the system."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(engine: str, model: str, out: str) -> None:
    """One process of a run (started by torchrun): train with a probe at every step end, write the largest figures."""
    from transformers import Trainer, TrainerCallback

    import tunelab

    figures = {"tensors_mib": 0.0, "resident_mib": 0.0}

    class StepMemory(TrainerCallback):
        """Measured with the gradients held (before the optimizer step) and after the step."""

        def on_pre_optimizer_step(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201 - the protocol
            figures["tensors_mib"] = max(figures["tensors_mib"], live_tensor_mib())
            figures["resident_mib"] = max(figures["resident_mib"], resident_mib())

        on_step_end = on_pre_optimizer_step

    build_trainer = Trainer.__init__

    def with_probe(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        build_trainer(self, *args, **kwargs)
        self.add_callback(StepMemory())

    Trainer.__init__ = with_probe
    start = time.time()
    tunelab.train({"model_name_or_path": model, "stage": "sft", "do_train": True, "finetuning_type": "full",
                   "dataset": "identity", "dataset_dir": str(REPO / "data"), "template": "chatml", "cutoff_len": 256,
                   "output_dir": out, "overwrite_output_dir": True, "per_device_train_batch_size": 2,
                   "learning_rate": 1e-5, "max_steps": 4, "logging_steps": 1, "save_strategy": "no",
                   "report_to": "none", "seed": 0, **ENGINES[engine]})
    rank = os.environ.get("RANK", "0")
    (Path(out) / f"memory-{rank}.json").write_text(json.dumps({**figures, "seconds": time.time() - start}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.model, args.out)
        return
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(Path(tmp) / "model")
        for port, engine in enumerate(ENGINES, start=29700):
            out = Path(tmp) / f"run{port}"
            command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                       __file__, "--worker", engine, "--model", str(model), "--out", str(out)]
            env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
            result = subprocess.run(command, env=env, capture_output=True, text=True)
            if result.returncode != 0:
                sys.exit(f"{engine} failed:\n{result.stderr[-3000:]}")
            figures = [json.loads((out / f"memory-{rank}.json").read_text()) for rank in (0, 1)]
            rows[engine] = {key: max(f[key] for f in figures) for key in figures[0]}
            print(f"{engine}: {rows[engine]}", file=sys.stderr)
    ddp = rows["DDP"]
    print("| engine (2 processes) | live tensors per process (MiB) | share of DDP's | resident memory per process "
          "(MiB) | share of DDP's | run (s) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for engine, row in rows.items():
        print(f"| {engine} | {row['tensors_mib']:,.0f} | {row['tensors_mib'] / ddp['tensors_mib']:.0%} | "
              f"{row['resident_mib']:,.0f} | {row['resident_mib'] / ddp['resident_mib']:.0%} | {row['seconds']:.0f} |")

if __name__ == "__main__":
    main()
