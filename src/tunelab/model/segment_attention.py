"""sdpa attention that runs a padding-free row sample by sample, so flattening a batch costs no attention work.

    padding_free = use_padding_free(config, model)   # the run's choice; switches sdpa to `sdpa_segments`

A padding-free batch (`padding_free: true`, data/collator.py) is one row holding the micro-batch's samples back to
back, position ids restarting at 0 for each. transformers reads the restarts as packed samples and hands every layer
a block-diagonal causal mask. Given any mask, torch's sdpa leaves its causal kernel for the masked one, which scores
every token of the row against every other: on a CPU, slower than padding the batch. This implementation (registered
with transformers as `sdpa_segments`, with sdpa's own masks) recognises the block-diagonal causal mask of a one-row
batch and runs sdpa's causal kernel on each sample's block: the attention work of the samples alone, and the linear
layers see all their tokens in one matrix. Every other mask (padding, sliding windows, a KV cache) goes to sdpa as it
is. FlashAttention 2 and 3 split packed rows by their position ids themselves and need nothing from here.
"""

import logging
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from tunelab.config import Config, ConfigError
from tunelab.config.stages import STAGE_SPECS
from tunelab.data.media.families import family_for
from tunelab.data.media.loading import model_config_values

logger = logging.getLogger(__name__)

NAME = "sdpa_segments"
#: `flash_attn` values whose kernels split a row by its position ids, building no mask.
FLASH_ATTENTION = ("fa2", "fa3")
#: With sdpa, transformers gives a padding-free row a [T, T] mask of booleans (T tokens): left unset, `padding_free`
#: keeps T (batch x cutoff_len) to this, a mask of 256 MiB at most. A padded batch's mask is batch x L x L.
SDPA_ROW_TOKENS = 16384


def sample_starts(mask: torch.Tensor | None) -> list[int] | None:
    """Where each sample of a one-row block-diagonal causal mask starts, or None when `mask` is anything else.

    Checked without a second [T, T] tensor: each sample's lower triangle must be all true, and the whole mask must
    hold no more true values than those triangles do."""
    if mask is None or mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[:2] != (1, 1) \
            or mask.shape[2] != mask.shape[3]:
        return None
    grid = mask[0, 0]
    # A sample starts at each row that does not see the token before it.
    starts = [0, *((~grid.diagonal(-1)).nonzero().flatten() + 1).tolist()]
    triangles = 0
    for start, end in zip(starts, [*starts[1:], len(grid)]):
        size = end - start
        triangles += size * (size + 1) // 2
        if int(grid[start:end, start:end].tril().sum()) != size * (size + 1) // 2:
            return None
    return starts if int(grid.sum()) == triangles else None


def segment_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: [1, heads, T, dim] inputs -> [1, T, heads, dim] output."""
    if attention_mask is None:
        starts = None
    else:
        # Every layer of a forward pass gets the same mask tensor: it is read once, by the first.
        if not hasattr(attention_mask, "sample_starts"):
            attention_mask.sample_starts = sample_starts(attention_mask)
        starts = attention_mask.sample_starts
    if starts is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if len(starts) == 1:
        return sdpa_attention_forward(module, query, key, value, None, **kwargs)
    # Split, not sliced: the backward of a slice writes its gradient into a zeroed tensor of the whole row, one per
    # sample; the backward of a split is one concatenation.
    sizes = [end - start for start, end in zip(starts, [*starts[1:], query.shape[2]])]
    outputs = [sdpa_attention_forward(module, q, k, v, None, **kwargs)[0]
               for q, k, v in zip(*(tensor.split(sizes, dim=2) for tensor in (query, key, value)))]
    return torch.cat(outputs, dim=1), None


def use_segment_attention(model: Any) -> None:
    """Switch a model that runs sdpa to `sdpa_segments` (registered with transformers on first use)."""
    AttentionInterface.register(NAME, segment_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)


def wants_padding_free(config: Config) -> bool:
    """`padding_free` as set, or, left unset, on where it trains exactly as padded batches do and costs nothing: stage
    sft, samples not packed already, text only (not a vision-language model), a model class of transformers (no
    `auto_map` run through `trust_remote_code`), attention that skips the other samples' tokens (FlashAttention, or
    sdpa on a CPU with rows of at most SDPA_ROW_TOKENS; not eager). Not with NEFTune (`neftune_noise_alpha`), whose
    noise shrinks with the row's length: a row of several samples would get less noise than each sample padded."""
    if config.padding_free is not None:
        return config.padding_free
    if STAGE_SPECS[config.stage].data != "sft" or config.packing or config.neat_packing \
            or config.flash_attn in ("disabled", "eager") or config.extra_training_args.get("neftune_noise_alpha"):
        return False
    if config.flash_attn not in FLASH_ATTENTION:
        batch = config.per_device_train_batch_size
        if config.eval_dataset or config.val_size:
            batch = max(batch, config.per_device_eval_batch_size)
        # On a GPU, sdpa_segments launches each sample's attention kernels on their own: measured faster than
        # padding on CPUs only, so GPUs pad unless FlashAttention splits the row itself.
        on_gpu = torch.cuda.is_available() and not config.extra_training_args.get("use_cpu")
        if on_gpu or batch * config.cutoff_len > SDPA_ROW_TOKENS:
            return False
    values = model_config_values(config)
    remote_code = config.trust_remote_code and "auto_map" in values
    return not remote_code and family_for(values.get("model_type")) is None


def use_padding_free(config: Config, model: Any) -> bool:
    """Whether the run batches padding-free (`wants_padding_free`), switching a model that runs sdpa to
    `sdpa_segments` when it does. The config rules and the data layer refuse `padding_free: true` for stages that
    score whole samples and for images and videos (vision-language positions do not restart per sample yet); here, a
    model class from the model's own code (`trust_remote_code`), which may not keep the samples of a row apart by
    their position ids as transformers' own classes do: its samples would see each other."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    wanted = wants_padding_free(config)
    if wanted and not type(base).__module__.startswith("transformers."):
        if config.padding_free is None:  # a remote class config.json did not announce: pad, to stay correct
            logger.info("padding_free stays off: %s comes from the model's own code", type(base).__name__)
            return False
        raise ConfigError(f"`padding_free` needs a model class of transformers, which keeps the samples of a row "
                          f"apart by their position ids; {type(base).__name__} comes from the model's own code "
                          f"({type(base).__module__}): leave `padding_free` off")
    if wanted:
        if base.config._attn_implementation == "sdpa":
            use_segment_attention(base)
        logger.info("padding_free: each micro-batch is one row without padding (attention: %s)",
                    base.config._attn_implementation)
    return wanted
