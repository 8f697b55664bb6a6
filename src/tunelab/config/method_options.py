"""Keys of the training methods beyond full, freeze and plain LoRA, with LLaMA-Factory's names, defaults and meanings:
adapter variants (OFT, LoRA+, PiSSA), memory-saving optimizers (GaLore, APOLLO, BAdam, Adam-mini, Muon), LLaMA Pro,
the SFT loss variants and precision settings. `schema.Config` inherits them; `rules.py` says which combine.
"""

from dataclasses import dataclass
from typing import Literal

from tunelab.config.option import option


@dataclass
class AdapterVariantOptions:
    oft_rank: int = option(0, "oft: orthogonal blocks per layer (0: derived from oft_block_size).", minimum=0)
    oft_block_size: int = option(32, "oft: size of each orthogonal block (0: derived from oft_rank).", minimum=0)
    oft_target: list[str] = option(["all"], "oft: modules that get OFT (comma list, or all linear layers).")
    module_dropout: float = option(0.0, "oft: probability of dropping a whole OFT block in training.", minimum=0,
                                   maximum=1)
    loraplus_lr_ratio: float | None = option(
        None, "LoRA+: the B matrices learn this many times faster than the A matrices (e.g. 16).", minimum=0,
        exclusive_minimum=True)
    loraplus_lr_embedding: float = option(1e-6, "LoRA+: learning rate of LoRA on embedding layers.", minimum=0)
    pissa_init: bool = option(False, "PiSSA: start the adapter from the weights' principal singular vectors.")
    pissa_iter: int = option(16, "PiSSA: iterations of the fast SVD (-1: exact SVD).", minimum=-1)
    pissa_convert: bool = option(
        False, "PiSSA: save the trained adapter as a plain LoRA that applies to the original base model.")


@dataclass
class OptimizerOptions:
    use_galore: bool = option(False, "GaLore optimizer (full/freeze): gradients projected to a low rank.")
    galore_target: list[str] = option(["all"], "GaLore: modules whose weights it optimizes (comma list, or all).")
    galore_rank: int = option(16, "GaLore: rank of the gradient projection.", minimum=1)
    galore_update_interval: int = option(200, "GaLore: steps between updates of the projection.", minimum=1)
    galore_scale: float = option(2.0, "GaLore: scale of the projected update.", minimum=0, exclusive_minimum=True)
    galore_proj_type: Literal["std", "reverse_std", "right", "left", "full"] = option(
        "std", "GaLore: projection type.")
    galore_layerwise: bool = option(False, "GaLore: update layer by layer during backward (saves memory; no DDP).")
    use_apollo: bool = option(False, "APOLLO optimizer (full/freeze): AdamW-like scaling from a low-rank state.")
    apollo_target: list[str] = option(["all"], "APOLLO: modules whose weights it optimizes (comma list, or all).")
    apollo_rank: int = option(16, "APOLLO: rank of the auxiliary space.", minimum=1)
    apollo_update_interval: int = option(200, "APOLLO: steps between updates of the projection.", minimum=1)
    apollo_scale: float = option(32.0, "APOLLO: scale of the update.", minimum=0, exclusive_minimum=True)
    apollo_proj: Literal["svd", "random"] = option("random", "APOLLO: projection.")
    apollo_proj_type: Literal["std", "right", "left"] = option("std", "APOLLO: projection type.")
    apollo_scale_type: Literal["channel", "tensor"] = option("channel", "APOLLO: scaling per channel or tensor.")
    apollo_layerwise: bool = option(False, "APOLLO: update layer by layer during backward (saves memory; no DDP).")
    apollo_scale_front: bool = option(False, "APOLLO: scale the gradient before the norm-growth limiter.")
    use_badam: bool = option(False, "BAdam (full): Adam on one block of parameters at a time (one process only).")
    badam_mode: Literal["layer", "ratio"] = option("layer", "BAdam: switch whole layers, or a share of each matrix.")
    badam_start_block: int | None = option(None, "BAdam layer mode: the block trained first.", minimum=0)
    badam_switch_mode: Literal["ascending", "descending", "random", "fixed"] = option(
        "ascending", "BAdam layer mode: the order blocks are switched in.")
    badam_switch_interval: int = option(50, "BAdam: steps between block switches (-1: never).", minimum=-1)
    badam_update_ratio: float = option(0.05, "BAdam ratio mode: share of each matrix updated.", minimum=0,
                                       maximum=1, exclusive_minimum=True)
    badam_mask_mode: Literal["adjacent", "scatter"] = option(
        "adjacent", "BAdam ratio mode: updated entries adjacent or scattered.")
    badam_verbose: int = option(0, "BAdam: 0 quiet, 1 names the block switched to, 2 also the trainable share.",
                                minimum=0, maximum=2)
    use_adam_mini: bool = option(False, "Adam-mini optimizer: one second moment per block (less optimizer memory).")
    use_muon: bool = option(False, "Muon for the hidden weight matrices, AdamW for the rest (torch.optim.Muon).")


@dataclass
class LayerAndLossOptions:
    use_llama_pro: bool = option(
        False, "LLaMA Pro (freeze or lora): train freeze_trainable_layers blocks spread evenly through the model "
               "(the blocks an expansion inserted), not the last ones.")
    use_dft_loss: bool = option(False, "sft: DFT loss, each token's loss weighted by its (detached) probability.")
    use_asft_loss: bool = option(False, "sft: ASFT loss, DFT plus asft_alpha x KL to the frozen base model.")
    asft_alpha: float = option(0.1, "sft ASFT: weight of the KL term.", minimum=0)
    use_eaft_loss: bool = option(False, "sft: EAFT loss, each token's loss weighted by the model's entropy there.")
    eaft_alpha: float = option(1.0, "sft EAFT: exponent of the entropy weight.", minimum=0)
    moe_aux_loss_coef: float | None = option(
        None, "Mixture-of-experts models: weight of the router's load-balancing loss (logged as aux_loss).",
        minimum=0)


@dataclass
class PrecisionOptions:
    pure_bf16: bool = option(False, "Hold and train the weights in bfloat16 without mixed precision (saves memory).")
    upcast_layernorm: bool = option(False, "Keep the normalization weights in float32 when the model is half.")
    upcast_lmhead_output: bool = option(False, "Compute the output head's logits in float32.")
    use_unsloth: bool = option(False, "unsloth kernels: not integrated; tunelab warns and trains without them.")
    use_unsloth_gc: bool = option(
        False, "unsloth's offloaded checkpointing: not integrated; tunelab warns and uses its own checkpointing.")
    enable_liger_kernel: bool = option(
        False, "Liger kernels (a CUDA GPU and the liger-kernel package); without a GPU: a warning, trained without.")
    fp8: bool = option(False, "FP8 training (Hopper GPUs): not integrated; tunelab warns and trains in bf16/fp32.")
    fp8_backend: Literal["auto", "torchao", "te", "msamp"] = option("auto", "FP8 backend (read with fp8).")
    fp8_enable_fsdp_float8_all_gather: bool = option(False, "FP8 all-gather under FSDP (read with fp8).")
