"""Cross-field rules: combinations of keys that cannot run together, one row each.

Each rule is a predicate that is true when the config is *wrong*, and the message shown then. They run after every
key has its declared type, so a predicate reads plain values. Each rule has a test in `tests/test_config.py`.
"""

from collections.abc import Callable
from typing import NamedTuple

from tunelab.config.schema import Config


class Rule(NamedTuple):
    violated: Callable[[Config], bool]
    message: str


def _has_eval_data(c: Config) -> bool:
    return c.val_size > 0 or bool(c.eval_dataset)


RULES: tuple[Rule, ...] = (
    Rule(lambda c: c.model_name_or_path is None,
         "`model_name_or_path` is required: a hub id, a local model folder or a .gguf file"),
    Rule(lambda c: c.do_train and not c.dataset,
         "`do_train` needs `dataset` (names from dataset_info.json, comma-separated)"),
    Rule(lambda c: c.do_train and not c.output_dir,
         "`do_train` needs `output_dir` (where the trained weights and logs go)"),
    Rule(lambda c: c.bf16 and c.fp16, "`bf16` and `fp16` are exclusive: pick one"),
    Rule(lambda c: c.quantization_bit is not None and not c.uses_lora,
         "`quantization_bit` needs `finetuning_type: lora` (QLoRA): quantized weights cannot be trained directly"),
    Rule(lambda c: bool(c.adapter_name_or_path) and not c.uses_lora,
         "`adapter_name_or_path` needs `finetuning_type: lora`"),
    Rule(lambda c: c.create_new_adapter and not c.adapter_name_or_path,
         "`create_new_adapter` needs `adapter_name_or_path` (the adapters to merge first)"),
    Rule(lambda c: c.train_on_prompt and c.mask_history,
         "`train_on_prompt` and `mask_history` are exclusive: one trains on more, the other on less"),
    Rule(lambda c: (c.train_on_prompt or c.mask_history) and c.stage != "sft",
         "`train_on_prompt` and `mask_history` apply to `stage: sft` only"),
    Rule(lambda c: c.val_size > 0 and bool(c.eval_dataset),
         "`val_size` and `eval_dataset` are exclusive: evaluate on a held-out split or on a named dataset"),
    Rule(lambda c: (c.do_eval or c.eval_strategy != "no") and not _has_eval_data(c),
         "evaluation (`do_eval` or `eval_strategy`) needs an evaluation set: set `val_size` or `eval_dataset`"),
    Rule(lambda c: c.freeze_trainable_layers == 0 and c.method == "freeze",
         "`freeze_trainable_layers` must not be 0 (positive: the last N layers, negative: the first N)"),
    Rule(lambda c: "all" in c.lora_target and len(c.lora_target) > 1,
         "`lora_target: all` already covers every linear layer; do not list other modules beside it"),
    Rule(lambda c: c.overwrite_output_dir and c.resume_from_checkpoint is not None,
         "`overwrite_output_dir` starts over and `resume_from_checkpoint` continues: pick one"),
    Rule(lambda c: c.streaming and c.max_steps <= 0,
         "`streaming` needs `max_steps`: a streamed dataset has no known length to count epochs by"),
    Rule(lambda c: c.streaming and c.val_size > 0,
         "`streaming` cannot hold out `val_size` of an unread stream: use `eval_dataset`"),
    Rule(lambda c: c.neat_packing and c.packing is False,
         "`neat_packing` is a kind of packing: it cannot run with `packing: false`"),
    Rule(lambda c: c.interleave_probs is not None and c.mix_strategy == "concat",
         "`interleave_probs` needs `mix_strategy: interleave_under` or `interleave_over`"),
    Rule(lambda c: c.interleave_probs is not None and len(c.interleave_probs) != len(c.dataset or []),
         "`interleave_probs` needs one probability per dataset in `dataset`"),
    Rule(lambda c: c.interleave_probs is not None and abs(sum(c.interleave_probs) - 1) > 1e-6,
         "`interleave_probs` must add up to 1"),
)


def check_rules(config: Config) -> list[str]:
    """Messages of every rule the config breaks, in table order."""
    return [rule.message for rule in RULES if rule.violated(config)]
