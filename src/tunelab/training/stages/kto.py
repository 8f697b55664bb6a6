"""Kahneman-Tversky optimisation: learn from single replies marked desirable or undesirable (no pairs needed).

    tunelab train examples/smollm2_lora_kto.yaml

Each row is a sample (its `kto_tag` says desirable or not) and its KL pair: the sample's prompt with another
sample's reply (built by the data layer). The policy scores the samples with gradients and the KL pairs without;
the reference (as in dpo: `ref_model`, the policy with its LoRA adapter off, or a frozen copy) scores both. The
mismatched pairs estimate KL(policy || reference), KTO's reference point, averaged over all processes; then
`preference_losses.kto_loss` weighs each sample by `kto_chosen_weight` or `kto_rejected_weight`, and `pref_ftx`
adds an SFT loss on the desirable replies. The loss is the mean over the batch's samples.

Logged per step (means over its batches): kl, count/chosen and count/rejected (samples of each kind per batch, over
all processes), and for each kind present rewards/* (beta x log-ratio), logps/* and logits/*; rewards/margins when
both kinds are.
"""

from typing import Any

import torch

from tunelab.config import Config
from tunelab.training.callbacks import TrainerLogCallback
from tunelab.training.logprobs import reply_logprobs
from tunelab.training.preference_losses import kto_loss
from tunelab.training.stages.dpo import SEQUENCE_COLUMNS, PreferenceTrainer, prepare_run
from tunelab.training.workflow import train_and_report

PLOT_KEYS = ("loss", "eval_loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "kl")


class KTOTrainer(PreferenceTrainer):
    """The kto stage's trainer: batches from the plain DataCollator (samples, KL pairs, kto_tags)."""

    def __init__(self, *args: Any, config: Config, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.beta = config.pref_beta
        self.ftx = config.pref_ftx
        self.chosen_weight = config.kto_chosen_weight
        self.rejected_weight = config.kto_rejected_weight

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, dict]:
        samples = {name: inputs[name] for name in SEQUENCE_COLUMNS}
        kl_pairs = {name: inputs[f"kl_{name}"] for name in SEQUENCE_COLUMNS}
        desirable = inputs["kto_tags"].bool()

        logps, counts, mean_logits = reply_logprobs(model, samples)
        with torch.no_grad():
            # The KL estimate is a reference point, not trained through: no gradients, and the model outside any
            # DDP wrapper (a forward through DDP prepares gradient synchronisation).
            policy_kl = reply_logprobs(self.accelerator.unwrap_model(model), kl_pairs).sums
            kl = self.accelerator.reduce((policy_kl - self.reference_logprobs(model, kl_pairs)).mean(),
                                         reduction="mean")
        logratios = logps - self.reference_logprobs(model, samples)
        losses = kto_loss(logratios, desirable, kl, self.beta, self.chosen_weight, self.rejected_weight)
        if self.ftx > 0:
            losses = losses - self.ftx * desirable * logps / counts.clamp(min=1)

        self.record({"kl": kl.clamp(min=0),
                     **self._group_metrics(desirable, {"rewards": self.beta * logratios.detach(),
                                                       "logps": logps.detach(),
                                                       "logits": mean_logits})})
        loss = losses.mean()
        return (loss, {"loss": loss}) if return_outputs else loss

    def _group_metrics(self, desirable: torch.Tensor, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """count/chosen, count/rejected, and the mean of each value over each kind present, over all processes.

        Summed across processes first, so every process records the same metric names even when its own batch
        lacks one kind (MetricsTrainer averages the names position by position across processes).
        """
        groups = {"chosen": desirable, "rejected": ~desirable}
        sums = torch.stack([torch.stack([group.sum().float(), *((v * group).sum() for v in values.values())])
                            for group in groups.values()])
        sums = self.accelerator.reduce(sums, reduction="sum")
        metrics = {}
        for (kind, _), (count, *totals) in zip(groups.items(), sums):
            metrics[f"count/{kind}"] = count
            if count > 0:
                metrics.update({f"{name}/{kind}": total / count for name, total in zip(values, totals)})
        if "rewards/chosen" in metrics and "rewards/rejected" in metrics:
            metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
        return metrics


def run(config: Config) -> dict[str, Any]:
    prepared = prepare_run(config, needs_reference=True)
    trainer = KTOTrainer(model=prepared.model, reference=prepared.reference, config=config, args=prepared.args,
                         train_dataset=prepared.splits.train, eval_dataset=prepared.splits.eval,
                         data_collator=prepared.collator, processing_class=prepared.tokenizer,
                         callbacks=[TrainerLogCallback()])
    return train_and_report(trainer, config, prepared.resume_from, PLOT_KEYS)
