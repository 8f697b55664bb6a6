"""LLaMA-Factory's variants of the SFT loss, and the Trainer that applies them (stages sft and pt).

    use_dft_loss: true                  # DFT: each token's cross-entropy weighted by its own probability
    use_eaft_loss: true                 # EAFT: ... weighted by (entropy of the top-20 logits / 3) ** eaft_alpha
    use_asft_loss: true                 # ASFT: DFT + asft_alpha x KL(frozen base model || policy)

Every loss is taken over the trained next tokens: the logits at position t against the label at t + 1, wherever that
label is not IGNORE_INDEX (the shift the model's own loss makes). The token weights are computed without gradient,
so they scale each token's gradient without being optimised themselves. Per-token values are summed and divided by
the Trainer's `num_items_in_batch` (the trained tokens of the whole accumulated batch, over all processes) when it
gives one, so gradient accumulation and several processes train as one bigger batch; otherwise by the batch's own
count of trained tokens (in evaluation).

`eval_loss` is the same objective as `loss` (as in LLaMA-Factory), computed on the evaluation set, so the two curves
compare; it is not the plain cross-entropy of the tokens. With a mixture-of-experts model and `moe_aux_loss_coef`,
both also hold the router's load-balancing term (`tunelab.training.moe`).

Logged beside `loss`: `kl` (ASFT: the mean token KL to the base model, 0 at the first step) and `aux_loss` (MoE models
with router logits on), both also as `eval_...`.
"""

from collections.abc import Callable
from contextlib import nullcontext
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from tunelab.config import Config
from tunelab.data.processing import IGNORE_INDEX
from tunelab.training.engines import place_frozen_model
from tunelab.training.metrics_trainer import MetricsTrainer
from tunelab.training.moe import router_loss_coef

#: EAFT's entropy is taken over this many of the largest logits at each position: a cheap stand-in for the entropy
#: of the whole distribution, whose tail adds little.
EAFT_TOP_K = 20
#: The entropy is divided by about its largest value, log(20) = 3.0 (a uniform top-20), so the weight is about 1 where
#: the model is unsure and falls towards 0 where it is confident.
EAFT_ENTROPY_SCALE = 3.0


def trained_positions(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits that predict a trained token, in float32, and those tokens: shapes [N, vocab] and [N].

    Only the N trained positions are upcast, not the whole batch of logits (the largest tensor of the step).
    """
    targets = labels[:, 1:].to(logits.device)
    mask = targets != IGNORE_INDEX
    return logits[:, :-1][mask].float(), targets[mask]


def reduce_tokens(per_token: torch.Tensor, num_items_in_batch: torch.Tensor | int | None) -> torch.Tensor:
    """Sum over the tokens divided by `num_items_in_batch`, or the mean when there is none (0 for no tokens)."""
    if num_items_in_batch is None:
        return per_token.sum() / max(per_token.numel(), 1)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(per_token.device)
    return per_token.sum() / num_items_in_batch


def dft_token_losses(token_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """DFT per token: cross-entropy x the token's probability exp(-cross-entropy), the probability held constant.

    The gradient is p x the gradient of -log p, i.e. the gradient of -p: tokens the model already finds likely weigh
    more, unlikely ones (noise, or what the model cannot learn yet) less.
    """
    cross_entropy = F.cross_entropy(token_logits, targets, reduction="none")
    return cross_entropy * torch.exp(-cross_entropy.detach())


def dft_loss(logits: torch.Tensor, labels: torch.Tensor,
             num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
    """Dynamic Fine-Tuning loss over the trained next tokens of a batch."""
    return reduce_tokens(dft_token_losses(*trained_positions(logits, labels)), num_items_in_batch)


def eaft_loss(logits: torch.Tensor, labels: torch.Tensor, alpha: float,
              num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
    """Entropy-Adaptive Fine-Tuning loss: cross-entropy x (H / 3) ** alpha, H the entropy of a softmax over the
    position's top-20 logits (without gradient). Confident positions (low H) count less."""
    token_logits, targets = trained_positions(logits, labels)
    cross_entropy = F.cross_entropy(token_logits, targets, reduction="none")
    with torch.no_grad():
        top = token_logits.topk(min(EAFT_TOP_K, token_logits.shape[-1]), dim=-1).values
        log_p = top.log_softmax(dim=-1)
        entropy = -(log_p.exp() * log_p).sum(dim=-1)
        weight = (entropy / EAFT_ENTROPY_SCALE) ** alpha
    return reduce_tokens(cross_entropy * weight, num_items_in_batch)


def token_kl(token_logits: torch.Tensor, reference_token_logits: torch.Tensor) -> torch.Tensor:
    """KL(reference || policy) = sum_v q_v (log q_v - log p_v) at each position: shape [N]."""
    log_q = reference_token_logits.float().log_softmax(dim=-1)
    log_p = token_logits.log_softmax(dim=-1)
    return (log_q.exp() * (log_q - log_p)).sum(dim=-1)


def asft_loss(logits: torch.Tensor, reference_logits: torch.Tensor, labels: torch.Tensor, alpha: float,
              num_items_in_batch: torch.Tensor | int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchored SFT: DFT + alpha x KL(reference || policy), both over the trained tokens; also the batch's mean KL
    (detached, for the log)."""
    token_logits, targets = trained_positions(logits, labels)
    reference_token_logits, _ = trained_positions(reference_logits, labels)
    kl = token_kl(token_logits, reference_token_logits)
    loss = reduce_tokens(dft_token_losses(token_logits, targets) + alpha * kl, num_items_in_batch)
    return loss, kl.detach().sum() / max(kl.numel(), 1)


def token_loss_of(config: Config) -> Callable[..., torch.Tensor] | None:
    """The variant `config` picks as fn(logits, labels, num_items_in_batch), or None for the model's own loss.

    ASFT is not one of them: it needs the reference model's logits, which `SFTTrainer` adds itself."""
    if config.use_dft_loss:
        return dft_loss
    if config.use_eaft_loss:
        return partial(eaft_loss, alpha=config.eaft_alpha)
    return None


class SFTTrainer(MetricsTrainer):
    """The sft and pt stages' Trainer: the model's own loss, or DFT / EAFT / ASFT through the Trainer's
    `compute_loss_func`; logs the router loss of mixture-of-experts models as `aux_loss`.

    For ASFT, `reference` is a frozen copy of the starting model, or None: then the policy with its LoRA adapter
    switched off serves as one (and a model without an adapter, as in evaluation without training, is its own).
    """

    def __init__(self, *args: Any, config: Config, reference: PreTrainedModel | None = None, **kwargs: Any) -> None:
        self.token_loss = token_loss_of(config)
        self.asft_alpha = config.asft_alpha if config.use_asft_loss else None
        # Passing compute_loss_func also tells the Trainer to count num_items_in_batch and not to divide the loss
        # by the accumulation steps again (our losses are already divided by that count).
        uses_variant = self.token_loss is not None or self.asft_alpha is not None
        super().__init__(*args, compute_loss_func=self.variant_loss if uses_variant else None, **kwargs)
        self.reference = place_frozen_model(reference, self.args) if reference is not None else None
        # The model's own loss adds coef x aux_loss when its router logits are on; the variants add the same.
        self.router_coef = router_loss_coef(self.model)
        self._reference_logits: torch.Tensor | None = None

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None) -> Any:
        if self.asft_alpha is not None:
            # compute_loss_func receives only (outputs, labels, num_items_in_batch): the reference's logits for this
            # same batch are computed here, just before the Trainer runs the policy and calls it.
            self._reference_logits = self.reference_logits(model, inputs)
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        self._reference_logits = None
        if outputs.get("aux_loss") is not None:
            self.record({"aux_loss": outputs["aux_loss"]})
        return (loss, outputs) if return_outputs else loss

    def variant_loss(self, outputs: Any, labels: torch.Tensor,
                     num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        """The Trainer's compute_loss_func: the configured variant, plus the router term as the model adds it."""
        if self.asft_alpha is not None:
            loss, kl = asft_loss(outputs.logits, self._reference_logits, labels, self.asft_alpha, num_items_in_batch)
            self.record({"kl": kl})
        else:
            loss = self.token_loss(outputs.logits, labels, num_items_in_batch=num_items_in_batch)
        if outputs.get("aux_loss") is not None and self.router_coef:
            loss = loss + self.router_coef * outputs["aux_loss"].to(loss.device)
        return loss

    @torch.no_grad()
    def reference_logits(self, model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        rows = {name: value for name, value in inputs.items() if name != "labels"}
        if self.reference is not None:
            return self.reference(**rows, use_cache=False).logits
        from peft import PeftModel

        policy = self.accelerator.unwrap_model(model)
        adapter_off = policy.disable_adapter() if isinstance(policy, PeftModel) else nullcontext()
        with adapter_off:
            return policy(**rows, use_cache=False).logits
