"""Load the tokenizer and the model a config names, ready to train or to run.

`model_name_or_path` may be a local folder, a hub id, a local `.gguf` file (transformers dequantizes GGUF weights
to float), or an embedded model's `tunelab:` name (see `embedded.py`). A model whose config has a vision part
(Qwen2-VL, Qwen2.5-VL, ...) loads as an image-text model, since `AutoModelForCausalLM` refuses those. Every user
mistake found here (a path that does not exist, a missing optional package, a RoPE setting the model cannot take)
raises `ConfigError` naming the key.
"""

import importlib.util
import logging
import math
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab.config import Config, ConfigError
from tunelab.model.adapters import load_adapters_for_inference
from tunelab.model.embedded import resolve_embedded
from tunelab.model.methods import apply_method, count_parameters
from tunelab.model.vision import is_vision_language

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# `org/name` or a bare `name`, as the hub accepts them; anything else is taken for a local path.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")

#: flash_attn value -> transformers' attn_implementation (None: let transformers pick, usually sdpa).
ATTENTION = {"auto": None, "disabled": "eager", "eager": "eager", "sdpa": "sdpa",
             "fa2": "flash_attention_2", "fa3": "flash_attention_3"}
#: flash_attn value -> (module to import, package to install) for the kernels that are not part of torch.
_FLASH_PACKAGES = {"fa2": ("flash_attn", "flash-attn"), "fa3": ("flash_attn_interface", "flash-attn-3")}

# Llama 3.1's published low/high frequency factors: the llama3 rope type requires them and they suit any model.
_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0}


@dataclass(frozen=True)
class ModelSource:
    """Where the base model lives: a local folder or a hub id, plus the file name when it is a GGUF file."""

    path: str
    gguf_file: str | None
    is_local: bool


def resolve_source(config: Config) -> ModelSource:
    """Check `model_name_or_path` (resolving `tunelab:` names) and split a .gguf file into folder and file name."""
    value = resolve_embedded(config.model_name_or_path)
    path = Path(value).expanduser()
    if value.endswith(".gguf"):
        if not path.is_file():
            raise ConfigError(f"`model_name_or_path`: the GGUF file {value} does not exist")
        return ModelSource(str(path.parent), path.name, is_local=True)
    if path.is_dir():
        return ModelSource(str(path), None, is_local=True)
    if path.exists():
        raise ConfigError(f"`model_name_or_path`: {value} is a file; expected a model folder, a hub id or a .gguf file")
    if not _HUB_ID.fullmatch(value):
        raise ConfigError(f"`model_name_or_path`: the local path {value} does not exist "
                          f"(and it does not look like a hub id such as `org/name`)")
    return ModelSource(value, None, is_local=False)


def load_tokenizer(config: Config) -> "PreTrainedTokenizerBase":
    """The model's tokenizer with the config's added tokens, a pad token, and right padding for training.

    It comes from the last adapter folder when that holds one (a run saves its tokenizer there, with the chat
    template and tokens it was trained with), else from the base model.
    """
    from transformers import AutoTokenizer

    source = resolve_source(config)
    adapters = config.adapter_name_or_path or []
    if adapters and Path(adapters[-1], "tokenizer_config.json").is_file():
        source = ModelSource(adapters[-1], None, is_local=True)
    if not config.use_fast_tokenizer:
        logger.warning("`use_fast_tokenizer: false` has no effect: transformers 5 always uses the fast tokenizer")
    with _loading(source, "tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file, **hub_kwargs(config))

    if config.add_special_tokens:
        added = tokenizer.add_special_tokens({"extra_special_tokens": config.add_special_tokens},
                                             replace_extra_special_tokens=False)
        logger.info("added %d special tokens to the tokenizer: %s", added, ", ".join(config.add_special_tokens))
    if config.add_tokens:
        added = tokenizer.add_tokens(config.add_tokens)
        logger.info("added %d tokens to the tokenizer: %s", added, ", ".join(config.add_tokens))
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(f"`model_name_or_path`: the tokenizer of {config.model_name_or_path} has neither a pad "
                              f"nor an eos token, so batches cannot be padded")
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("the tokenizer has no pad token: padding with its eos token %s", tokenizer.eos_token)
    # Right padding keeps each sample's tokens at the same positions as unpadded; left is only for batched generation.
    tokenizer.padding_side = "right"
    return tokenizer


def load_model(config: Config, tokenizer: "PreTrainedTokenizerBase", trainable: bool = True) -> "PreTrainedModel":
    """Load the base model and prepare it: with `trainable`, apply the fine-tuning method; else load for inference.

    For inference, `adapter_name_or_path` adapters are merged into the weights (kept separate on a quantized base),
    and the model is returned in eval mode with every gradient off.
    """
    import torch
    from transformers import AutoConfig

    source = resolve_source(config)
    with _loading(source, "model config"):
        model_config = AutoConfig.from_pretrained(source.path, gguf_file=source.gguf_file, **hub_kwargs(config))
    _apply_rope_scaling(model_config, config)
    auto_class = model_class(model_config)

    dtype = _weights_dtype(config, model_config, trainable)
    kwargs: dict[str, Any] = {"dtype": dtype}
    attention = _attention_implementation(config)
    if attention is not None:
        kwargs["attn_implementation"] = attention

    if config.train_from_scratch:
        if config.quantization_bit is not None:
            raise ConfigError("`train_from_scratch` cannot be combined with `quantization_bit`: "
                              "random weights are created in float, not quantized")
        model = auto_class.from_config(model_config, trust_remote_code=config.trust_remote_code, **kwargs)
        logger.info("initialised %s with random weights (train_from_scratch)", type(model).__name__)
    else:
        if config.quantization_bit is not None:
            kwargs.update(_quantization_kwargs(config, source, dtype))
        with _loading(source, "model"):
            model = auto_class.from_pretrained(source.path, config=model_config, gguf_file=source.gguf_file,
                                               **hub_kwargs(config), **kwargs)
        if source.gguf_file:
            forget_gguf_origin(model)
    logger.info("loaded %s in %s (attention: %s)", type(model).__name__, model.dtype,
                model.config._attn_implementation)

    vocab_resized = _fit_vocab(model, tokenizer, config)
    if config.quantization_bit == 4 and not torch.cuda.is_available():
        _keep_4bit_weights_trainable_on_cpu(model)

    if trainable:
        model = apply_method(model, config, vocab_resized=vocab_resized)
        n_trainable, n_total = count_parameters(model)
        logger.info("trainable params: {:,} || all params: {:,} || trainable%: {:.4f}".format(
            n_trainable, n_total, 100 * n_trainable / n_total))
    else:
        model = load_adapters_for_inference(model, config)
        model.requires_grad_(False)
        model.eval()
    return model


def model_class(model_config: "PretrainedConfig") -> type:
    """The transformers auto class that builds this model: the image-text one for a model with a vision part that
    transformers (or its remote code's `auto_map`) registers as such, else the causal LM one."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    if not is_vision_language(model_config):
        return AutoModelForCausalLM
    # Some remote-code vision-language models register only AutoModelForCausalLM; they keep loading that way.
    auto_map = getattr(model_config, "auto_map", None) or {}
    if (model_config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
            or "AutoModelForImageTextToText" in auto_map):
        return AutoModelForImageTextToText
    return AutoModelForCausalLM


def forget_gguf_origin(model: "PreTrainedModel") -> None:
    """A GGUF checkpoint arrives as plain float weights, but transformers still marks the model as GGUF-quantized,
    so the Trainer refuses to train it and `save_pretrained` would write a quantization_config that does not
    describe the saved weights. Drop the marks: from here on it is an ordinary float model."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)


def hub_kwargs(config: Config) -> dict[str, Any]:
    """Arguments every hub lookup (tokenizer, config, weights) takes."""
    return {"cache_dir": config.cache_dir, "revision": config.model_revision, "token": config.hf_hub_token,
            "trust_remote_code": config.trust_remote_code}


@contextmanager
def _loading(source: ModelSource, what: str):
    """Turn transformers' "cannot find or read" errors into a ConfigError that says where we looked."""
    try:
        yield
    except OSError as err:
        where = (f"the local folder {source.path}" if source.is_local
                 else f"the hub id {source.path} (no local folder has that name)")
        raise ConfigError(f"`model_name_or_path`: cannot load the {what} from {where}: {err}") from err


def _weights_dtype(config: Config, model_config: "PretrainedConfig", trainable: bool) -> "torch.dtype":
    """The dtype the weights are loaded in.

    bf16/fp16 mean mixed precision: Trainer computes in half precision under autocast, while the weights it updates
    stay float32, because an update of lr x grad (about 1e-6 of a weight) is below bf16's 8-bit mantissa and would
    round away. So full fine-tuning loads float32; LoRA and freeze load the frozen bulk in half precision (that is
    where the memory saving is) and `methods.apply_method` turns their few trainable weights to float32.
    `pure_bf16` is the exception by design: every weight, trained or not, is bfloat16 (precision.py).
    """
    import torch

    if config.pure_bf16:
        return torch.bfloat16
    if config.bf16 or config.fp16:
        if trainable and config.method == "full":
            return torch.float32
        return torch.bfloat16 if config.bf16 else torch.float16
    if config.infer_dtype != "auto":
        return getattr(torch, config.infer_dtype)
    if not torch.cuda.is_available():
        # Measured on AVX-512 CPUs: bf16 matrix products run at about 60% of fp32 speed, so half precision only costs.
        return torch.float32
    return getattr(model_config, "dtype", None) or torch.float32


def _attention_implementation(config: Config) -> str | None:
    """transformers' attn_implementation for `flash_attn`, refusing FlashAttention that cannot run here."""
    import torch

    if config.flash_attn in _FLASH_PACKAGES:
        module, package = _FLASH_PACKAGES[config.flash_attn]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"`flash_attn: {config.flash_attn}` needs the `{package}` package, which is not "
                              f"installed; use `flash_attn: sdpa` or install it")
        if not torch.cuda.is_available():
            raise ConfigError(f"`flash_attn: {config.flash_attn}` needs a CUDA GPU; use `flash_attn: sdpa` on CPU")
    return ATTENTION[config.flash_attn]


def _apply_rope_scaling(model_config: "PretrainedConfig", config: Config) -> None:
    """Stretch RoPE by ceil(cutoff_len / max_position_embeddings) when samples are longer than the trained context."""
    if config.rope_scaling is None:
        return
    text_config = model_config.get_text_config()
    trained_length = getattr(text_config, "max_position_embeddings", None)
    current = getattr(text_config, "rope_parameters", None)
    if trained_length is None or not current:
        raise ConfigError(f"`rope_scaling`: {type(model_config).__name__} has no RoPE parameters to scale")
    if "rope_type" not in current:
        raise ConfigError("`rope_scaling`: this model uses a different RoPE per layer type, which tunelab cannot "
                          "scale; remove `rope_scaling`")
    if config.cutoff_len <= trained_length:
        logger.info("rope_scaling not needed: cutoff_len %d fits in the model's %d positions",
                    config.cutoff_len, trained_length)
        return

    if current["rope_type"] != "default":
        logger.warning("rope_scaling: replacing the model's own %s RoPE scaling", current["rope_type"])
    factor = math.ceil(config.cutoff_len / trained_length)
    params = {"rope_type": config.rope_scaling, "factor": float(factor), "rope_theta": current["rope_theta"]}
    if "mrope_section" in current:
        # Qwen2-VL's multimodal RoPE: how the rotary dimensions split among time, height and width, kept as is.
        params["mrope_section"] = current["mrope_section"]
    if config.rope_scaling in ("yarn", "llama3"):
        params["original_max_position_embeddings"] = trained_length
    if config.rope_scaling == "llama3":
        params.update(_LLAMA3_ROPE)
    text_config.rope_parameters = params
    # Dynamic NTK grows the base only for sequences beyond max_position_embeddings, so that one must stay as trained.
    if config.rope_scaling != "dynamic":
        text_config.max_position_embeddings = trained_length * factor
    logger.info("rope_scaling: %s with factor %d (%d -> %d positions)", config.rope_scaling, factor, trained_length,
                trained_length * factor)


def _quantization_kwargs(config: Config, source: ModelSource, compute_dtype: "torch.dtype") -> dict[str, Any]:
    """from_pretrained arguments that load the weights in 4 or 8 bits with bitsandbytes."""
    import torch
    from transformers import BitsAndBytesConfig

    if source.gguf_file is not None:
        raise ConfigError("`quantization_bit` cannot be applied to a .gguf model: load a float checkpoint instead")
    if config.quantization_bit == 8:
        quantization = BitsAndBytesConfig(load_in_8bit=True)
    else:
        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=config.quantization_type,
            bnb_4bit_use_double_quant=config.double_quantization, bnb_4bit_compute_dtype=compute_dtype)
    # Quantized weights cannot be moved after loading, so each process puts them on its own device right away
    # (torchrun sets LOCAL_RANK; a single process has none).
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    return {"quantization_config": quantization, "device_map": {"": device}}


def _keep_4bit_weights_trainable_on_cpu(model: "PreTrainedModel") -> None:
    """Stop bitsandbytes from repacking 4-bit weights into its CPU inference layout.

    On CPUs with AVX512-BF16, Linear4bit repacks its weight the first time it runs without gradients (an eval, a
    generate); LoRA layers below the last then silently stop learning (see STACK.md). The flag is read per layer.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def _fit_vocab(model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase", config: Config) -> bool:
    """Resize the embeddings to the tokenizer when asked, or when token ids would not fit; True if resized."""
    weight = model.get_input_embeddings().weight
    # Under DeepSpeed ZeRO-3 a parameter is a partition (its `shape` is 0); `ds_shape` is the whole one.
    rows = getattr(weight, "ds_shape", weight.shape)[0]
    if config.resize_vocab and rows != len(tokenizer):
        logger.info("resize_vocab: embeddings resized from %d to %d tokens", rows, len(tokenizer))
    elif len(tokenizer) > rows:
        logger.info("the tokenizer has %d tokens but the embeddings only %d rows: resizing the embeddings",
                    len(tokenizer), rows)
    else:
        return False
    # New rows start at the mean of the old ones (transformers' mean_resizing), a neutral guess for unseen tokens.
    model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    return True
