"""Direct preference optimisation and its relatives: learn from pairs of a chosen and a rejected reply.

    tunelab train examples/smollm2_lora_dpo.yaml     # stage: dpo, pref_loss: sigmoid (hinge, ipo, orpo, simpo)
    tunelab train examples/smollm2_lora_orpo.yaml    # stage: orpo, the same as dpo with pref_loss: orpo

Each batch of B pairs is 2B rows, the chosen replies first (`tunelab.data.PairwiseCollator`). One forward of the
policy scores them all; one forward of the reference model (without gradients) likewise; `preference_losses` turns
the log-probs of the reply tokens into one loss per pair. The reference is `ref_model` when given; with LoRA and no
`ref_model` it is the policy with its adapter switched off (no second copy in memory); otherwise a frozen copy of
the starting model (`model.frozen.load_reference_model`). orpo and simpo need none. `pref_ftx` adds an SFT loss on
the chosen reply.

Logged per step, as LLaMA-Factory logs them: rewards/chosen, rewards/rejected (beta x log-ratio, or beta x average
log-prob for orpo and simpo), rewards/accuracies, rewards/margins, logps/*, logits/* (mean logit over the reply).

The flow is SFT's: arguments, output_dir, tokenizer and template, data, model, then also the reference, Trainer,
train and report. `PreferenceTrainer` and `prepare_run` are shared with the kto stage.
"""

import logging
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainingArguments

from tunelab.config import Config
from tunelab.config.schema import REFERENCE_LOSSES
from tunelab.data import DataCollator, DatasetSplits, PairwiseCollator
from tunelab.model import load_model
from tunelab.model.frozen import load_reference_model
from tunelab.training.callbacks import TrainerLogCallback
from tunelab.training.engines import place_frozen_model
from tunelab.training.logprobs import reply_logprobs
from tunelab.training.metrics_trainer import MetricsTrainer
from tunelab.training.preference_losses import (AVERAGED_LOSSES, dpo_hinge_loss, dpo_sigmoid_loss, ipo_loss,
                                                orpo_loss, simpo_loss)
from tunelab.training.workflow import start_run, train_and_report

logger = logging.getLogger(__name__)

#: pref_loss -> its function of (chosen, rejected): log-ratios for the reference losses, log-probs for orpo/simpo.
LOSSES = {"sigmoid": dpo_sigmoid_loss, "hinge": dpo_hinge_loss, "ipo": ipo_loss, "orpo": orpo_loss,
          "simpo": simpo_loss}
PLOT_KEYS = ("loss", "eval_loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")
SEQUENCE_COLUMNS = ("input_ids", "attention_mask", "labels")


class PreferenceTrainer(MetricsTrainer):
    """What the dpo and kto trainers share: the reference model's log-probs, dropout off, a loss in evaluation.

    `reference` is a frozen model, or None: then the policy with its LoRA adapter switched off serves as one (or,
    for orpo and simpo, none is used).
    """

    # compute_loss returns this batch's mean, so the Trainer must divide it by the gradient accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, *args: Any, reference: PreTrainedModel | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The reference is not wrapped by DDP (it has no gradients to synchronise): placed here, sharded under ZeRO-3.
        self.reference = place_frozen_model(reference, self.args) if reference is not None else None
        # Dropout makes the policy's log-probs noisy where the reference's are not, so an untrained policy would not
        # score log-ratios of 0; TRL and LLaMA-Factory switch it off for preference training too.
        dropouts = [m for model in (self.model, reference) if model is not None for m in model.modules()
                    if isinstance(m, torch.nn.Dropout) and m.p > 0]
        if dropouts:
            logger.info("preference training: %d dropout layers switched off (lora_dropout included)", len(dropouts))
        for module in dropouts:
            module.p = 0.0

    @torch.no_grad()
    def reference_logprobs(self, model: torch.nn.Module, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed log-probs of the rows' labels under the reference model."""
        if self.reference is not None:
            return reply_logprobs(self.reference, rows).sums
        from peft import PeftModel

        policy = self.accelerator.unwrap_model(model)
        # Without training (do_eval alone) the adapters are merged and nothing is left to switch off: the model is
        # the starting point, hence its own reference.
        adapter_off = policy.disable_adapter() if isinstance(policy, PeftModel) else nullcontext()
        with adapter_off:
            return reply_logprobs(policy, rows).sums

    def prediction_step(self, model: torch.nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None) -> tuple[torch.Tensor, None, None]:
        # The Trainer's own step computes a loss only for batches with its label columns; ours always has one.
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None


class DPOTrainer(PreferenceTrainer):
    """The dpo stage's trainer: batches from `PairwiseCollator`, the loss `config.pref_loss`."""

    def __init__(self, *args: Any, config: Config, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.beta = config.pref_beta
        # orpo's loss already holds an SFT term (config/rules.py refuses pref_ftx with it).
        self.ftx = config.pref_ftx
        self.uses_reference = config.pref_loss in REFERENCE_LOSSES
        self.averaged = config.pref_loss in AVERAGED_LOSSES
        extra = {"sigmoid": {"label_smoothing": config.dpo_label_smoothing},
                 "simpo": {"gamma": config.simpo_gamma}}.get(config.pref_loss, {})
        self.loss_fn = partial(LOSSES[config.pref_loss], beta=config.pref_beta, **extra)

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, dict]:
        sums, counts, mean_logits = reply_logprobs(model, inputs)
        counts = counts.clamp(min=1)
        averages = sums / counts
        policy = averages if self.averaged else sums
        scores = policy
        if self.uses_reference:
            reference = self.reference_logprobs(model, inputs)
            scores = policy - (reference / counts if self.averaged else reference)
        chosen, rejected = scores.chunk(2)
        losses = self.loss_fn(chosen, rejected)
        if self.ftx > 0:
            losses = losses - self.ftx * averages.chunk(2)[0]

        rewards_chosen, rewards_rejected = (self.beta * scores.detach()).chunk(2)
        logps_chosen, logps_rejected = policy.detach().chunk(2)
        logits_chosen, logits_rejected = mean_logits.chunk(2)
        self.record({"rewards/chosen": rewards_chosen, "rewards/rejected": rewards_rejected,
                     "rewards/accuracies": (rewards_chosen > rewards_rejected).float(),
                     "rewards/margins": rewards_chosen - rewards_rejected,
                     "logps/chosen": logps_chosen, "logps/rejected": logps_rejected,
                     "logits/chosen": logits_chosen, "logits/rejected": logits_rejected})
        loss = losses.mean()
        return (loss, {"loss": loss}) if return_outputs else loss


@dataclass
class PreparedRun:
    """Everything a preference stage builds before its Trainer."""

    args: TrainingArguments
    resume_from: str | None
    tokenizer: PreTrainedTokenizerBase
    splits: DatasetSplits
    model: PreTrainedModel
    reference: PreTrainedModel | None     # None: no reference, or the policy with its adapter switched off
    collator: DataCollator


def prepare_run(config: Config, needs_reference: bool) -> PreparedRun:
    start = start_run(config)
    args, resume_from, tokenizer, splits = start.args, start.resume_from, start.tokenizer, start.splits

    model = load_model(config, tokenizer, trainable=config.do_train)
    model.config.use_cache = False
    reference = load_reference_model(config, tokenizer) if needs_reference else None
    collator = DataCollator(tokenizer, pad_to_multiple_of=start.pad_to_multiple_of, media=start.media)
    return PreparedRun(args, resume_from, tokenizer, splits, model, reference, collator)


def run(config: Config) -> dict[str, Any]:
    prepared = prepare_run(config, needs_reference=config.pref_loss in REFERENCE_LOSSES)
    trainer = DPOTrainer(model=prepared.model, reference=prepared.reference, config=config, args=prepared.args,
                         train_dataset=prepared.splits.train, eval_dataset=prepared.splits.eval,
                         data_collator=PairwiseCollator(prepared.collator.tokenizer,
                                                        prepared.collator.pad_to_multiple_of,
                                                        prepared.collator.media),
                         processing_class=prepared.tokenizer,
                         callbacks=[TrainerLogCallback()])
    return train_and_report(trainer, config, prepared.resume_from, PLOT_KEYS)
