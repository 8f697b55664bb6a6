"""A Trainer that logs a stage's own per-batch metrics (rewards, accuracies, log-probabilities) with its loss.

A stage's `compute_loss` calls `self.record({"rewards/chosen": tensor, ...})` on every batch; each log line then
carries the mean of every metric over the batches since the previous line, averaged over all processes. Batches
seen in evaluation are logged with the `eval_` prefix, in the evaluation's own line and in eval_results.json.
Its checkpoints are saved as `checkpoints.py` says: complete or not counted, and a full disk reported in one line.
"""

from collections import defaultdict

import torch

from tunelab.training.checkpoints import CheckpointingTrainer


class MetricsTrainer(CheckpointingTrainer):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # split ("train" or "eval") -> metric name -> one value per batch since the last log line.
        self._recorded: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}

    def record(self, metrics: dict[str, torch.Tensor | float]) -> None:
        split = "train" if self.model.training else "eval"
        for name, value in metrics.items():
            self._recorded[split][name].append(float(value.detach().float().mean() if torch.is_tensor(value)
                                                     else value))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Every process calls log() at the same steps, so the reduction below lines up across them.
        split = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        recorded = self._recorded[split]
        if recorded:
            names = sorted(recorded)
            means = torch.tensor([sum(recorded[n]) / len(recorded[n]) for n in names], device=self.args.device)
            means = self.accelerator.reduce(means, reduction="mean")
            prefix = "eval_" if split == "eval" else ""
            logs.update({prefix + name: round(value, 6) for name, value in zip(names, means.tolist())})
            recorded.clear()
        super().log(logs, start_time)
