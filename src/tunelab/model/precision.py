"""The dtypes of a model being trained: of its trainable weights, its normalization layers and its logits.

* By default the trainable weights are float32 whatever the rest is: with mixed precision (bf16/fp16) an update of
  lr x grad, about 1e-6 of a weight, is below bf16's 8-bit mantissa and would round away (see loader._weights_dtype).
* `pure_bf16` keeps them in bfloat16 too and trains without autocast: half the memory of weights, gradients and
  optimizer state, at the price of those rounded-away small updates (fine for short runs with larger rates).
* `upcast_layernorm` holds the normalization weights in float32 in a half-precision model; each norm's output is
  cast back to its input's dtype, so the layers after it see the dtype they were built for.
* `upcast_lmhead_output` returns the output head's logits in float32, so the softmax of the loss does not see
  bf16-rounded logits.
"""

import logging
from typing import TYPE_CHECKING, Any

from tunelab.config import Config

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)


def set_trainable_dtype(model: "PreTrainedModel", config: Config) -> None:
    """Trainable weights to float32, or to bfloat16 with `pure_bf16` (peft builds adapters in float32 either way)."""
    import torch

    dtype = torch.bfloat16 if config.pure_bf16 else torch.float32
    for param in model.parameters():
        if param.requires_grad and param.dtype != dtype and param.is_floating_point():
            param.data = param.data.to(dtype)


def upcast_layernorm(model: "PreTrainedModel") -> None:
    """Normalization weights to float32 in a half-precision model, each norm's output back to its input's dtype."""
    import torch

    upcast = 0
    for module in model.modules():
        if not _is_norm(module):
            continue
        params = [p for p in module.parameters(recurse=False) if p.dtype in (torch.float16, torch.bfloat16)]
        if not params:
            continue
        for param in params:
            param.data = param.data.float()
        # A float32 weight times a half input gives a float32 output, which the next half-precision linear layer
        # refuses outside autocast (pure_bf16, inference): hand it the dtype it got.
        module.register_forward_hook(_output_like_input)
        upcast += 1
    if upcast:
        logger.info("upcast_layernorm: %d normalization layers hold float32 weights", upcast)
    else:
        logger.info("upcast_layernorm: the normalization weights are float32 already; nothing to do")


def upcast_lmhead_output(model: "PreTrainedModel") -> None:
    """Return the output head's logits in float32 (a forward hook on the head)."""
    head = model.get_output_embeddings()
    if head is None:
        logger.warning("upcast_lmhead_output: %s has no output head; nothing to do", type(model).__name__)
        return
    head.register_forward_hook(_float_output)
    logger.info("upcast_lmhead_output: the logits are computed in float32")


def _is_norm(module: "torch.nn.Module") -> bool:
    """LayerNorm, RMSNorm and the models' own norm classes (LlamaRMSNorm, Qwen2RMSNorm, ...): named so."""
    import torch

    return isinstance(module, (torch.nn.LayerNorm, torch.nn.RMSNorm)) or type(module).__name__.endswith("Norm")


def _output_like_input(module: "torch.nn.Module", args: tuple, output: Any) -> Any:
    if args and hasattr(args[0], "dtype") and hasattr(output, "to"):
        return output.to(args[0].dtype)
    return output


def _float_output(module: "torch.nn.Module", args: tuple, output: "torch.Tensor") -> "torch.Tensor":
    return output.float()


def cpu_bf16_speedup() -> float:
    """How many times faster this CPU multiplies bfloat16 than float32 matrices, measured on a 512^3 matmul (a few
    milliseconds). About 2-4 where AVX-512 bf16 or AMX run them natively, below 1 where bf16 is emulated."""
    import time

    import torch

    def best_time(dtype: "torch.dtype") -> float:
        a, b = torch.ones(512, 512, dtype=dtype), torch.ones(512, 512, dtype=dtype)
        a @ b   # the first call picks and compiles the kernel
        times = []
        for _ in range(3):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        return min(times)

    return best_time(torch.float32) / best_time(torch.bfloat16)
