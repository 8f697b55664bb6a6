"""Reward modeling: a causal LM with a value head learns to score the chosen reply of each pair above the rejected.

    tunelab train examples/smollm2_lora_rm.yaml

Flow: as in `sft.py` (arguments -> output_dir -> tokenizer, template, pairwise data -> model), then the model is
wrapped in a `ValueHeadModel`, whose head always trains whatever `finetuning_type` trains of the backbone.

The score of a sequence is the head's value at its last attended token; the loss is the pairwise (Bradley-Terry)
loss -log sigmoid(score_chosen - score_rejected), averaged over the pairs. Logged with it, as `eval_...` too:
`rewards/chosen`, `rewards/rejected` (mean scores), `rewards/margins` (mean difference) and `rewards/accuracies`
(share of pairs with chosen scored higher).

Outputs, as LLaMA-Factory's rm writes them: the backbone as it saves itself (a LoRA adapter, or full/freeze weights
with their config) plus `value_head.safetensors`, in output_dir and in every checkpoint. The folder is what a later
ppo/grpo run names in `reward_model:` (the adapter with `reward_model_type: lora`, a full or freeze model with
`reward_model_type: full`); a run that starts from such a folder (`adapter_name_or_path`, or `model_name_or_path`
for a full one) continues with its trained head.
"""

import logging
import os
from typing import Any

import torch
from transformers.trainer import TRAINING_ARGS_NAME

from tunelab.config import Config
from tunelab.data import PairwiseCollator
from tunelab.model import load_model
from tunelab.model.value_head import ValueHeadModel, has_value_head, last_token_scores
from tunelab.training.callbacks import TrainerLogCallback
from tunelab.training.metrics_trainer import MetricsTrainer
from tunelab.training.workflow import start_run, train_and_report

logger = logging.getLogger(__name__)

PLOT_KEYS = ("loss", "eval_loss", "rewards/accuracies", "eval_rewards/accuracies")


class RewardTrainer(MetricsTrainer):
    """Trains a ValueHeadModel with the pairwise loss, and saves and resumes it as backbone files plus its head."""

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        # Every input but the labels: a vision-language model's pixel values and grids score the image too.
        values = model(**{name: value for name, value in inputs.items() if name != "labels"}).values
        scores = last_token_scores(values, inputs["attention_mask"])
        chosen, rejected = scores.float().chunk(2)
        loss = -torch.nn.functional.logsigmoid(chosen - rejected).mean()
        self.record({"rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/margins": chosen - rejected,
                     "rewards/accuracies": (chosen > rejected).float()})
        return (loss, scores) if return_outputs else loss

    def prediction_step(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None) -> tuple[torch.Tensor, None, None]:
        # The Trainer's own step computes a loss only for batches with label columns, and a pairwise batch has none.
        # Evaluation needs just the loss and the recorded metrics: no predictions to gather.
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def _save(self, output_dir: str | None = None, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        # The Trainer would write the wrapper's state dict as one file that no from_pretrained reads: save the
        # backbone its own way and the head beside it, then the tokenizer and arguments as the Trainer does.
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        self.accelerator.unwrap_model(self.model).save_pretrained(output_dir, state_dict=state_dict)
        self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        # The checkpoint holds the backbone's own files, which the Trainer knows how to load into the backbone
        # (adapter or weights), and the head, which it does not.
        wrapper = self.accelerator.unwrap_model(model if model is not None else self.model)
        super()._load_from_checkpoint(resume_from_checkpoint, model=wrapper.pretrained_model)
        wrapper.load_value_head(resume_from_checkpoint)


def run(config: Config) -> dict[str, Any]:
    start = start_run(config)
    args, resume_from, tokenizer, splits = start.args, start.resume_from, start.tokenizer, start.splits

    model = ValueHeadModel(load_model(config, tokenizer, trainable=config.do_train))
    # A head saved with the last adapter, or with a full reward model, is where this run starts (as in LLaMA-Factory).
    head_folder = (config.adapter_name_or_path or [config.model_name_or_path])[-1]
    if has_value_head(head_folder):
        model.load_value_head(head_folder)
        logger.info("value head: loaded from %s", head_folder)
    collator = PairwiseCollator(tokenizer, pad_to_multiple_of=start.pad_to_multiple_of, media=start.media)
    trainer = RewardTrainer(model=model, args=args, train_dataset=splits.train, eval_dataset=splits.eval,
                            data_collator=collator, processing_class=tokenizer, callbacks=[TrainerLogCallback()])
    return train_and_report(trainer, config, resume_from, plot_keys=PLOT_KEYS)
