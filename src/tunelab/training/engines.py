"""The distributed engine a run asks for (`deepspeed`, `fsdp`), made real on CPUs too, and reported as it runs.

    values = engine_arguments(config, on_cpu)     # TrainingArguments values; on CPU also sets the shared state up
    force_fsdp_on_cpu(trainer)                    # after the Trainer is built
    trainer.add_callback(EngineReport())          # logs the engine and the share of the weights each process holds

On GPUs transformers and accelerate pick DeepSpeed or FSDP by themselves. On CPUs they silently fall back to plain
DDP (measured with accelerate 1.15): accelerate chooses DeepSpeed only for a non-CPU state, and FSDP only for GPU-type
states, so a config saying `deepspeed: ds_z3_config.json` would train an unsharded model and say nothing. tunelab
sets the shared accelerate state to the engine the config names, over the gloo process group, before the training
arguments read it, so the same config runs the same engine on a laptop, in CI and on a GPU node, and the report line
shows what each process really holds.
"""

import logging
import os
import socket
from typing import Any

from transformers import TrainerCallback

logger = logging.getLogger(__name__)


def engine_arguments(config: Any, on_cpu: bool) -> dict[str, Any]:
    """TrainingArguments values for a DeepSpeed run on CPUs (nothing otherwise): the process group up, DeepSpeed's
    communication on it, and accelerate's shared state marked DeepSpeed, which the arguments then use as it is."""
    if not (on_cpu and config.extra_training_args.get("deepspeed")):
        return {}
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    _one_process_group_without_launcher()
    state = PartialState(cpu=True)   # gloo, over the ranks torchrun (or the line above) describes
    import deepspeed

    # Without this DeepSpeed keeps its own idea of the world (one process) and ZeRO-3 partitions for it.
    deepspeed.init_distributed(dist_backend="gloo")
    state.distributed_type = DistributedType.DEEPSPEED
    return {"use_cpu": False, "accelerator_config": {"use_configured_state": True}}


def _one_process_group_without_launcher() -> None:
    """A run started without torchrun gets the environment of a one-process torchrun, so the engine has its group."""
    if "LOCAL_RANK" in os.environ:
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))


def force_fsdp_on_cpu(trainer: Any) -> None:
    """Make an FSDP config shard on CPUs too: give accelerate's state the FSDP plugin the Trainer built from the
    arguments and mark it (and the shared PartialState, or saving would read the model as unsharded) FSDP, before
    the Trainer prepares the model."""
    args = trainer.args
    if not args.fsdp or not args.use_cpu or trainer.is_fsdp_enabled:
        return
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
    trainer.is_fsdp_enabled = True


def save_whole_model(trainer: Any) -> None:
    """Save the trained weights to output_dir as a folder plain transformers and PEFT load: under FSDP with sharded
    checkpoints (`state_dict_type: SHARDED_STATE_DICT`) the Trainer saves nothing there itself, so the shards are
    gathered (every process takes part) and the main process writes them with the tokenizer."""
    fsdp = trainer.accelerator.state.fsdp_plugin if trainer.is_fsdp_enabled else None
    if fsdp is None or "FULL_STATE_DICT" in str(fsdp.state_dict_type):
        trainer.save_model()
        return
    state_dict = trainer.accelerator.get_state_dict(trainer.model)
    if trainer.args.should_save:
        trainer._save(trainer.args.output_dir, state_dict=state_dict)   # the Trainer's own writer: weights, tokenizer


def place_frozen_model(model: Any, args: Any) -> Any:
    """A frozen companion of the policy (a reference model) ready to run beside it.

    Under DeepSpeed ZeRO-3 it was loaded partitioned, like the policy (transformers loads every model inside
    `zero.Init` then), so it runs inside an inference-only DeepSpeed engine of its own: sharded on purpose, each
    process holding its share, the whole layers gathered as they run. Elsewhere each process holds it whole, on the
    device (quantized weights were placed when loaded and cannot move)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        import copy

        import deepspeed

        config = copy.deepcopy(args.hf_deepspeed_config.config)
        # The sizes left "auto" depend on the model; transformers fills them for the policy only.
        hidden = getattr(model.config, "hidden_size", None) or model.config.get_text_config().hidden_size
        zero = config["zero_optimization"]
        for key, value in (("reduce_bucket_size", hidden * hidden),
                           ("stage3_prefetch_bucket_size", int(0.9 * hidden * hidden)),
                           ("stage3_param_persistence_threshold", 10 * hidden)):
            if zero.get(key) == "auto":
                zero[key] = value
        for section in ("optimizer", "scheduler"):
            config.pop(section, None)
        engine, *_ = deepspeed.initialize(model=model, config=config)
        engine.eval()   # DeepSpeedEngine.eval returns nothing
        return engine
    if getattr(model, "hf_quantizer", None) is None:
        model.to(args.device)
    return model


class EngineReport(TrainerCallback):
    """At the start of training, one line: the engine the model really runs under (read off the wrapped model, not
    the config) and how much of the weights each process holds."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if (args.world_size > 1 or args.deepspeed or args.fsdp) and args.process_index == 0:
            logger.info("%s", describe_engine(self.trainer.model_wrapped, args.world_size))


def describe_engine(wrapped: Any, world: int) -> str:
    """"DeepSpeed ZeRO-3 over 2 processes: each holds 50% of the 192,832 weights", or FSDP, DDP likewise, for the
    model as the engine wrapped it."""
    held, total = held_parameters(wrapped)
    if hasattr(wrapped, "zero_optimization_stage"):   # a DeepSpeedEngine
        engine = f"DeepSpeed ZeRO-{wrapped.zero_optimization_stage()}"
    elif held < total:
        engine = "FSDP"
    else:
        engine = "DDP" if world > 1 else "one process"
    return f"{engine} over {world} process{'es' if world > 1 else ''}: each holds {held / max(total, 1):.0%} of the " \
           f"{total:,} weights"


def held_parameters(model: Any) -> tuple[int, int]:
    """(weights this process stores, weights of the whole model): ZeRO-3 keeps a partition per parameter
    (`ds_tensor`, the whole count in `ds_numel`), FSDP2 a DTensor shard."""
    held = total = 0
    for param in model.parameters():
        if hasattr(param, "ds_tensor"):
            held, total = held + param.ds_tensor.numel(), total + param.ds_numel
        elif hasattr(param, "to_local"):
            held, total = held + param.to_local().numel(), total + param.numel()
        else:
            held, total = held + param.numel(), total + param.numel()
    return held, total
