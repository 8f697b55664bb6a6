"""`tunelab train CONFIG --dry-run`: what a run will cost, measured on its own components, before it trains.

    tunelab train examples/quickstart.yaml --dry-run

It builds what the run builds (arguments, tokenizer and template, tokenized data through the cache, the model with
its method, the stage's Trainer and optimizer) in a temporary `output_dir`, touching nothing of the user's, and takes
1 + TIMED_STEPS steps of `Trainer.train` with accumulation 1: a random batch (the warm-up, which creates the
optimizer's state), the longest batch (its step peaks as the run's worst would), then random ones. The peak is
measured over them: resident memory on a CPU, `torch.cuda.max_memory_allocated` on a GPU.

The peak is broken down: weights, gradients and optimizer state from the tensors; activations from one more forward
pass of the longest batch under the run's autocast, counting what autograd keeps per decoder layer (checkpointed, a
layer keeps its input and one layer at a time is rebuilt whole); logits from the most the output head gives at once.
A step takes accumulation x (seconds per token of the timed steps x tokens of an average batch: its padded rows, or
padding-free its samples) + the optimizer step. Figures are per process (under torchrun, each holds this much),
without DeepSpeed's and FSDP's sharding. ppo and grpo, whose steps are mostly generation, are refused.
"""

import math
import os
import resource
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from statistics import median
from typing import Any

import numpy as np
import torch
from torch.overrides import TorchFunctionMode
from transformers import PrinterCallback, ProgressCallback, Trainer, TrainerCallback

from tunelab.config import Config, ConfigError
from tunelab.config.schema import REFERENCE_LOSSES
from tunelab.config.stages import STAGE_SPECS
from tunelab.data import DataCollator, PairwiseCollator
from tunelab.data.stats import row_lengths
from tunelab.model import count_parameters, load_model
from tunelab.model.frozen import load_reference_model
from tunelab.model.layers import decoder_layers_prefix, num_layers
from tunelab.model.segment_attention import use_padding_free
from tunelab.model.value_head import ValueHeadModel
from tunelab.training.moe import enable_router_loss
from tunelab.training.optimizers import attach_optimizer
from tunelab.training.run import setup_logging
from tunelab.training.sft_losses import SFTTrainer
from tunelab.training.stages.dpo import DPOTrainer, prepare_run
from tunelab.training.stages.kto import KTOTrainer
from tunelab.training.stages.rm import RewardTrainer
from tunelab.training.workflow import start_run

#: Steps timed after the warm-up: a median of three shrugs off one step slowed by something else on the machine.
TIMED_STEPS = 3
#: Whole logits at the peak of a step: their values, the log-softmax autograd keeps, and their gradient.
LOGIT_COPIES = 3
#: TrainingArguments keys of the engines that shard across processes, which one process measures without.
SHARDING_KEYS = ("deepspeed", "fsdp", "fsdp_config")


def _sft(config: Config) -> Trainer:
    start = start_run(config)
    model = load_model(config, start.tokenizer)
    model.config.use_cache = False
    if config.moe_aux_loss_coef is not None:
        enable_router_loss(model, config.moe_aux_loss_coef)
    reference = load_reference_model(config, start.tokenizer) if config.use_asft_loss else None
    padding_free = use_padding_free(config, model)
    collator = DataCollator(start.tokenizer, start.pad_to_multiple_of, start.media, padding_free)
    return SFTTrainer(model=model, args=start.args, train_dataset=start.splits.train, data_collator=collator,
                      processing_class=start.tokenizer, config=config, reference=reference)


def _rm(config: Config) -> Trainer:
    start = start_run(config)
    collator = PairwiseCollator(start.tokenizer, start.pad_to_multiple_of, start.media)
    return RewardTrainer(model=ValueHeadModel(load_model(config, start.tokenizer)), args=start.args,
                         train_dataset=start.splits.train, data_collator=collator, processing_class=start.tokenizer)


def _preference(config: Config) -> Trainer:
    kto = STAGE_SPECS[config.stage].module == "kto"   # single replies; dpo and its variants take pairs
    run = prepare_run(config, needs_reference=kto or config.pref_loss in REFERENCE_LOSSES)
    pairs = PairwiseCollator(run.tokenizer, run.collator.pad_to_multiple_of, run.collator.media)
    return (KTOTrainer if kto else DPOTrainer)(
        model=run.model, reference=run.reference, config=config, args=run.args, train_dataset=run.splits.train,
        data_collator=run.collator if kto else pairs, processing_class=run.tokenizer)


#: Stage module -> its Trainer, built as that stage's `run` builds it (training/stages/ says why each part is there).
TRAINERS: dict[str, Callable[[Config], Trainer]] = {"sft": _sft, "rm": _rm, "dpo": _preference, "kto": _preference}


@dataclass
class DryRun:
    """What `dry_run` measured (sizes in bytes); `str()` is the table `tunelab train --dry-run` prints."""

    config: Config
    on_gpu: bool
    processes: int
    parameters: tuple[int, int, str]   # trainable, total, their dtypes
    batch_shape: tuple[int, int]       # rows x tokens of the longest batch
    parts: dict[str, int]              # process, weights, gradients, optimizer state, activations, logits
    optimizer: str
    checkpointing: bool
    other_activations: int             # with checkpointing when the run trains without, and the reverse
    logits: str                        # whole, chunks (the output head applied a chunk at a time), or none
    peak: int
    micro_step_seconds: float
    optimizer_seconds: float
    steps: int

    @property
    def step_seconds(self) -> float:
        return self.config.gradient_accumulation_steps * self.micro_step_seconds + self.optimizer_seconds

    def __str__(self) -> str:
        c, (trainable, total, dtypes), (rows, tokens) = self.config, self.parameters, self.batch_shape
        on, off = ("on", "off") if self.checkpointing else ("off", "on")
        notes = {"process": "allocated before loading" if self.on_gpu else "measured before loading: Python, torch",
                 "weights": "any frozen reference model included", "gradients": "of the trainable weights",
                 "optimizer state": f"{self.optimizer}: {self.parts['optimizer state'] / max(4 * trainable, 1):.2f}"
                                    f" x 4 B per trainable weight",
                 "activations": f"checkpointing {on}, as the run trains; {off}: {_size(self.other_activations)}",
                 "logits": {"none": "no output head in this stage's loss",
                            "chunks": f"{LOGIT_COPIES} x 4 B x the largest chunk of positions x vocabulary",
                            "whole": f"{LOGIT_COPIES} x 4 B x {rows} x {tokens} tokens x vocabulary"}[self.logits]}
        processes = (f"1 of the {self.processes} processes torchrun would start; figures are per process"
                     if self.processes > 1 else "1 process")
        rest = self.peak - sum(self.parts.values())
        return "\n".join([
            f"tunelab dry run: stage {c.stage}, {c.finetuning_type} on {c.model_name_or_path} "
            f"({'cuda' if self.on_gpu else 'cpu'}, {processes})",
            f"  parameters {total:>15,} total, {_size(self.parts['weights'])} ({dtypes})",
            f"             {trainable:>15,} trainable ({100 * trainable / max(total, 1):.2f}%)",
            f"memory of a step on the longest batch ({rows} x {tokens} tokens), as "
            f"{'torch.cuda.max_memory_allocated' if self.on_gpu else 'peak resident memory'}:",
            *(_row(name, _size(size), notes[name]) for name, size in self.parts.items()),
            _row("temporaries, allocator", _size(rest), "the rest of the peak" if rest >= 0 else
                 "below 0: not all the parts exist at once (gradients grow as activations are freed)"),
            _row("peak", _size(self.peak), "measured over the dry run's steps"),
            f"time, from {TIMED_STEPS} steps of one batch after a warm-up:",
            _row("micro-step", f"{self.micro_step_seconds:.3f} s", "forward and backward, a batch of average length"),
            _row("training step", f"{self.step_seconds:.3f} s", f"{c.gradient_accumulation_steps} x micro-step + "
                 f"optimizer step ({self.optimizer_seconds:.3f} s)"),
            _row("the run", str(timedelta(seconds=round(self.steps * self.step_seconds))),
                 f"{self.steps:,} steps, evaluation and saving not included"),
            *(["note: measured without DeepSpeed/FSDP, whose sharding divides weights, gradients and optimizer "
               "state among the processes"] if c.extra_training_args.keys() & set(SHARDING_KEYS) else []),
            "Nothing was saved, and output_dir was left alone."])


def dry_run(config: Config) -> DryRun:
    """Measure a run of `config` as the module docstring says, leaving output_dir alone."""
    why = (f"it covers the Trainer stages ({', '.join(TRAINERS)} and their variants); a `stage: {config.stage}` "
           f"step is mostly generation, which depends on what it samples"
           if STAGE_SPECS[config.stage].module not in TRAINERS else
           "it measures training steps, and this config has `do_train: false`" if not config.do_train else
           "it finds the longest batch in the whole training set, which a stream does not give: run it with "
           "`streaming: false`" if config.streaming else None)
    if why:
        raise ConfigError(f"--dry-run: {why}")
    setup_logging()
    on_gpu = torch.cuda.is_available()
    baseline = _memory(on_gpu, peak=False)
    with tempfile.TemporaryDirectory(prefix="tunelab-dry-run-") as folder:
        return _measure(config, _build_trainer(config, folder), on_gpu, baseline)


def _build_trainer(config: Config, folder: str) -> Trainer:
    """The stage's Trainer and optimizer in `folder`, for 1 + TIMED_STEPS steps of a batch each in dataset order."""
    extra = {key: value for key, value in config.extra_training_args.items() if key not in SHARDING_KEYS}
    extra.update(train_sampling_strategy="sequential", logging_strategy="no", disable_tqdm=True,
                 load_best_model_at_end=False)
    steps = replace(config, output_dir=folder, overwrite_output_dir=False, resume_from_checkpoint=None,
                    max_steps=1 + TIMED_STEPS, gradient_accumulation_steps=1, save_strategy="no", eval_strategy="no",
                    do_eval=False, do_predict=False, plot_loss=False, report_to="none", extra_training_args=extra)
    trainer = TRAINERS[STAGE_SPECS[config.stage].module](steps)
    for callback in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(callback)
    attach_optimizer(trainer, steps)
    return trainer


def _measure(config: Config, trainer: Trainer, on_gpu: bool, baseline: int) -> DryRun:
    model, train = trainer.model, trainer.train_dataset
    lengths = row_lengths(train, STAGE_SPECS[config.stage].data)
    rng = np.random.default_rng(config.seed)
    longest = np.argsort(lengths, kind="stable")[::-1][:config.per_device_train_batch_size]
    order = [rng.choice(len(lengths), size=len(longest), replace=False) for _ in range(TIMED_STEPS)]
    order.insert(1, longest)
    clock = _StepClock(on_gpu)
    trainer.add_callback(clock)
    trainer.train_dataset = train.select([int(i) for rows in order for i in rows])
    trainer.train()
    peak = _memory(on_gpu, peak=True)
    padding_free = getattr(trainer.data_collator, "padding_free", False)  # tokens: the samples' own, or padded rows
    tokens_of = (lambda rows: lengths[rows].sum()) if padding_free else lambda rows: len(rows) * lengths[rows].max()
    per_token = median(seconds / tokens_of(rows) for seconds, rows in zip(clock.seconds(0)[1:], order[1:]))
    average_tokens = np.mean([tokens_of(rows) for rows in rng.choice(len(lengths), size=(256, len(longest)))])

    batch = trainer.data_collator([train[int(i)] for i in longest])
    batch = {name: value.to(trainer.args.device) if torch.is_tensor(value) else value for name, value in batch.items()}
    whole, checkpointed, logits, checkpointing = _saved_tensor_bytes(trainer, batch)
    rows, tokens = batch["input_ids"].shape
    whole_logits = rows * tokens * model.config.get_text_config().vocab_size
    models = [model] + ([trainer.reference] if getattr(trainer, "reference", None) is not None else [])
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)   # inside accelerate's wrapper
    # Layer-wise GaLore and APOLLO step one optimizer per weight behind a placeholder that holds no state itself.
    parts = list(getattr(optimizer, "optimizer_dict", {}).values()) or [optimizer]
    dtypes = " + ".join(sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()}))
    return DryRun(
        config=config, on_gpu=on_gpu, processes=_processes(), parameters=(*count_parameters(model), dtypes),
        parts={"process": baseline, "weights": _bytes([[*m.parameters(), *m.buffers()] for m in models]),
               "gradients": _bytes([p for p in model.parameters() if p.requires_grad]),
               "optimizer state": _bytes([part.state_dict() for part in parts]),
               "activations": checkpointed if checkpointing else whole, "logits": LOGIT_COPIES * 4 * logits},
        batch_shape=(rows, tokens), logits="none" if not logits else "whole" if logits >= whole_logits else "chunks",
        optimizer=type(optimizer).__name__, checkpointing=checkpointing,
        other_activations=whole if checkpointing else checkpointed, peak=peak,
        micro_step_seconds=per_token * average_tokens, optimizer_seconds=median(clock.seconds(1)[1:]),
        steps=_run_steps(config, len(train)))


class _StepClock(TrainerCallback):
    """The time at each step's start, the end of its backward pass and the end of its optimizer step."""

    def __init__(self, on_gpu: bool) -> None:
        self.on_gpu, self.marks = on_gpu, []

    def _mark(self, *args: Any, **kwargs: Any) -> None:
        if self.on_gpu:
            torch.cuda.synchronize()   # kernels run asynchronously: wait for the step's own work
        self.marks.append(time.perf_counter())

    on_step_begin = on_pre_optimizer_step = on_optimizer_step = _mark

    def seconds(self, start: int) -> list[float]:   # per step, from its mark `start` (0 or 1) to the next one
        return [later - earlier for earlier, later in zip(self.marks[start::3], self.marks[start + 1::3])]


class _LargestLogits(TorchFunctionMode):
    """The most logits one torch call gives, whatever computes them: a model's head, or a loss applying it in chunks."""

    def __init__(self, vocabulary: int) -> None:
        super().__init__()
        self.vocabulary, self.largest = vocabulary, 0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        # A transposed output head ([hidden, vocabulary], a view of the [vocabulary, hidden] weight) is no logits.
        transposed = out._base is not None and out._base.shape[-1] != self.vocabulary if torch.is_tensor(out) else False
        if isinstance(out, torch.Tensor) and out.dim() and out.shape[-1] == self.vocabulary and not transposed:
            self.largest = max(self.largest, out.numel())
        return out


def _saved_tensor_bytes(trainer: Trainer, batch: dict[str, Any]) -> tuple[int, int, int, bool]:
    """Bytes autograd keeps for the backward pass of the stage's loss on `batch` (each storage once; weights and
    logits left out) without checkpointing and with it, the most logits computed at once, and whether the run
    checkpoints. One forward pass under the run's autocast, checkpointing off so that each layer's share shows."""
    model = trainer.model
    vocabulary = model.config.get_text_config().vocab_size
    # The weights exist anyway: counted as seen from the start.
    seen = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    layers: dict[Any, int] = defaultdict(int)   # decoder layer index or "outside" -> bytes
    index = {layer: i for i, layer in enumerate(model.get_submodule(decoder_layers_prefix(model, num_layers(model))))}
    inputs, current = [], []   # each layer's input bytes; the layer running now

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            if tensor.dim() == 0 or tensor.shape[-1] != vocabulary:   # logits have a row of their own
                layers[current[-1] if current else "outside"] += storage.nbytes()
        return tensor

    def enter(layer: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = next((v for v in (*args, *kwargs.values()) if torch.is_tensor(v) and v.is_floating_point()), None)
        inputs.append(0 if hidden is None else hidden.nbytes)
        current.append(index[layer])

    def leave(*_: Any) -> None:   # returns None: a forward hook's value would replace the layer's output
        current.pop()

    handles = [handle for layer in index for handle in (
        layer.register_forward_pre_hook(enter, with_kwargs=True), layer.register_forward_hook(leave))]
    checkpointed = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for module in checkpointed:
        module.gradient_checkpointing = False
    try:
        with trainer.accelerator.autocast(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                _LargestLogits(vocabulary) as logits:
            trainer.compute_loss(model, batch)
    finally:
        for handle in handles:
            handle.remove()
        for module in checkpointed:
            module.gradient_checkpointing = True
    outside = layers.pop("outside", 0)
    # Checkpointed, each layer keeps its input, and in the backward pass one layer at a time is rebuilt whole.
    with_checkpointing = outside + sum(inputs) + max(layers.values(), default=0)
    return outside + sum(layers.values()), with_checkpointing, logits.largest, bool(checkpointed)


def _bytes(value: Any) -> int:
    """Bytes of the tensors in `value` (nested in dicts, lists, tuples), a storage they share (tied weights) once."""
    storages, stack = {}, [value]
    while stack:
        item = stack.pop()
        if torch.is_tensor(item):
            storages[item.untyped_storage().data_ptr()] = item.untyped_storage().nbytes()
        elif isinstance(item, (dict, list, tuple)):
            stack.extend(item.values() if isinstance(item, dict) else item)
    return sum(storages.values())


def _memory(on_gpu: bool, peak: bool) -> int:
    if on_gpu:
        return torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()
    # The high-water mark of resident memory; before loading it is the current figure (imports only grow it).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def _processes() -> int:
    """The processes `tunelab train` would run: training/launch.py starts torchrun on these conditions."""
    forced = os.environ.get("FORCE_TORCHRUN", "0").lower() in ("1", "true")
    per_node = os.environ.get("NPROC_PER_NODE") or (2 if forced else torch.cuda.device_count())
    return int(per_node) * int(os.environ.get("NNODES", "1")) if forced or torch.cuda.device_count() > 1 else 1


def _run_steps(config: Config, rows: int) -> int:
    """Optimizer steps of the run, counted as the Trainer counts them (each process reads its share of the rows)."""
    if config.max_steps > 0:
        return config.max_steps
    batches = math.ceil(math.ceil(rows / _processes()) / config.per_device_train_batch_size)
    return math.ceil(config.num_train_epochs * max(math.ceil(batches / config.gradient_accumulation_steps), 1))


def _row(name: str, value: str, note: str) -> str:
    return f"  {name:<24}{value:>14}    {note}".rstrip()


def _size(size: float) -> str:
    return f"{size / 2**30:,.2f} GiB" if abs(size) >= 10 * 2**30 else f"{size / 2**20:,.1f} MiB"
