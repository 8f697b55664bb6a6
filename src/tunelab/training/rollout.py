"""Online RL shared by the `ppo` and `grpo` stages: sample completions from the policy, score them, and turn rounds of
rollouts into optimizer steps. A stage subclasses `RolloutTrainer` with only what differs: the model it trains, what
it derives from a scored rollout (`experience`) and its loss.

    tunelab train examples/smollm2_lora_ppo.yaml        # or examples/smollm2_lora_grpo.yaml

The pieces, usable on their own, are in `rollout_types.py`; checkpoints and the final files in
`rollout_checkpoint.py`:

    rollout = generate(policy, prompt_ids, prompt_mask, generation_config, chunk_size)   # a Rollout
    logits = model(rollout.input_ids, rollout.attention_mask, position_ids=rollout.position_ids).logits
    logps = completion_logprobs(logits, rollout)      # [N, C]: log p of each completion token, 0 past its end

How a run proceeds (`RolloutTrainer.train`):

* A *step* is one round: each process takes `prompts_per_round` prompts, samples `completions_per_prompt`
  completions of each (one micro-batch at a time), scores them, derives the stage's experience from no-grad passes,
  then makes `passes` passes over the round's rows in shuffled micro-batches, with an optimizer step every
  `gradient_accumulation_steps` micro-batches. `max_steps`, `logging_steps`, `save_steps`, the learning-rate
  schedule (warm-up included) and trainer_log.jsonl count rounds.
* Prompts come from an endless run of epochs, each a fresh shuffle (seed + epoch) split across processes as torch's
  DistributedSampler splits it. A round reaching the end of an epoch continues into the next, so every round is full
  and a resumed run draws the prompts the interrupted one would have. Without `max_steps` a run lasts
  `num_train_epochs` epochs, rounded up to whole rounds.
* Sampling uses the generation keys (`max_new_tokens`, `temperature`, `top_p`, `top_k`, `repetition_penalty`) and
  stops at the template's stop tokens (the tokenizer's eos and the template's stop words). A completion keeps its
  stop token; what follows is masked out. Prompts are left-padded and positions count real tokens only, so padding
  changes no log-probability. Log-probabilities (policy, old policy, reference) are taken at the sampling
  temperature, as TRL takes them; top_p and top_k truncation is not modelled, so `top_p: 1` and `top_k: 0` keep the
  updates exactly on-policy.
* checkpoint-N and the final output_dir hold what `rollout_checkpoint.py` lists; `resume_from_checkpoint` continues
  a run where it stopped, prompts and random numbers included.
* The config keys the loop cannot honour (greedy or beam decoding, `streaming`, `save_strategy: best`, FSDP) are
  refused when the config loads (`config/rules.py`).
* One code path for 1..N processes: accelerate wraps the trained model in DDP, or in a DeepSpeed engine when the
  config names `deepspeed` (the optimizer and scheduler come from the training arguments, as the Trainer's do);
  generation, scoring and the reference run on each process's own rollouts. Under ZeRO-3 every model is sharded:
  the policy generates with its layers gathered as they run (all processes step together, transformers'
  `synced_gpus`), and the reference and a separate reward model run in inference engines of their own.
"""

import logging
import math
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs
from transformers import (GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainerControl,
                          TrainerState, TrainingArguments, get_scheduler)

from tunelab.config import Config
from tunelab.model import load_model
from tunelab.model.frozen import load_reference_model
from tunelab.model.generation import generation_config
from tunelab.training.callbacks import TrainerLogCallback
from tunelab.training.engines import describe_engine, place_frozen_model
from tunelab.training.rewards import RewardScorer, build_reward_scorer, reward_functions
from tunelab.training.logprobs import hidden_states_out
from tunelab.training.rollout_checkpoint import RolloutCheckpoints
from tunelab.training.rollout_types import PromptStream, Rollout, completion_logprobs, evaluating, generate
from tunelab.training.workflow import start_run

logger = logging.getLogger(__name__)


class RolloutTrainer(RolloutCheckpoints):
    """The loop both stages share. A stage subclass sets `plot_keys`, `completions_per_prompt` and `passes` (from its
    config keys), and defines `uses_reference`, `prompts_per_round`, `wrap_policy`, `experience` and `loss` (and
    `state_dict` / `load_state_dict` when it has state of its own)."""

    #: completions sampled from each prompt (grpo: the group)
    completions_per_prompt = 1
    #: passes over each round's rows (ppo_epochs, grpo_iterations)
    passes = 1
    plot_keys: tuple[str, ...] = ("loss", "reward")

    def __init__(self, config: Config, args: TrainingArguments, policy: PreTrainedModel,
                 tokenizer: PreTrainedTokenizerBase, generation_config: GenerationConfig, dataset: Any,
                 scorer: RewardScorer, reference: PreTrainedModel | None) -> None:
        self.config, self.args, self.tokenizer = config, args, tokenizer
        self.policy, self.reference, self.scorer = policy, reference, scorer
        self.generation_config = generation_config
        precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "no"
        self.accelerator = Accelerator(
            gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=precision, cpu=args.use_cpu,
            deepspeed_plugin=args.deepspeed_plugin,
            # Frozen weights never get gradients; with unused-parameter search DDP would look for them every step.
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)])
        self.micro_batch = args.per_device_train_batch_size * self.completions_per_prompt
        self.prompts = PromptStream(dataset, self.prompts_per_round(config), config.seed,
                                    self.accelerator.process_index, self.accelerator.num_processes)
        self.total_steps = (args.max_steps if args.max_steps > 0
                            else math.ceil(args.num_train_epochs * self.prompts.rounds_per_epoch))

        model = self.wrap_policy(policy)
        trainable = [p for p in model.parameters() if p.requires_grad]
        # The optimizer the Trainer would build for `optim`; one parameter group, so unlike the Trainer's a nonzero
        # weight_decay also reaches biases and norms (the default, 0, makes no difference).
        optimizer_class, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
        optimizer = optimizer_class([{"params": trainable, "weight_decay": args.weight_decay}], **optimizer_kwargs)
        if args.deepspeed_plugin is not None:
            # The file's "auto" sizes that depend on the model and the run's length.
            args.hf_deepspeed_config.trainer_config_finalize(args, model, self.total_steps)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        # The schedule counts rounds; it is stepped once per round, so accelerate does not wrap it.
        self.scheduler = get_scheduler(args.lr_scheduler_type, self.optimizer,
                                       num_warmup_steps=args.get_warmup_steps(self.total_steps),
                                       num_training_steps=self.total_steps,
                                       scheduler_specific_kwargs=args.lr_scheduler_kwargs)
        if self.accelerator.num_processes > 1 or args.deepspeed_plugin is not None:
            if self.accelerator.is_main_process:
                logger.info("%s", describe_engine(self.model, self.accelerator.num_processes))
        if reference is not None:
            self.reference = place_frozen_model(reference, args)
        scorer.place_models(lambda frozen: place_frozen_model(frozen, args), policy)

        main = self.accelerator.is_main_process
        self.state = TrainerState(max_steps=self.total_steps, train_batch_size=args.per_device_train_batch_size,
                                  num_train_epochs=math.ceil(self.total_steps / self.prompts.rounds_per_epoch),
                                  is_local_process_zero=self.accelerator.is_local_main_process,
                                  is_world_process_zero=main)
        self.log_callback = TrainerLogCallback()

    # What a stage defines.
    @classmethod
    def uses_reference(cls, config: Config) -> bool:
        return True

    @classmethod
    def prompts_per_round(cls, config: Config) -> int:
        return config.per_device_train_batch_size * config.gradient_accumulation_steps

    def wrap_policy(self, policy: PreTrainedModel) -> torch.nn.Module:
        return policy

    def experience(self, rollout: Rollout, scores: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        raise NotImplementedError

    def loss(self, rollout: Rollout, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, float]:
        return {}

    def load_state_dict(self, state: dict[str, float]) -> None:
        pass

    # Forward passes the stages share.
    def forward(self, model: torch.nn.Module, rollout: Rollout, **kwargs: Any) -> Any:
        """`model` on the rollout's sequences; logits only where completion tokens are predicted."""
        return model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                     position_ids=rollout.position_ids, logits_to_keep=rollout.completion_ids.shape[1] + 1, **kwargs)

    def forward_logprobs(self, model: torch.nn.Module, rollout: Rollout, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        """Completion log-probabilities under the sampling distribution (`temperature` applied), and the forward's
        outputs. The output head runs after the forward, on a few completion positions at a time."""
        with hidden_states_out(model) as head:
            out = self.forward(model, rollout, **kwargs)
        return completion_logprobs(out.logits, rollout, self.config.temperature, head), out

    def micro_batches(self, rollout: Rollout) -> Iterator[Rollout]:
        for start in range(0, len(rollout), self.micro_batch):
            yield rollout[start:start + self.micro_batch]

    @torch.no_grad()
    def no_grad_logprobs(self, model: torch.nn.Module, rollout: Rollout) -> torch.Tensor:
        """Completion log-probabilities under `model` (unwrapped), a micro-batch at a time."""
        with self.accelerator.autocast():
            return torch.cat([self.forward_logprobs(model, part)[0] for part in self.micro_batches(rollout)])

    def reference_logprobs(self, rollout: Rollout) -> torch.Tensor:
        """Completion log-probabilities under the reference: its own model, or the policy with its adapter off."""
        if self.reference is not None:
            return self.no_grad_logprobs(self.reference, rollout)
        with self.policy.disable_adapter():
            return self.no_grad_logprobs(self.policy, rollout)

    # The loop.
    def train(self, resume_from: str | None) -> dict[str, Any]:
        if resume_from is not None:
            self._load_checkpoint(Path(resume_from))
        Path(self.args.output_dir).mkdir(parents=True, exist_ok=True)
        control = TrainerControl()
        self.log_callback.on_train_begin(self.args, self.state, control)
        started, first_step = time.time(), self.state.global_step
        log_every, save_every = self._every(self.args.logging_steps), self._every(self.args.save_steps)
        window: dict[str, list[float]] = defaultdict(list)
        for step in range(first_step, self.total_steps):
            for name, value in self._round(step).items():
                window[name].append(value)
            self.scheduler.step()
            epoch_before = self.state.epoch
            self.state.global_step = step + 1
            self.state.epoch = (step + 1) / self.prompts.rounds_per_epoch
            if (step + 1) % log_every == 0 or step + 1 == self.total_steps:
                self._log(window, control)
                window.clear()
            strategy = self.args.save_strategy
            if ((strategy == "steps" and (step + 1) % save_every == 0)
                    or (strategy == "epoch" and int(self.state.epoch) > int(epoch_before))):
                self._save_checkpoint()
        return self._finish(time.time() - started, self.state.global_step - first_step)

    def _every(self, value: float) -> int:
        """logging_steps / save_steps: a count of rounds, or below 1 a share of the run."""
        return max(1, math.ceil(self.total_steps * value) if value < 1 else int(value))

    def _round(self, step: int) -> dict[str, float]:
        batch = self.prompts.round(step)
        repeat = self.completions_per_prompt
        prompts = [ids for ids in batch["input_ids"] for _ in range(repeat)]
        answers = [ids for ids in batch["labels"] for _ in range(repeat)]
        padded = self.tokenizer.pad({"input_ids": prompts}, padding_side="left", return_tensors="pt")
        padded = padded.to(self.accelerator.device)
        with self.accelerator.autocast():
            rollout = generate(self.policy, padded["input_ids"], padded["attention_mask"], self.generation_config,
                               self.micro_batch)
            with evaluating(self.model):
                scores, metrics = self.scorer(rollout, answers)
        metrics["reward"] = scores.mean().item()
        tensors, experience_metrics = self.experience(rollout, scores)
        metrics.update(experience_metrics)

        losses: dict[str, list[float]] = defaultdict(list)
        for _ in range(self.passes):
            for rows in torch.randperm(len(rollout)).split(self.micro_batch):
                with self.accelerator.accumulate(self.model):
                    loss, loss_metrics = self.loss(rollout[rows], {k: v[rows] for k, v in tensors.items()})
                    self.accelerator.backward(loss)
                    if self.accelerator.sync_gradients and self.args.max_grad_norm > 0:
                        losses["grad_norm"].append(float(self.accelerator.clip_grad_norm_(
                            self.model.parameters(), self.args.max_grad_norm)))
                    self.optimizer.step()
                    self.optimizer.zero_grad()
                for name, value in loss_metrics.items():
                    losses[name].append(float(value))
        tokens = self.accelerator.gather(rollout.attention_mask.sum().reshape(1)).sum()
        self.state.num_input_tokens_seen += int(tokens)
        return metrics | {name: sum(values) / len(values) for name, values in losses.items()}

    def _log(self, window: dict[str, list[float]], control: TrainerControl) -> None:
        names = sorted(window)
        means = torch.tensor([sum(window[n]) / len(window[n]) for n in names], device=self.accelerator.device)
        means = self.accelerator.reduce(means, reduction="mean")
        logs = {name: round(value, 6) for name, value in zip(names, means.tolist())}
        logs.update(learning_rate=self.scheduler.get_last_lr()[0], epoch=round(self.state.epoch, 4))
        self.state.log_history.append({**logs, "step": self.state.global_step})
        self.log_callback.on_log(self.args, self.state, control, logs=logs)
        if self.accelerator.is_main_process:
            shown = ", ".join(f"{k} {v:.4g}" for k, v in logs.items() if "/" not in k and k != "epoch")
            logger.info("step %d/%d: %s", self.state.global_step, self.total_steps, shown)


def run_rollout_stage(config: Config, trainer_class: type[RolloutTrainer]) -> dict[str, Any]:
    """The flow of both stages: checks -> training arguments -> output_dir policy -> tokenizer and template ->
    prompts -> policy, reference and reward sources -> trainer -> train, save, plot."""
    functions = reward_functions(config)
    start = start_run(config)
    args, resume_from, tokenizer, template, splits = (start.args, start.resume_from, start.tokenizer, start.template,
                                                      start.splits)

    policy = load_model(config, tokenizer, trainable=True)
    reference = load_reference_model(config, tokenizer) if trainer_class.uses_reference(config) else None
    scorer = build_reward_scorer(config, tokenizer, policy, functions, chunk_size=config.per_device_train_batch_size)
    # Rollouts always sample: on-policy RL needs the policy's own distribution, whatever `do_sample` says for chat.
    sampling = generation_config(config, tokenizer, template.stop_token_ids(tokenizer), do_sample=True, num_beams=1,
                                 use_cache=True)
    trainer = trainer_class(config, args, policy, tokenizer, sampling, splits.train, scorer, reference)
    return trainer.train(resume_from)
