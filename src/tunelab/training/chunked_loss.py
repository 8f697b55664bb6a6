"""Cross-entropy through the output head, a few dozen positions at a time: the [tokens, vocabulary] logits of a batch
never exist at once, and positions without a label never reach the head.

    total, kl_total = head_cross_entropy(hidden, head, targets)        # hidden [N, hidden_size], targets [N]

`hidden` are the final hidden states at the N positions that predict a trained token. For each chunk of them the
head's logits are computed, the loss taken, and, in the same pass, the gradient with respect to those logits turned
into gradients for the hidden states and the head's weight; then the chunk's logits are dropped. The backward pass
only scales what the forward already computed. So a step does the head's three matmuls once per trained position,
as the unchunked loss does for every position, and holds one chunk's logits instead of all of them.

The gradient of a cross-entropy with respect to its logits is softmax(logits) - onehot(target); a token weighted by a
constant w (DFT, EAFT: computed from the logits without gradient) scales it by w; ASFT's alpha x KL(q || p) adds
alpha x (softmax(logits) - q), q the reference's distribution at that position.
"""

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

#: Float32 logits a chunk may hold (16 MiB): 27 positions at a time with a 152k vocabulary, 85 with a 49k one.
CHUNK_ELEMENTS = 2**22

#: fn(log_probabilities [n, vocab] float32, cross_entropy [n]) -> a constant weight per token, or None for weight 1.
TokenWeights = Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None]


def token_losses(token_logits: torch.Tensor, targets: torch.Tensor, weigh: TokenWeights | None = None,
                 reference_logits: torch.Tensor | None = None, alpha: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: w x cross-entropy (+ alpha x KL(reference || policy)), and the KL (zeros without a reference).

    Differentiable through `token_logits` by autograd: the path for models whose whole logits are kept."""
    log_p = token_logits.float().log_softmax(dim=-1)
    cross_entropy = -log_p.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    weights = weigh(log_p.detach(), cross_entropy.detach()) if weigh is not None else None
    losses = cross_entropy * weights if weights is not None else cross_entropy
    if reference_logits is None:
        return losses, torch.zeros_like(losses).detach()
    log_q = reference_logits.float().log_softmax(dim=-1)
    kl = (log_q.exp() * (log_q - log_p)).sum(dim=-1)
    return losses + alpha * kl, kl.detach()


def head_cross_entropy(hidden: torch.Tensor, head: torch.nn.Linear, targets: torch.Tensor,
                       weigh: TokenWeights | None = None, reference: tuple[torch.Tensor, torch.nn.Linear] | None = None,
                       alpha: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over the N positions of `token_losses`, sum of their KL) for logits = head(hidden), in chunks.

    `reference` is (its hidden states at the same positions, its head), without gradient, for ASFT's KL term."""
    reference_hidden, reference_head = reference if reference is not None else (None, None)
    inputs = [hidden.to(head.weight.dtype), head.weight, head.bias]
    if not torch.is_grad_enabled():   # evaluation: the same values, and no gradient work in the forward
        inputs = [t.detach() if t is not None else None for t in inputs]
    return _HeadCrossEntropy.apply(*inputs, targets, weigh, reference_hidden, reference_head, alpha)


class _HeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, weigh: TokenWeights | None, reference_hidden: torch.Tensor | None,
                reference_head: torch.nn.Linear | None, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
        wants_hidden, wants_weight, wants_bias = ctx.needs_input_grad[:3]
        wants_any = wants_hidden or wants_weight or wants_bias
        grad_hidden = torch.empty_like(hidden) if wants_hidden else None
        # float32 sums for the head's gradients: each adds up every chunk.
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if wants_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if wants_bias else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        kl_total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        size = max(1, CHUNK_ELEMENTS // weight.shape[0])
        for start in range(0, len(targets), size):
            rows = slice(start, start + size)
            chunk_targets = targets[rows]
            positions = torch.arange(len(chunk_targets), device=targets.device)
            log_p = F.linear(hidden[rows], weight, bias).float().log_softmax(dim=-1)
            cross_entropy = -log_p[positions, chunk_targets]
            weights = weigh(log_p, cross_entropy) if weigh is not None else None
            total += (cross_entropy * weights).sum() if weights is not None else cross_entropy.sum()
            log_q = None
            if reference_head is not None:
                log_q = reference_head(reference_hidden[rows].to(reference_head.weight.dtype)).float().log_softmax(-1)
                kl = (log_q.exp() * (log_q - log_p)).sum(dim=-1)
                total += alpha * kl.sum()
                kl_total += kl.sum()
            if not wants_any:
                continue
            # d/dlogits of w x CE + alpha x KL(q || p): w x (p - onehot) + alpha x (p - q), built in place in p.
            gradient = log_p.exp_()
            if log_q is not None:
                gradient.mul_((weights.unsqueeze(-1) if weights is not None else 1.0) + alpha)
                gradient.sub_(alpha * log_q.exp_())
            elif weights is not None:
                gradient.mul_(weights.unsqueeze(-1))
            gradient[positions, chunk_targets] -= weights if weights is not None else 1.0
            gradient = gradient.to(weight.dtype)
            if wants_hidden:
                grad_hidden[rows] = gradient @ weight
            if wants_weight:
                grad_weight.addmm_(gradient.t().float(), hidden[rows].float())
            if wants_bias:
                grad_bias += gradient.float().sum(dim=0)
        ctx.save_for_backward(*(t if t is not None else torch.empty(0) for t in (grad_hidden, grad_weight, grad_bias)))
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(kl_total)
        return total, kl_total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor, _grad_kl: torch.Tensor) -> tuple[Any, ...]:
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        wants_hidden, wants_weight, wants_bias = ctx.needs_input_grad[:3]
        return (grad_hidden * grad_total.to(grad_hidden.dtype) if wants_hidden else None,
                (grad_weight * grad_total).to(ctx.weight_dtype) if wants_weight else None,
                (grad_bias * grad_total).to(ctx.weight_dtype) if wants_bias else None,
                None, None, None, None, None)
