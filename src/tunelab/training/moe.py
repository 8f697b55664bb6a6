"""The router's load-balancing loss of mixture-of-experts models (`moe_aux_loss_coef`, stages sft and pt).

    enable_router_loss(model, 0.001)   # the model now adds 0.001 x aux_loss to its loss and returns aux_loss

transformers' MoE causal LMs (Mixtral, Qwen2-MoE, Qwen3-MoE, ...) compute the Switch-Transformer balancing loss from
their router logits when `output_router_logits` is on, and add `router_aux_loss_coef` x that loss to the token loss.
The coefficient is read into an attribute of the model when it is built, so setting it afterwards means setting that
attribute as well as the config (which is saved with the weights, so the exported config keeps the value trained
with). `SFTTrainer` logs the router loss as `aux_loss`.
"""

import logging

import torch

logger = logging.getLogger(__name__)


def _routed_models(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules that add a router loss: those holding their own `router_aux_loss_coef` (looked up in the module's
    own attributes, as peft's wrappers forward unknown attribute names to the model inside)."""
    return [module for module in model.modules() if "router_aux_loss_coef" in vars(module)]


def enable_router_loss(model: torch.nn.Module, coef: float) -> bool:
    """Turn the router loss on with weight `coef`; False, with a warning, for a model that has none.

    A dense model gets a warning rather than an error: it has no experts to balance, the rest of the config trains as
    asked, and one config can then serve both a dense and a MoE model (LLaMA-Factory ignores the key there too).
    """
    routed = _routed_models(model)
    if not routed:
        name = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        logger.warning("`moe_aux_loss_coef` is ignored: the model (%s) has no mixture-of-experts router loss in "
                       "transformers (no `router_aux_loss_coef`); it trains with its plain loss", name)
        return False
    for module in routed:
        module.router_aux_loss_coef = coef
        module.config.router_aux_loss_coef = coef
        module.config.output_router_logits = True
    logger.info("router load-balancing loss on: loss + %g x aux_loss", coef)
    return True


def router_loss_coef(model: torch.nn.Module) -> float:
    """The weight the model gives its router loss: 0 for a dense model or one with its router logits off."""
    for module in _routed_models(model):
        if module.config.output_router_logits:
            return float(module.router_aux_loss_coef)
    return 0.0
