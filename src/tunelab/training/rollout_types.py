"""What a rollout is, on its own: the `Rollout` rows and their masks, sampling them, their log-probabilities, and
the stream of prompts they are sampled from.

    rollout = generate(policy, prompt_ids, prompt_mask, generation_config, chunk_size)   # a Rollout
    logits = model(rollout.input_ids, rollout.attention_mask, position_ids=rollout.position_ids).logits
    logps = completion_logprobs(logits, rollout)      # [N, C]: log p of each completion token, 0 past its end

A leaf: the loop (`rollout.py`) and the reward sources (`rewards.py`) both build on it, and it imports neither.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data.distributed import DistributedSampler
from transformers import GenerationConfig, PreTrainedModel

from tunelab.data.processing import IGNORE_INDEX
from tunelab.training.logprobs import head_token_logprobs, token_logprobs


@dataclass
class Rollout:
    """Prompts (left-padded) and their sampled completions (right-padded), one row each."""

    prompt_ids: torch.Tensor        # [N, P]
    prompt_mask: torch.Tensor       # [N, P]: 0 on the left padding
    completion_ids: torch.Tensor    # [N, C]
    completion_mask: torch.Tensor   # [N, C]: 1 up to and including the first stop token

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    def __getitem__(self, rows: slice | torch.Tensor) -> "Rollout":
        return Rollout(*(getattr(self, f.name)[rows] for f in fields(self)))

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)

    @property
    def position_ids(self) -> torch.Tensor:
        # Real tokens only are counted, as generate() counts them, so a left-padded prompt sits where it would alone.
        return (self.attention_mask.cumsum(dim=1) - 1).clamp(min=0)


def completion_mask(completion_ids: torch.Tensor, stop_ids: list[int]) -> torch.Tensor:
    """1 on each completion's tokens up to and including its first stop token, 0 after it."""
    is_stop = torch.isin(completion_ids, torch.tensor(stop_ids, device=completion_ids.device)).long()
    stops_before = is_stop.cumsum(dim=1) - is_stop
    return (stops_before == 0).long()


@contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) inside, the previous mode after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def generate(policy: PreTrainedModel, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
             generation_config: GenerationConfig, chunk_size: int) -> Rollout:
    """Sample one completion per (left-padded) prompt row, `chunk_size` rows at a time, in eval mode."""
    pieces = []
    with evaluating(policy):
        for start in range(0, len(prompt_ids), chunk_size):
            out = policy.generate(input_ids=prompt_ids[start:start + chunk_size],
                                  attention_mask=prompt_mask[start:start + chunk_size],
                                  generation_config=generation_config)
            pieces.append(out[:, prompt_ids.shape[1]:])
    width = max(piece.shape[1] for piece in pieces)
    completion_ids = torch.cat([F.pad(piece, (0, width - piece.shape[1]), value=generation_config.pad_token_id)
                                for piece in pieces])
    mask = completion_mask(completion_ids, generation_config.eos_token_id)
    # Columns past the longest completion hold nothing but padding.
    width = int(mask.sum(dim=1).max())
    return Rollout(prompt_ids, prompt_mask, completion_ids[:, :width], mask[:, :width])


def completion_logprobs(states: torch.Tensor, rollout: Rollout, temperature: float = 1.0,
                        head: torch.nn.Module | None = None) -> torch.Tensor:
    """[N, C] log p of each completion token, 0 past each completion's end.

    `states` are a model's logits for `rollout.input_ids`, or only its last C + 1 positions (`logits_to_keep`); or,
    with the model's output `head`, its final hidden states there (`logprobs.hidden_states_out`), scored a chunk of
    positions at a time. With the sampling `temperature` they are the log-probabilities of the distribution the
    tokens were drawn from.
    """
    width = rollout.completion_ids.shape[1]
    states = states[:, -(width + 1):]
    labels = rollout.completion_ids.masked_fill(rollout.completion_mask == 0, IGNORE_INDEX)
    # The log-probability of labels[t] comes from position t - 1: lead with the last prompt position.
    labels = F.pad(labels, (1, 0), value=IGNORE_INDEX)
    if head is not None:
        return head_token_logprobs(states, head, labels, temperature)[:, 1:]
    if temperature != 1.0:
        states = states / temperature
    return token_logprobs(states, labels)[:, 1:]


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    return (values * mask).sum(dim=dim) / mask.sum(dim=dim).clamp(min=1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Scale the masked values to variance 1 (and mean 0 with `shift_mean`); 0 outside the mask."""
    mean = masked_mean(values, mask)
    whitened = (values - mean) * torch.rsqrt(masked_mean((values - mean) ** 2, mask) + 1e-8)
    return (whitened if shift_mean else whitened + mean) * mask


class PromptStream:
    """One process's prompts, round by round, from an endless run of shuffled epochs (see `rollout.py`)."""

    def __init__(self, dataset: Any, per_round: int, seed: int, rank: int, world_size: int) -> None:
        self.dataset = dataset
        self.per_round = per_round
        self.sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
        self._epoch, self._order = -1, []

    @property
    def rounds_per_epoch(self) -> float:
        return len(self.sampler) / self.per_round

    def round(self, step: int) -> dict[str, list]:
        return self.dataset[[self._index(i) for i in range(step * self.per_round, (step + 1) * self.per_round)]]

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.sampler))
        if epoch != self._epoch:
            self.sampler.set_epoch(epoch)
            self._epoch, self._order = epoch, list(self.sampler)
        return self._order[offset]
