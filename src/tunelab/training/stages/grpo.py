"""Group-relative policy optimisation (GRPO, Shao et al. 2024) on the rollout loop both RL stages share
(`training/rollout.py`): no value head, the baseline is the group of completions of the same prompt.

    tunelab train examples/smollm2_lora_grpo.yaml

Each step (one round): every process takes per_device_train_batch_size x gradient_accumulation_steps prompts,
samples `num_generations` completions of each (a group) and scores them with `reward_funcs` and/or `reward_model`.
A completion's advantage is its score's distance from its group's mean in units of the group's standard deviation,
(r - mean) / (std + 1e-4) (std with Bessel's correction, as TRL computes it): only differences within a group teach.
Then `grpo_iterations` passes over the round, each one optimizer step over gradient_accumulation_steps micro-batches
of per_device_train_batch_size groups.

Loss per completion token: -min(ratio x A, clip(ratio, 1 - grpo_epsilon, 1 + grpo_epsilon) x A), ratio = p / p_old
with p_old from sampling time (with one iteration that is p itself, detached; with more, a no-grad pass right after
sampling), plus grpo_beta x the k3 estimate of the KL to the reference, exp(ref - logp) - (ref - logp) - 1 (never
negative, unbiased). The loss is the mean over every completion token of the micro-batch (token-level, as DAPO and
TRL's default do) rather than a mean per completion, which would give each token of a short completion more weight
and so punish long bad completions less. `grpo_beta: 0` uses no reference and loads none.

Logged: reward, reward_std (the mean within-group std: 0 means nothing to learn from), rewards/<source>, kl,
completion_length, clip_ratio, loss, grad_norm, lr.
"""

from typing import Any

import torch

from tunelab.config import Config
from tunelab.training.rollout import RolloutTrainer, run_rollout_stage
from tunelab.training.rollout_types import Rollout, masked_mean

#: Keeps a group whose completions all scored the same at advantage 0 instead of 0 / 0.
STD_EPSILON = 1e-4


def run(config: Config) -> dict[str, Any]:
    return run_rollout_stage(config, GRPOTrainer)


class GRPOTrainer(RolloutTrainer):
    plot_keys = ("loss", "reward", "kl", "completion_length")

    @property
    def completions_per_prompt(self) -> int:
        return self.config.num_generations

    @property
    def passes(self) -> int:
        return self.config.grpo_iterations

    @classmethod
    def uses_reference(cls, config: Config) -> bool:
        return config.grpo_beta > 0

    @torch.no_grad()
    def experience(self, rollout: Rollout, scores: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        groups = scores.view(-1, self.completions_per_prompt)
        advantages = (groups - groups.mean(dim=1, keepdim=True)) / (groups.std(dim=1, keepdim=True) + STD_EPSILON)
        tensors = {"advantages": advantages.flatten()}
        if self.passes > 1:
            tensors["old_logprobs"] = self.no_grad_logprobs(self.accelerator.unwrap_model(self.model), rollout)
        if self.config.grpo_beta > 0:
            tensors["ref_logprobs"] = self.reference_logprobs(rollout)
        metrics = {"reward_std": groups.std(dim=1).mean().item(),
                   "completion_length": rollout.completion_mask.sum(dim=1).float().mean().item()}
        return tensors, metrics

    def loss(self, rollout: Rollout, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        logprobs = self.forward_logprobs(self.model, rollout)[0]
        mask = rollout.completion_mask.float()
        ratio = torch.exp(logprobs - tensors.get("old_logprobs", logprobs.detach()))
        clipped_ratio = ratio.clamp(1 - self.config.grpo_epsilon, 1 + self.config.grpo_epsilon)
        advantages = tensors["advantages"].unsqueeze(1)
        per_token = -torch.min(ratio * advantages, clipped_ratio * advantages)
        metrics = {"clip_ratio": masked_mean((clipped_ratio * advantages < ratio * advantages).float(), mask).item()}
        if self.config.grpo_beta > 0:
            delta = tensors["ref_logprobs"] - logprobs
            kl = torch.exp(delta) - delta - 1
            per_token = per_token + self.config.grpo_beta * kl
            metrics["kl"] = masked_mean(kl, mask).item()
        loss = masked_mean(per_token, mask)
        return loss, {"loss": loss.item(), **metrics}
