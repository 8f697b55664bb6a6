"""Log-probabilities of given tokens under a causal LM's logits: what every preference and RL loss is built from.

    per_token = token_logprobs(logits, labels)           # [batch, seq]: log p(label_t | tokens < t), 0 where masked
    total, count = sequence_logprobs(logits, labels)      # [batch] sums over the trained tokens, and their counts

`labels` are aligned with the inputs, as the data layer emits them (-100 where nothing is scored); the shift by one
position (logits at t predict the token at t + 1) happens here and nowhere else.
"""

import torch

from tunelab.data.processing import IGNORE_INDEX


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p of each label given the tokens before it, in float32; 0 at positions with IGNORE_INDEX.

    The result has labels' shape: position t holds the log-probability of labels[t], taken from logits[t - 1];
    position 0 (nothing before it) is always 0.
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    safe_targets = targets.masked_fill(~mask, 0)
    rows = []
    # One sequence at a time, in float32: a float copy of a whole batch of logits over a 128k vocabulary would be
    # the largest tensor of the step, and half-precision logits lose the small differences the losses compare.
    for row_logits, row_targets in zip(logits[:, :-1], safe_targets):
        row_logits = row_logits.float()
        picked = row_logits.gather(-1, row_targets.unsqueeze(-1)).squeeze(-1)
        rows.append(picked - torch.logsumexp(row_logits, dim=-1))
    return torch.nn.functional.pad(torch.stack(rows) * mask, (1, 0))


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the label log-probabilities, number of labelled tokens) per sequence."""
    counts = (labels[:, 1:] != IGNORE_INDEX).sum(dim=-1)
    return token_logprobs(logits, labels).sum(dim=-1), counts
