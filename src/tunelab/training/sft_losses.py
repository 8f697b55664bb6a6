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

Memory and speed: the policy's forward stops at the final hidden states, and the output head runs only at the
positions that predict a trained token, a chunk at a time (`chunked_loss.py`), so no [tokens, vocabulary] logits of
the whole batch exist, and prompt positions cost no head matmul. Models whose logits are more than head(hidden)
(soft-capped Gemma 2/3, ...) or whose head is sharded (ZeRO-3, FSDP) keep whole logits (`logprobs.hidden_states_out`).

Logged beside `loss`: `kl` (ASFT: the mean token KL to the base model, 0 at the first step) and `aux_loss` (MoE models
with router logits on), both also as `eval_...`.
"""

from contextlib import nullcontext
from typing import Any

import torch
from transformers import PreTrainedModel

from tunelab.config import Config
from tunelab.config.stages import STAGE_SPECS
from tunelab.data.collator import split_padding_free
from tunelab.data.processing import IGNORE_INDEX
from tunelab.data.stats import row_lengths
from tunelab.training.chunked_loss import TokenWeights, head_cross_entropy, token_losses
from tunelab.training.engines import place_frozen_model
from tunelab.training.logprobs import hidden_states_out
from tunelab.training.metrics_trainer import MetricsTrainer
from tunelab.training.moe import router_loss_coef

#: EAFT's entropy is taken over this many of the largest logits at each position: a cheap stand-in for the entropy
#: of the whole distribution, whose tail adds little.
EAFT_TOP_K = 20
#: The entropy is divided by about its largest value, log(20) = 3.0 (a uniform top-20), so the weight is about 1 where
#: the model is unsure and falls towards 0 where it is confident.
EAFT_ENTROPY_SCALE = 3.0


def dft_weights(log_probs: torch.Tensor, cross_entropy: torch.Tensor) -> torch.Tensor:
    """DFT: each token's probability exp(-cross-entropy), held constant.

    The gradient becomes p x the gradient of -log p, i.e. the gradient of -p: tokens the model already finds likely
    weigh more, unlikely ones (noise, or what the model cannot learn yet) less.
    """
    return torch.exp(-cross_entropy)


def eaft_weights(alpha: float) -> TokenWeights:
    """EAFT: (H / 3) ** alpha, H the entropy of a softmax over the position's top-20 logits. Confident positions (low
    H) count less. A softmax over the top log-probabilities equals one over the top logits (the shift cancels)."""
    def weigh(log_probs: torch.Tensor, cross_entropy: torch.Tensor) -> torch.Tensor:
        top = log_probs.topk(min(EAFT_TOP_K, log_probs.shape[-1]), dim=-1).values.log_softmax(dim=-1)
        entropy = -(top.exp() * top).sum(dim=-1)
        return (entropy / EAFT_ENTROPY_SCALE) ** alpha
    return weigh


def token_weights_of(config: Config) -> TokenWeights | None:
    """The token weights of the variant `config` picks (ASFT's DFT part included), or None for plain cross-entropy."""
    if config.use_dft_loss or config.use_asft_loss:
        return dft_weights
    if config.use_eaft_loss:
        return eaft_weights(config.eaft_alpha)
    return None


def reduce_tokens(total: torch.Tensor, count: int, num_items_in_batch: torch.Tensor | int | None) -> torch.Tensor:
    """`total` over the tokens divided by `num_items_in_batch`, or by their `count` when there is none (evaluation)."""
    if num_items_in_batch is None:
        return total / max(count, 1)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def trained_positions(states: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of `states` [batch, tokens, ...] that predict a trained token, and those tokens: [N, ...] and [N]."""
    targets = labels[:, 1:].to(states.device)
    mask = targets != IGNORE_INDEX
    return states[:, :-1][mask], targets[mask]


class SFTTrainer(MetricsTrainer):
    """The sft and pt stages' Trainer: cross-entropy or DFT / EAFT / ASFT over the trained tokens, through the
    Trainer's `compute_loss_func`; logs the router loss of mixture-of-experts models as `aux_loss`.

    For ASFT, `reference` is a frozen copy of the starting model, or None: then the policy with its LoRA adapter
    switched off serves as one (and a model without an adapter, as in evaluation without training, is its own).
    """

    def __init__(self, *args: Any, config: Config, reference: PreTrainedModel | None = None, **kwargs: Any) -> None:
        self.weigh = token_weights_of(config)
        self.asft_alpha = config.asft_alpha if config.use_asft_loss else None
        # Passing compute_loss_func also tells the Trainer to count num_items_in_batch and not to divide the loss
        # by the accumulation steps again (the loss is already divided by that count).
        super().__init__(*args, compute_loss_func=self.token_loss, **kwargs)
        self.reference = place_frozen_model(reference, self.args) if reference is not None else None
        # The model's own loss adds coef x aux_loss when its router logits are on; the variants add the same.
        self.router_coef = router_loss_coef(self.model)
        # Set for one compute_loss: the policy's output head (None: its forward gave whole logits), and for ASFT the
        # reference's (final states, head) for the same batch.
        self._head: torch.nn.Module | None = None
        self._reference_states: tuple[torch.Tensor, torch.nn.Module | None] | None = None
        # A padding-free step's samples come as one row (arguments.step_layout): run in passes of at most this many
        # tokens, the most a padded micro-batch of this training set could hold.
        self.pass_tokens = config.per_device_train_batch_size * self._longest_row(config)

    def _longest_row(self, config: Config) -> int:
        """The training set's longest row, rounded up as the collator pads (cutoff_len for a stream)."""
        if not hasattr(self.train_dataset, "select_columns") or not len(self.train_dataset):
            return config.cutoff_len
        longest = int(row_lengths(self.train_dataset, STAGE_SPECS[config.stage].data).max())
        multiple = getattr(self.data_collator, "pad_to_multiple_of", None) or 1
        return -(-longest // multiple) * multiple

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        if not getattr(self.data_collator, "padding_free", False):
            return super().training_step(model, inputs, num_items_in_batch)
        pieces = split_padding_free(inputs, self.pass_tokens)
        total = None
        for index, piece in enumerate(pieces):
            # Under DDP the gradients are all-reduced once, after the step's last pass.
            last = index == len(pieces) - 1
            with nullcontext() if last else self.accelerator.no_sync(model):
                loss = super().training_step(model, piece, num_items_in_batch)
            total = loss if total is None else total + loss
        return total

    def _track_num_input_tokens(self, inputs: dict[str, Any]) -> None:
        # A padding-free row has no attention_mask: the Trainer would count every token but those equal to the pad id
        # (often the eos token that ends each reply). Its own tokens are all but the padding that token_mask marks.
        if getattr(self.data_collator, "padding_free", False):
            real = inputs.get("token_mask", torch.ones_like(inputs["input_ids"]))
            inputs = {**inputs, "attention_mask": real}
        super()._track_num_input_tokens(inputs)

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None) -> Any:
        inputs = {name: value for name, value in inputs.items() if name != "token_mask"}   # for counting only
        if self.asft_alpha is not None:
            # compute_loss_func receives only (outputs, labels, num_items_in_batch): the reference's states for this
            # same batch are computed here, just before the Trainer runs the policy and calls it.
            self._reference_states = self.reference_states(model, inputs)
        with hidden_states_out(model) as head:
            self._head = head
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                 num_items_in_batch=num_items_in_batch)
        self._head, self._reference_states = None, None
        if outputs.get("aux_loss") is not None:
            self.record({"aux_loss": outputs["aux_loss"]})
        return (loss, outputs) if return_outputs else loss

    def token_loss(self, outputs: Any, labels: torch.Tensor,
                   num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        """The Trainer's compute_loss_func: the configured loss over the trained tokens, plus the router term as the
        model adds it. `outputs.logits` are the final hidden states when compute_loss found an output head."""
        states, targets = trained_positions(outputs.logits, labels)
        reference, reference_head = None, None
        if self._reference_states is not None:
            reference, reference_head = self._reference_states
            reference = trained_positions(reference, labels)[0]
        if type(self._head) is torch.nn.Linear and (reference is None or type(reference_head) is torch.nn.Linear):
            total, kl = head_cross_entropy(states, self._head, targets, self.weigh,
                                           (reference, reference_head) if reference is not None else None,
                                           self.asft_alpha or 0.0)
        else:   # whole logits, or a head that is more than a Linear (a peft-wrapped one): logits at these rows only
            logits = _apply_head(self._head, states)
            reference_logits = _apply_head(reference_head, reference) if reference is not None else None
            losses, kls = token_losses(logits, targets, self.weigh, reference_logits, self.asft_alpha or 0.0)
            total, kl = losses.sum(), kls.sum()
        loss = reduce_tokens(total, len(targets), num_items_in_batch)
        if self.asft_alpha is not None:
            self.record({"kl": kl / max(len(targets), 1)})
        if outputs.get("aux_loss") is not None and self.router_coef:
            loss = loss + self.router_coef * outputs["aux_loss"].to(loss.device)
        return loss

    @torch.no_grad()
    def reference_states(self, model: torch.nn.Module,
                         inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.nn.Module | None]:
        """The reference's final hidden states and output head for this batch (whole logits and None when its head
        cannot be split off)."""
        rows = {name: value for name, value in inputs.items() if name != "labels"}
        from peft import PeftModel

        reference = self.reference if self.reference is not None else self.accelerator.unwrap_model(model)
        adapter_off = (reference.disable_adapter() if self.reference is None and isinstance(reference, PeftModel)
                       else nullcontext())
        with adapter_off, hidden_states_out(reference) as head:
            return reference(**rows, use_cache=False).logits, head


def _apply_head(head: torch.nn.Module | None, states: torch.Tensor) -> torch.Tensor:
    if head is None:
        return states
    return head(states.to(next(head.parameters()).dtype))
