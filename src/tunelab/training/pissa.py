"""`pissa_convert`: when training ends, turn the PiSSA adapter into a plain LoRA adapter for the original model.

PiSSA (`pissa_init`, model/adapters.py) moves the principal part of each adapted weight into the adapter:
W = W_res + s * B0 A0, and the base layer holds only the residual W_res. Training moves B0 A0 to B A, so the trained
weight is W_res + s * B A = W + s * (B A - B0 A0): a LoRA adapter of rank 2r on the ORIGINAL weight W, with
A' = [A; A0] and B' = [B, -B0] (the conversion peft documents in `LoraModel.subtract_mutated_init`).

    add_pissa_conversion(trainer, config)    # before trainer.train(); does nothing without pissa_convert

At the end of training every process restores W in its base layers and replaces the adapter by that rank-2r LoRA
(alpha doubles with r, so the scaling is unchanged). The model in memory then computes what it did, in the form a
user loads: `trainer.save_model()` writes to `output_dir` a plain LoRA adapter (adapter_config.json says
r = 2 x lora_rank) that chat, export and `adapter_name_or_path` put on `model_name_or_path` like any other.
Checkpoints (checkpoint-N) stay in PiSSA form, so a run resumes from them exactly; a resumed run rebuilds the same
starting adapter because the decomposition is deterministic (the exact SVD) or seeded by `seed` (the fast one).
"""

import copy
import logging
from typing import TYPE_CHECKING

from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from tunelab.config import Config

if TYPE_CHECKING:
    import torch
    from peft import PeftModel

logger = logging.getLogger(__name__)

ADAPTER = "default"


def add_pissa_conversion(trainer: Trainer, config: Config) -> None:
    """With `pissa_convert` on a fresh PiSSA adapter: remember the adapter's starting value now, and convert the
    trained one when training ends."""
    if not (config.pissa_init and config.pissa_convert):
        return
    if config.adapter_name_or_path and not config.create_new_adapter:
        # A continued adapter did not start from PiSSA here (the model layer warned): there is nothing to convert.
        return
    from peft import PeftModel, get_peft_model_state_dict

    # The trainer's model may wrap the peft model (the rm stage's ValueHeadModel).
    peft_model = next(module for module in trainer.model.modules() if isinstance(module, PeftModel))
    initial = {key: value.detach().clone() for key, value in get_peft_model_state_dict(peft_model).items()}
    trainer.add_callback(PissaConvertCallback(peft_model, initial))


class PissaConvertCallback(TrainerCallback):
    """Converts the PiSSA adapter to a plain LoRA adapter on the original weights when training ends."""

    def __init__(self, peft_model: "PeftModel", initial: dict[str, "torch.Tensor"]) -> None:
        self.peft_model = peft_model
        self.initial = initial

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        convert_pissa_to_lora(self.peft_model, self.initial)
        rank = self.peft_model.peft_config[ADAPTER].r
        logger.info("pissa_convert: the adapter is now a plain LoRA adapter of rank %d on the original weights; "
                    "it is what output_dir receives", rank)


def convert_pissa_to_lora(peft_model: "PeftModel", initial: dict[str, "torch.Tensor"]) -> None:
    """Restore W = W_res + s * B0 A0 in the base layers and replace the adapter by A' = [A; A0], B' = [B, -B0].

    `initial` is `get_peft_model_state_dict(peft_model)` as it was before training.
    """
    import torch
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from peft.tuners.lora import LoraLayer

    trained = get_peft_model_state_dict(peft_model, adapter_name=ADAPTER)
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if not isinstance(module, LoraLayer) or ADAPTER not in module.lora_A:
                continue
            a0, b0 = initial[f"{name}.lora_A.weight"].float(), initial[f"{name}.lora_B.weight"].float()
            weight = module.get_base_layer().weight
            # In float32, then rounded once to the base's dtype.
            weight.copy_((weight.float() + module.scaling[ADAPTER] * (b0 @ a0)).to(weight.dtype))

    converted = {}
    for key, value in trained.items():
        if ".lora_A." in key:
            converted[key] = torch.cat([value, initial[key].to(value.dtype)], dim=0)
        elif ".lora_B." in key:
            converted[key] = torch.cat([value, -initial[key].to(value.dtype)], dim=1)
        else:
            # Modules trained in full beside the adapter (additional_target, resized embeddings) are kept as trained.
            converted[key] = value

    lora_config = copy.deepcopy(peft_model.peft_config[ADAPTER])
    lora_config.r *= 2
    # Keep the scaling: alpha / r, or alpha / sqrt(r) with rsLoRA.
    lora_config.lora_alpha *= 2 ** 0.5 if lora_config.use_rslora else 2
    lora_config.init_lora_weights = True
    # The adapter must keep its name, "default", which save_pretrained writes at the top of the folder (any other
    # goes to a subfolder). peft has no rename and refuses a model with no adapter at all while modules are trained
    # beside it, so a placeholder holds the place while "default" is deleted and added again at rank 2r.
    placeholder = "pissa_converting"
    peft_model.add_adapter(placeholder, lora_config)
    peft_model.set_adapter(placeholder)
    peft_model.delete_adapter(ADAPTER)
    peft_model.add_adapter(ADAPTER, lora_config)
    set_peft_model_state_dict(peft_model, converted, adapter_name=ADAPTER)
    peft_model.set_adapter(ADAPTER)
    peft_model.delete_adapter(placeholder)
