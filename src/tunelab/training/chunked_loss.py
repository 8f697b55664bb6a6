"""Cross-entropy through the output head, a few dozen positions at a time: the [tokens, vocabulary] logits of a batch
never exist at once, and positions without a label never reach the head.

    total, kl_total = head_cross_entropy(hidden, head, targets)        # hidden [N, hidden_size], targets [N]

`hidden` are the final hidden states at the N positions that predict a trained token. For each chunk of them the
head's logits are computed, the loss taken, and, in the same pass, the gradient with respect to those logits turned
into gradients for the hidden states and the head's weight; then the chunk's logits are dropped. The backward pass
only scales what the forward already computed. So a step does the head's three matmuls once per trained position,
as the unchunked loss does for every position, and holds one chunk's logits instead of all of them.

`HeadChunks` serves this loss and the log-probabilities of logprobs.py. Its chunks are written into the same two
buffers each time (float32 logits and a scratch of the same size): a fresh 32 MiB tensor per chunk would cost a page
fault per page, or, once glibc has raised its mmap threshold to that size, leave the freed chunks scattered over the
heap, where a dpo step on a 152k vocabulary kept about 1 GB of them. Under autocast the head's matmuls run in the
autocast dtype, as F.linear would, with the weight cast once per call instead of once per chunk.

The gradient of a cross-entropy with respect to its logits is softmax(logits) - onehot(target); a token weighted by a
constant w (DFT, EAFT: computed from the logits without gradient) scales it by w; ASFT's alpha x KL(q || p) adds
alpha x (softmax(logits) - q), q the reference's distribution at that position.
"""

from collections.abc import Callable, Iterator
from typing import Any

import torch

#: Float32 logits a chunk may hold (32 MiB): 55 positions at a time with a 152k vocabulary, 170 with a 49k one. The
#: head's matmuls run faster on taller chunks: on a 2-core CPU in float32, with a 49k vocabulary, 246 GFLOP/s at 170
#: rows against 206 at 85.
CHUNK_ELEMENTS = 2**23

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
    inputs = [hidden, head.weight, head.bias]
    if not torch.is_grad_enabled():   # evaluation: the same values, and no gradient work in the forward
        inputs = [t.detach() if t is not None else None for t in inputs]
    # Made out here, where the dry run sees its buffers (nothing that a Function's forward does shows to it).
    chunks = HeadChunks(hidden, head.weight, head.bias)
    return _HeadCrossEntropy.apply(*inputs, chunks, targets, weigh, reference_hidden, reference_head, alpha)


class HeadChunks:
    """The output head's logits at the rows of `hidden` [N, hidden_size], CHUNK_ELEMENTS at a time, as float32
    divided by `temperature`; and the gradients that a chunk's d(loss)/d(logits) gives the hidden states and the head.

        chunks = HeadChunks(hidden, head.weight, head.bias)
        for rows, logits in chunks:      # logits: [n, vocab] float32, overwritten by the next chunk
            ...
            chunks.backpropagate(rows, gradient_of_logits, grad_hidden, grad_weight, grad_bias)
    """

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 temperature: float = 1.0, dtype: torch.dtype | None = None) -> None:
        """`dtype`: of the head's matmuls; by default the autocast dtype under autocast, else the weight's."""
        device = hidden.device.type
        autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        self.dtype = dtype or autocast
        self.hidden, self.temperature = hidden, temperature
        self.weight = weight.detach().to(self.dtype)
        self.bias = bias.detach().to(self.dtype) if bias is not None else None
        self.size = max(1, CHUNK_ELEMENTS // weight.shape[0])
        # Every chunk a whole one (the last padded with zero rows) where the head computes in half precision on a
        # CPU: oneDNN compiles a kernel for each new matmul shape there, and a last chunk of a new size each step
        # would cost one.
        self.whole_chunks = self.dtype != torch.float32 and hidden.device.type == "cpu"
        shape = (self.size if self.whole_chunks else min(self.size, len(hidden)), weight.shape[0])
        self.logits = hidden.new_empty(shape, dtype=torch.float32)
        self.scratch: torch.Tensor | None = None   # see _scratch
        # The matmul's own output when it is not float32; float32 ones write straight into `logits`.
        self.low = self.logits if self.dtype == torch.float32 else hidden.new_empty(shape, dtype=self.dtype)

    def __iter__(self) -> Iterator[tuple[slice, torch.Tensor]]:
        for start in range(0, len(self.hidden), self.size):
            rows = slice(start, start + self.size)
            states = self.hidden[rows].detach().to(self.dtype)
            if self.whole_chunks and len(states) < self.size:
                states = torch.cat([states, states.new_zeros(self.size - len(states), states.shape[1])])
            low, logits = self.low[:len(states)], self.logits[:min(self.size, len(self.hidden) - start)]
            if self.bias is None:
                torch.mm(states, self.weight.t(), out=low)
            else:
                torch.addmm(self.bias, states, self.weight.t(), out=low)
            if low is not self.logits:
                logits.copy_(low[:len(logits)])
            if self.temperature != 1.0:
                logits.div_(self.temperature)
            yield rows, logits

    def log_softmax_(self, logits: torch.Tensor) -> torch.Tensor:
        """A chunk's logits turned into log-probabilities in place, rounded as log_softmax rounds them:
        (x - max) - log(sum(exp(x - max)))."""
        logits.sub_(logits.amax(dim=-1, keepdim=True))
        exp = torch.exp(logits, out=self._scratch(len(logits)))
        return logits.sub_(exp.sum(dim=-1, keepdim=True).log_())

    def logsumexp_(self, logits: torch.Tensor) -> torch.Tensor:
        """logsumexp over the vocabulary of a chunk's `logits`, which stay as they are ([n]; scratch for the exp)."""
        largest = logits.amax(dim=-1, keepdim=True)
        exp = torch.sub(logits, largest, out=self._scratch(len(logits))).exp_()
        return exp.sum(dim=-1).log_().add_(largest.squeeze(-1))

    def _scratch(self, rows: int) -> torch.Tensor:
        """`rows` rows of a second buffer the size of `logits`, made on first use (the exp of a chunk)."""
        if self.scratch is None:
            self.scratch = torch.empty_like(self.logits)
        return self.scratch[:rows]

    def backpropagate(self, rows: slice, gradient: torch.Tensor, grad_hidden: torch.Tensor | None,
                      grad_weight: torch.Tensor | None, grad_bias: torch.Tensor | None) -> None:
        """Given d(loss)/d(logits) of the chunk at `rows` (float32, in `logits` or `scratch`, overwritten), write the
        hidden states' gradient into grad_hidden[rows] and add the head's to the float32 sums grad_weight, grad_bias."""
        if self.temperature != 1.0:
            gradient.div_(self.temperature)
        if grad_hidden is not None:
            count = len(gradient)
            low = self.low if self.whole_chunks else self.low[:count]
            if low.data_ptr() != gradient.data_ptr():
                low[:count].copy_(gradient)   # rows past `count` hold an earlier chunk's: their products are dropped
            grad_hidden[rows] = (low @ self.weight)[:count]
        if grad_weight is not None:
            grad_weight.addmm_(gradient.t(), self.hidden[rows].detach().float())
        if grad_bias is not None:
            grad_bias += gradient.sum(dim=0)


class _HeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, chunks: HeadChunks,
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
        for rows, log_p in chunks:
            chunk_targets = targets[rows]
            positions = torch.arange(len(chunk_targets), device=targets.device)
            chunks.log_softmax_(log_p)
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
            chunks.backpropagate(rows, gradient, grad_hidden, grad_weight, grad_bias)
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
                None, None, None, None, None, None)
