"""Log-probabilities of given tokens under a causal LM: what every preference and RL loss is built from.

    per_token = token_logprobs(logits, labels)           # [batch, seq]: log p(label_t | tokens < t), 0 where masked
    total, count = sequence_logprobs(logits, labels)      # [batch] sums over the trained tokens, and their counts
    scored = reply_logprobs(model, rows)                  # the same sums without the [tokens, vocabulary] logits
    with hidden_states_out(model) as head:                # ppo, grpo: per token, at the sampling temperature
        hidden = model(**inputs).logits
    per_token = head_token_logprobs(hidden, head, labels, temperature)

`labels` are aligned with the inputs, as the data layer emits them (-100 where nothing is scored); the shift by one
position (logits at t predict the token at t + 1) happens here and nowhere else.

Memory: a model's logits are [batch, tokens, vocabulary] floats, with Qwen's 151,936-word vocabulary the largest
tensors of a step by far (and again as their gradient). `reply_logprobs` lets the forward stop at the final hidden
states and applies the output head only at the scored positions, a few dozen at a time, computing each chunk's
logits again in the backward pass instead of keeping them: memory no longer grows with the vocabulary.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any, NamedTuple

import torch
from torch.utils.checkpoint import checkpoint

from tunelab.data.processing import IGNORE_INDEX
from tunelab.training.chunked_loss import CHUNK_ELEMENTS, HeadChunks

#: Config fields of families whose logits are more than head(hidden) (soft-capped, scaled): they keep whole logits.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


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


def mean_reply_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row, the mean logit (over the vocabulary) at the positions that predict a reply token."""
    mask = labels[:, 1:] != IGNORE_INDEX
    per_position = logits[:, :-1].detach().mean(dim=-1, dtype=torch.float32)
    return (per_position * mask).sum(dim=-1) / mask.sum(dim=-1).clamp(min=1)


class ReplyLogprobs(NamedTuple):
    """Per row: the summed log-probabilities of the labelled tokens, their number, and the mean logit (over the
    vocabulary, detached) at the positions that predict them."""

    sums: torch.Tensor
    counts: torch.Tensor
    mean_logits: torch.Tensor


def reply_logprobs(model: torch.nn.Module, rows: dict[str, torch.Tensor]) -> ReplyLogprobs:
    """The rows' labels scored by `model` (wrapped by DDP or DeepSpeed, peft or not); every input but the labels goes
    in (a vision-language model's pixel values, grids and token types too), without a KV cache."""
    inputs = {name: value for name, value in rows.items() if name != "labels"}
    labels = rows["labels"]
    with hidden_states_out(model) as head:
        output = model(**inputs, use_cache=False).logits
    if head is None:
        sums, counts = sequence_logprobs(output, labels)
        return ReplyLogprobs(sums, counts, mean_reply_logits(output, labels))
    return head_logprobs(output, head, labels)


class _HiddenStatesThrough(torch.nn.Module):
    """Stands in for the output head during a forward and returns the hidden states. The head stays its child, so
    its parameters stay where DDP and ZeRO-3 registered them, and it runs later on the positions that matter."""

    def __init__(self, head: torch.nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


@contextmanager
def hidden_states_out(model: torch.nn.Module) -> Iterator[torch.nn.Module | None]:
    """Inside, the model's forward gives its final hidden states as `.logits`; yields the output head. Yields None
    and changes nothing for a model whose logits are more than head(hidden), which has no `lm_head`, whose head
    is sharded (DeepSpeed ZeRO-3, FSDP), or whose head DDP trains."""
    causal_lm = model
    while hasattr(causal_lm, "module"):   # DDP, a DeepSpeed engine
        causal_lm = causal_lm.module
    causal_lm = getattr(causal_lm, "pretrained_model", causal_lm)   # ppo's ValueHeadModel
    if hasattr(causal_lm, "get_base_model"):   # peft
        causal_lm = causal_lm.get_base_model()
    text_config = causal_lm.config.get_text_config()
    head = getattr(causal_lm, "lm_head", None)
    # DDP's reducer expects each trained weight's gradient once per backward, from its own forward: a trained head
    # run after that forward is refused ("marked ready twice"), so under DDP only a frozen head is split off.
    ddp_trains_head = (isinstance(model, torch.nn.parallel.DistributedDataParallel) and head is not None
                       and any(param.requires_grad for param in head.parameters()))
    if (head is None or ddp_trains_head or any(getattr(text_config, name, None) for name in LOGIT_TRANSFORMS)
            or any(_sharded(param) for param in head.parameters())):
        yield None
        return
    causal_lm.lm_head = _HiddenStatesThrough(head)
    try:
        yield head
    finally:
        causal_lm.lm_head = head


def _sharded(param: torch.nn.Parameter) -> bool:
    """A head sharded by ZeRO-3 (`ds_id`) or FSDP (a DTensor) is whole only inside the engine's forward, not when
    its chunks are recomputed in the backward pass: such a model keeps whole logits."""
    return hasattr(param, "ds_id") or hasattr(param, "to_local")


def head_logprobs(hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor) -> ReplyLogprobs:
    """`ReplyLogprobs` from final hidden states [batch, tokens, hidden] and the output head, which runs only at the
    positions that predict a label, CHUNK_ELEMENTS logits at a time, each chunk recomputed in the backward pass."""
    rows, _, logprobs, means = _scored_positions(hidden, head, labels)
    batch = labels.shape[0]
    counts = torch.zeros(batch, dtype=torch.long, device=labels.device).index_add_(0, rows, torch.ones_like(rows))
    sums = torch.zeros(batch, dtype=torch.float32, device=hidden.device).index_add(0, rows, logprobs)
    mean_logits = torch.zeros(batch, dtype=torch.float32, device=hidden.device).index_add(0, rows, means)
    return ReplyLogprobs(sums, counts, mean_logits / counts.clamp(min=1))


def head_token_logprobs(hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor,
                        temperature: float = 1.0) -> torch.Tensor:
    """`token_logprobs` (of logits / temperature) from final hidden states and the output head, as head_logprobs
    computes them."""
    rows, columns, logprobs, _ = _scored_positions(hidden, head, labels, temperature)
    per_token = torch.zeros(labels.shape, dtype=torch.float32, device=hidden.device)
    return per_token.index_put((rows, columns + 1), logprobs)


def _scored_positions(hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor,
                      temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row, column) of each position that predicts a label, its label's log-probability and its mean logit."""
    targets = labels[:, 1:]
    rows, columns = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    picked_hidden, picked_targets = hidden[:, :-1][rows, columns], targets[rows, columns]
    if type(head) is torch.nn.Linear:
        # The chunks' buffers made out here, where the dry run sees them.
        chunks = HeadChunks(picked_hidden, head.weight, head.bias, temperature)
        logprobs, means = _HeadLogprobs.apply(picked_hidden, head.weight, head.bias, chunks, picked_targets)
        return rows, columns, logprobs, means
    # A head that is more than a Linear (peft's LoRA or modules_to_save on it): autograd, each chunk recomputed.
    size = max(1, CHUNK_ELEMENTS // getattr(head, "out_features", 2**17))
    score = partial(_score_chunk, head, temperature)
    pieces = [checkpoint(score, picked_hidden[start:start + size], picked_targets[start:start + size],
                         use_reentrant=False) for start in range(0, len(picked_targets), size)]
    logprobs = torch.cat([p[0] for p in pieces]) if pieces else picked_hidden.sum(-1).float()
    means = torch.cat([p[1] for p in pieces]) if pieces else logprobs.detach()
    return rows, columns, logprobs, means


def _score_chunk(head: torch.nn.Module, temperature: float, hidden: torch.Tensor,
                 targets: torch.Tensor) -> tuple[Any, Any]:
    weight_dtype = next(head.parameters()).dtype
    logits = head(hidden.to(weight_dtype)).float()
    if temperature != 1.0:
        logits = logits / temperature
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1), logits.detach().mean(dim=-1)


class _HeadLogprobs(torch.autograd.Function):
    """log p(target) and the mean logit (without gradient) at N positions, from their hidden states and a Linear head
    (`HeadChunks`). Only the log-sum-exp of each position is kept for the backward pass, which computes each chunk's
    logits again and turns them in place into the gradient: (onehot(target) - softmax) x the position's upstream
    gradient."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, chunks: HeadChunks,
                targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logprobs = hidden.new_empty(len(targets), dtype=torch.float32)
        means, logsumexp = torch.empty_like(logprobs), torch.empty_like(logprobs)
        for rows, logits in chunks:
            logsumexp[rows] = chunks.logsumexp_(logits)
            means[rows] = logits.mean(dim=-1)
            logprobs[rows] = logits.gather(-1, targets[rows].unsqueeze(-1)).squeeze(-1) - logsumexp[rows]
        ctx.save_for_backward(hidden, weight, bias, targets, logsumexp)
        # The backward pass runs outside autocast: it recomputes the logits in the forward's dtype, or the
        # softmax would not match the log-sum-exp kept.
        ctx.temperature, ctx.dtype = chunks.temperature, chunks.dtype
        ctx.mark_non_differentiable(means)
        return logprobs, means

    @staticmethod
    def backward(ctx: Any, grad_logprobs: torch.Tensor, _grad_means: torch.Tensor) -> tuple[Any, ...]:
        hidden, weight, bias, targets, logsumexp = ctx.saved_tensors
        wants_hidden, wants_weight, wants_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if wants_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if wants_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if wants_bias else None
        chunks = HeadChunks(hidden, weight, bias, ctx.temperature, ctx.dtype)
        for rows, logits in chunks:
            upstream = grad_logprobs[rows].float().unsqueeze(-1)
            gradient = logits.sub_(logsumexp[rows].unsqueeze(-1)).exp_().mul_(-upstream)   # -softmax x upstream
            gradient.scatter_add_(-1, targets[rows].unsqueeze(-1), upstream)
            chunks.backpropagate(rows, gradient, grad_hidden, grad_weight, grad_bias)
        return (grad_hidden, grad_weight.to(weight.dtype) if wants_weight else None,
                grad_bias.to(bias.dtype) if wants_bias else None, None, None)
