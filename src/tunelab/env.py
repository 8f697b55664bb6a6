"""`tunelab env`: what a bug report needs to know about the machine and the stack."""

import importlib.metadata
import os
import platform

PACKAGES = ("tunelab", "torch", "transformers", "peft", "trl", "datasets", "accelerate", "tokenizers",
            "safetensors", "bitsandbytes", "deepspeed", "flash-attn", "gguf", "gradio", "fastapi", "vllm")


def describe_environment() -> str:
    lines = [f"platform: {platform.platform()}", f"python: {platform.python_version()}",
             f"cpu cores: {os.cpu_count()}"]
    for name in PACKAGES:
        try:
            lines.append(f"{name}: {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            lines.append(f"{name}: not installed")
    import torch

    lines.append(f"torch threads: {torch.get_num_threads()}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            lines.append(f"gpu {i}: {props.name}, {props.total_memory / 2**30:.1f} GiB, "
                         f"compute capability {props.major}.{props.minor}")
        lines.append(f"cuda: {torch.version.cuda}, bf16 supported: {torch.cuda.is_bf16_supported()}")
    else:
        lines.append("gpu: none (training runs on the CPU)")
    return "\n".join(lines)
