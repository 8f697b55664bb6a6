"""The optimizer-side training methods: each replaces the optimizer the Trainer would build from `optim`.

    tunelab train examples/quickstart.yaml use_muon=true     # or loraplus_lr_ratio=16, use_adam_mini=true, ...

`attach_optimizer(trainer, config)` runs once, just before `trainer.train()`, and sets `trainer.optimizer`; the
Trainer then builds its LR scheduler on it, saves it in every checkpoint and restores it on resume. Which method
runs is the config's (`config/rules.py` lets only one through, and only where it can run):

* LoRA+ (`loraplus_lr_ratio`): peft's optimizer whose LoRA B matrices learn `ratio` times faster than the A ones.
* BAdam (`use_badam`): Adam on one block at a time: a decoder layer (`badam_mode: layer`), or a share of every
  matrix (`ratio`). The other weights get neither gradients nor optimizer state.
* Adam-mini (`use_adam_mini`): one second moment per block (a head, a neuron) instead of one per weight.
* Muon (`use_muon`): torch's Muon for the decoder layers' weight matrices, AdamW for every other parameter.
* GaLore and APOLLO are transformers' own (`arguments.py` sets `optim`); here they only get what transformers'
  integration does not pass: weight decay, and APOLLO's `apollo_scale_front`.

With none of these keys set, nothing here runs and the Trainer builds its optimizer as usual.
"""

import logging
import sys
import warnings
from collections.abc import Callable
from types import MethodType
from typing import Any

import torch
from transformers import Trainer

from tunelab.config import Config, ConfigError

logger = logging.getLogger(__name__)


def attach_optimizer(trainer: Trainer, config: Config) -> None:
    """Set `trainer.optimizer` for the optimizer method the config chooses, if any."""
    for chosen, build in _METHODS:
        if chosen(config):
            trainer.optimizer = build(trainer, config)
            logger.info("optimizer: %s", type(trainer.optimizer).__name__)
            return


def _low_rank(trainer: Trainer, config: Config) -> torch.optim.Optimizer:
    """GaLore / APOLLO as transformers builds them from `optim`, plus the settings its integration drops."""
    _allow_projectors_in_checkpoints(config)
    try:
        optimizer = trainer.create_optimizer()
    except ValueError as err:  # a target list that names no linear layer of this model
        key = "galore_target" if config.use_galore else "apollo_target"
        raise ConfigError(f"`{key}`: {err}") from None
    # Layer-wise variants hide one optimizer per parameter behind a placeholder that steps them from backward hooks.
    parts = list(getattr(optimizer, "optimizer_dict", {}).values()) or [optimizer]
    decayed = _decay_parameters(trainer)
    for part in parts:
        if config.use_apollo:
            # A constructor argument that APOLLO only stores; transformers has no way to pass it.
            part.scale_front = config.apollo_scale_front
        if trainer.args.weight_decay > 0:
            # transformers leaves every group at the optimizer's default of 0; decay the weights the Trainer would
            # decay (not biases and norms), as LLaMA-Factory does.
            groups, part.param_groups = part.param_groups, []
            for group in groups:
                params = [p for p in group["params"] if p.requires_grad]
                for decay, chosen in ((trainer.args.weight_decay, [p for p in params if p in decayed]),
                                      (0.0, [p for p in params if p not in decayed])):
                    if chosen:
                        part.add_param_group({**group, "params": chosen, "weight_decay": decay})
    return optimizer


def _allow_projectors_in_checkpoints(config: Config) -> None:
    """GaLore and APOLLO keep their projectors in the optimizer state as plain Python objects; the Trainer reloads a
    checkpoint's optimizer.pt with torch's weights-only loader, which refuses any class it was not told is safe."""
    if config.use_galore:
        from galore_torch.galore_projector import GaLoreProjector

        torch.serialization.add_safe_globals([GaLoreProjector])
    else:
        from apollo_torch.random_projector import GradientProjector
        from apollo_torch.svd_projector import GaLoreProjector as SVDProjector

        torch.serialization.add_safe_globals([GradientProjector, SVDProjector])


def _loraplus(trainer: Trainer, config: Config) -> torch.optim.Optimizer:
    """The optimizer `optim` names, with peft's LoRA+ groups: B matrices (and 1-D weights) at lr x ratio, LoRA on
    embeddings at `loraplus_lr_embedding`."""
    from peft.optimizers import create_loraplus_optimizer

    optimizer_class, kwargs = Trainer.get_optimizer_cls_and_kwargs(trainer.args, trainer.model)
    kwargs = dict(kwargs)
    if not isinstance(optimizer_class, type) or {"params", "model", "optimizer_dict"} & kwargs.keys():
        raise ConfigError(f"`loraplus_lr_ratio` sets the learning rate per parameter group, which `optim: "
                          f"{trainer.args.optim}` does not take: use an AdamW-like optimizer")
    lr = kwargs.pop("lr")
    return create_loraplus_optimizer(trainer.model, optimizer_class, lr=lr, loraplus_lr_ratio=config.loraplus_lr_ratio,
                                     loraplus_lr_embedding=config.loraplus_lr_embedding,
                                     loraplus_weight_decay=trainer.args.weight_decay, **kwargs)


def _badam(trainer: Trainer, config: Config) -> torch.optim.Optimizer:
    from badam import BlockOptimizer, BlockOptimizerRatio, clip_grad_norm_old_version

    model, args = trainer.model, trainer.args
    # BAdam counts steps modulo the interval; -1 (never switch) becomes an interval no run reaches.
    interval = sys.maxsize if config.badam_switch_interval == -1 else config.badam_switch_interval
    if config.badam_mode == "ratio":
        optimizer = BlockOptimizerRatio(
            param_groups=_decay_groups(trainer), update_ratio=config.badam_update_ratio,
            mask_mode=config.badam_mask_mode, switch_every=interval, verbose=config.badam_verbose,
            lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
            # It finds the embeddings and the head by name (and freezes them); a head tied to the embeddings only
            # shows its own name with remove_duplicate=False.
            named_parameters_list=list(model.named_parameters(remove_duplicate=False)))
        # Ratio mode turns each gradient sparse as soon as it is accumulated, and torch's clip_grad_norm_ cannot
        # take sparse tensors; BAdam ships this clipping for exactly this, to be set on the Trainer's accelerator.
        trainer.accelerator.clip_grad_norm_ = MethodType(clip_grad_norm_old_version, trainer.accelerator)
        return optimizer

    layers = _decoder_layers(model)
    if config.badam_start_block is not None and config.badam_start_block >= len(layers):
        raise ConfigError(f"`badam_start_block: {config.badam_start_block}`: the model has {len(layers)} decoder "
                          f"layers (blocks 0 to {len(layers) - 1})")
    optimizer_class, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    # BAdam rebuilds the active block's groups from the base optimizer's defaults, so the config's weight decay must
    # be a default too (else AdamW's own 0.01 would apply whatever the config says).
    base = optimizer_class(_decay_groups(trainer), **{**kwargs, "weight_decay": args.weight_decay})
    with warnings.catch_warnings():
        # BAdam warns when the weights are float32, as tunelab keeps trainable weights (see loader._weights_dtype):
        # then it saves the Adam state of all but one block, not the weight memory. Said once below, not per name.
        warnings.filterwarnings("ignore", message="BAdam expect model")
        optimizer = BlockOptimizer(
            base_optimizer=base, named_parameters_list=list(model.named_parameters()),
            block_prefix_list=[[prefix] for prefix in layers], switch_block_every=interval,
            start_block=config.badam_start_block, switch_mode=config.badam_switch_mode, verbose=config.badam_verbose)
    logger.info("BAdam: %d blocks (the decoder layers), switched %s every %s steps", len(layers),
                config.badam_switch_mode, "never" if config.badam_switch_interval == -1 else interval)
    return optimizer


def _adam_mini(trainer: Trainer, config: Config) -> torch.optim.Optimizer:
    from adam_mini import Adam_mini

    args, text = trainer.args, trainer.model.config.get_text_config()
    # Adam-mini splits the query and key matrices by head and the others by neuron, from the model's shape.
    return Adam_mini(named_parameters=trainer.model.named_parameters(), lr=args.learning_rate,
                     betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon, weight_decay=args.weight_decay,
                     dim=text.hidden_size, n_heads=text.num_attention_heads,
                     n_kv_heads=getattr(text, "num_key_value_heads", None) or text.num_attention_heads, verbose=False)


def _muon(trainer: Trainer, config: Config) -> torch.optim.Optimizer:
    args, model = trainer.args, trainer.model
    layers = tuple(_decoder_layers(model))
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    hidden = [p for name, p in trainable if p.ndim == 2 and name.startswith(layers)]
    rest = [p for name, p in trainable if not (p.ndim == 2 and name.startswith(layers))]
    decayed = _decay_parameters(trainer)
    adamw_groups = [{"params": [p for p in rest if p in decayed], "weight_decay": args.weight_decay},
                    {"params": [p for p in rest if p not in decayed], "weight_decay": 0.0}]
    logger.info("Muon: %d weight matrices of the decoder layers; AdamW: the %d other parameters", len(hidden),
                len(rest))
    return MuonWithAdamW([{"params": hidden, "weight_decay": args.weight_decay}], adamw_groups,
                         lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)


class MuonWithAdamW(torch.optim.Optimizer):
    """torch's Muon for some parameters and AdamW for the others, as the one optimizer the Trainer expects.

    `param_groups` are the two optimizers' own group dicts, so the LR scheduler (which writes each group's `lr`) and
    the Trainer's gradient clipping reach both; `state_dict` holds both states, so a checkpoint resumes exactly.
    `parts` maps "muon" and "adamw" to the optimizers (one may be absent when it has no parameters).
    """

    def __init__(self, muon_groups: list[dict[str, Any]], adamw_groups: list[dict[str, Any]], *, lr: float,
                 betas: tuple[float, float], eps: float) -> None:
        muon_groups = [g for g in muon_groups if g["params"]]
        adamw_groups = [g for g in adamw_groups if g["params"]]
        self.parts: dict[str, torch.optim.Optimizer] = {}
        if muon_groups:
            # match_rms_adamw scales each orthogonalised update to the RMS an AdamW update has (0.2 x lr x
            # sqrt(max(rows, columns))), so the config's one learning rate suits both halves (Moonshot's recipe);
            # Muon's original scaling would need a learning rate of its own, about 0.02.
            self.parts["muon"] = torch.optim.Muon(muon_groups, lr=lr, adjust_lr_fn="match_rms_adamw")
        if adamw_groups:
            self.parts["adamw"] = torch.optim.AdamW(adamw_groups, lr=lr, betas=betas, eps=eps)
        # The base class sets up torch's hooks and bookkeeping over the parts' groups (the same dict objects).
        super().__init__(self._groups(), {"lr": lr})

    def _groups(self) -> list[dict[str, Any]]:
        return [group for part in self.parts.values() for group in part.param_groups]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for part in self.parts.values():
            part.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {name: part.state_dict() for name, part in self.parts.items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for name, part in self.parts.items():
            part.load_state_dict(state_dict[name])
        # Loading gives each part new group dicts: point ours at them, or the scheduler would set stale ones.
        self.param_groups = self._groups()


def _decoder_layers(model: torch.nn.Module) -> list[str]:
    """Name prefixes of the decoder layers ("model.layers.0.", ...): the one module list as long as the model has
    layers (found by its length, so any family's naming works, peft-wrapped too)."""
    count = model.config.get_text_config().num_hidden_layers
    lists = [name for name, module in model.named_modules()
             if isinstance(module, torch.nn.ModuleList) and len(module) == count]
    if len(lists) != 1:
        raise ConfigError(f"cannot tell which module list holds the {count} decoder layers of {type(model).__name__} "
                          f"(candidates: {', '.join(lists) or 'none'}), which BAdam and Muon need")
    return [f"{lists[0]}.{index}." for index in range(count)]


def _decay_parameters(trainer: Trainer) -> set[torch.nn.Parameter]:
    """The parameters the Trainer applies weight decay to (not biases, not normalization weights)."""
    names = set(trainer.get_decay_parameter_names(trainer.model))
    return {p for name, p in trainer.model.named_parameters() if name in names}


def _decay_groups(trainer: Trainer) -> list[dict[str, Any]]:
    """The Trainer's two parameter groups: trainable weights with `weight_decay`, and the rest without."""
    decayed = _decay_parameters(trainer)
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if p in decayed], "weight_decay": trainer.args.weight_decay},
              {"params": [p for p in trainable if p not in decayed], "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


#: (does the config choose it, what builds it), in the order they are checked.
_METHODS: tuple[tuple[Callable[[Config], bool], Callable[[Trainer, Config], torch.optim.Optimizer]], ...] = (
    (lambda c: c.use_galore or c.use_apollo, _low_rank),
    (lambda c: c.loraplus_lr_ratio is not None, _loraplus),
    (lambda c: c.use_badam, _badam),
    (lambda c: c.use_adam_mini, _adam_mini),
    (lambda c: c.use_muon, _muon),
)
