"""Proximal policy optimisation with a value head: the classic RLHF recipe, as TRL's former PPOTrainer and
LLaMA-Factory ran it, in our own code on the rollout loop both RL stages share (`training/rollout.py`).

    tunelab train examples/smollm2_lora_ppo.yaml

Each step (one round): every process samples completions of per_device_train_batch_size x
gradient_accumulation_steps x ppo_buffer_size prompts and scores them with `reward_model` (an rm adapter on the
policy's base, a separate rm model, or a reward server; `reward_funcs` add to it). Then `ppo_epochs` passes over them
in shuffled micro-batches of per_device_train_batch_size, an optimizer step every gradient_accumulation_steps.

What a scored rollout becomes:

* scores: as given, or with `ppo_score_norm` normalised by the running mean and std of every score so far (all
  processes), as LLaMA-Factory does;
* per-token rewards: -kl_coef x (log p_policy - log p_reference) on every completion token, plus the score on the
  last one; with `ppo_whiten_rewards` scaled to variance 1;
* advantages by GAE (gamma 1, lambda 0.95) on the value head's estimates, then whitened; returns = advantages +
  values;
* loss = clipped policy surrogate (ratio clipped to 1 +- 0.2) + 0.1 x clipped value loss (new values kept within
  0.2 of the rollout's), each a mean over completion tokens;
* after each round kl_coef (from 0.2) moves towards `ppo_target` (Ziegler et al. 2019): it is multiplied by
  1 + clip(kl / ppo_target - 1, -0.2, 0.2) x completions / 10000, kl being the mean over all processes.

The value head shares the policy's backbone (`ValueHeadModel`: one forward gives logits and values) and is saved
beside the policy as value_head.safetensors. Logged: reward, rewards/<source>, kl (per completion, summed over its
tokens), kl_coef, loss, policy_loss, value_loss, clipfrac, response_length, grad_norm, lr.
"""

from typing import Any

import torch

from tunelab.config import Config
from tunelab.model.value_head import ValueHeadModel
from tunelab.training.rollout import RolloutTrainer, run_rollout_stage
from tunelab.training.rollout_types import Rollout, masked_mean, masked_whiten

GAMMA, LAMBDA = 1.0, 0.95
CLIP_RANGE, VALUE_CLIP_RANGE, VALUE_COEF = 0.2, 0.2, 0.1
KL_INIT, KL_HORIZON = 0.2, 10000


def run(config: Config) -> dict[str, Any]:
    return run_rollout_stage(config, PPOTrainer)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = GAMMA,
        lam: float = LAMBDA) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) by generalised advantage estimation; positions outside `mask` contribute nothing."""
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        running = rewards[:, t] + gamma * next_value - values[:, t] + gamma * lam * running
        advantages[:, t] = running
    return advantages, advantages + values


class ScoreStatistics:
    """Running mean and (population) variance of every score seen, merged batch by batch (Chan et al.)."""

    def __init__(self) -> None:
        self.mean, self.var, self.count = 0.0, 1.0, 0

    def update(self, scores: torch.Tensor) -> None:
        n, mean, var = scores.numel(), scores.mean().item(), scores.var(unbiased=False).item()
        total = self.count + n
        delta = mean - self.mean
        self.var = (self.var * self.count + var * n + delta ** 2 * self.count * n / total) / total
        self.mean += delta * n / total
        self.count = total

    def normalise(self, scores: torch.Tensor) -> torch.Tensor:
        return (scores - self.mean) / (self.var ** 0.5 + torch.finfo(scores.dtype).eps)


class PPOTrainer(RolloutTrainer):
    plot_keys = ("loss", "reward", "kl", "policy_loss", "value_loss")

    def __init__(self, config: Config, *args: Any, **kwargs: Any) -> None:
        self.kl_coef = KL_INIT
        self.score_statistics = ScoreStatistics()
        super().__init__(config, *args, **kwargs)

    @property
    def passes(self) -> int:
        return self.config.ppo_epochs

    @classmethod
    def prompts_per_round(cls, config: Config) -> int:
        return config.per_device_train_batch_size * config.gradient_accumulation_steps * config.ppo_buffer_size

    def wrap_policy(self, policy: torch.nn.Module) -> torch.nn.Module:
        return ValueHeadModel(policy)

    @staticmethod
    def completion_values(values: torch.Tensor, rollout: Rollout) -> torch.Tensor:
        """[N, C]: the value of the state each completion token is chosen in (the position that predicts it)."""
        width = rollout.completion_ids.shape[1]
        return values[:, -(width + 1):-1]

    @torch.no_grad()
    def experience(self, rollout: Rollout, scores: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        all_scores = self.accelerator.gather(scores)
        if self.config.ppo_score_norm:
            self.score_statistics.update(all_scores)
            scores = self.score_statistics.normalise(scores)
        model = self.accelerator.unwrap_model(self.model)
        logprobs, values = [], []
        with self.accelerator.autocast():
            for part in self.micro_batches(rollout):
                part_logprobs, out = self.forward_logprobs(model, part, return_logits=True)
                logprobs.append(part_logprobs)
                values.append(self.completion_values(out.values, part))
        logprobs, values = torch.cat(logprobs), torch.cat(values)
        mask = rollout.completion_mask.float()

        kl = (logprobs - self.reference_logprobs(rollout)) * mask
        rewards = -self.kl_coef * kl
        last = mask.sum(dim=1).long() - 1
        rewards[torch.arange(len(rollout), device=rewards.device), last] += scores
        if self.config.ppo_whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae(rewards, values, mask)
        advantages = masked_whiten(advantages, mask)

        sequence_kl = kl.sum(dim=1)
        metrics = {"kl": sequence_kl.mean().item(), "kl_coef": self.kl_coef,
                   "response_length": mask.sum(dim=1).mean().item()}
        all_kl = self.accelerator.gather(sequence_kl).mean().item()
        error = min(max(all_kl / self.config.ppo_target - 1, -0.2), 0.2)
        self.kl_coef *= 1 + error * all_scores.numel() / KL_HORIZON
        tensors = {"logprobs": logprobs, "values": values, "advantages": advantages, "returns": returns}
        return tensors, metrics

    def loss(self, rollout: Rollout, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        logprobs, out = self.forward_logprobs(self.model, rollout, return_logits=True)
        values = self.completion_values(out.values, rollout)
        mask = rollout.completion_mask.float()

        old_values, returns, advantages = tensors["values"], tensors["returns"], tensors["advantages"]
        clipped_values = old_values + (values - old_values).clamp(-VALUE_CLIP_RANGE, VALUE_CLIP_RANGE)
        value_loss = 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped_values - returns) ** 2), mask)

        ratio = torch.exp(logprobs - tensors["logprobs"])
        surrogate = -advantages * ratio
        clipped = -advantages * ratio.clamp(1 - CLIP_RANGE, 1 + CLIP_RANGE)
        policy_loss = masked_mean(torch.max(surrogate, clipped), mask)
        loss = policy_loss + VALUE_COEF * value_loss
        return loss, {"loss": loss.item(), "policy_loss": policy_loss.item(), "value_loss": value_loss.item(),
                      "clipfrac": masked_mean((clipped > surrogate).float(), mask).item()}

    def state_dict(self) -> dict[str, float]:
        stats = self.score_statistics
        return {"kl_coef": self.kl_coef, "score_mean": stats.mean, "score_var": stats.var, "score_count": stats.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.kl_coef = state["kl_coef"]
        stats = self.score_statistics
        stats.mean, stats.var, stats.count = state["score_mean"], state["score_var"], int(state["score_count"])
