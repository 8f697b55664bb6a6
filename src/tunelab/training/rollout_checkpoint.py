"""Saving and resuming the rollout loop, and its final outputs; `RolloutTrainer` (`rollout.py`) inherits them.

* checkpoint-N holds the policy as it saves itself (adapter or full weights, value_head.safetensors for ppo), the
  tokenizer, optimizer.pt (under DeepSpeed instead a `deepspeed/` folder: each process's partitions), scheduler.pt,
  rng_state_<rank>.pth, stage_state.json (ppo's KL coefficient and score statistics) and, written last to mark it
  complete, trainer_state.json (`checkpoints.py`).
* At the end output_dir gets the policy and tokenizer, trainer_state.json, train_results.json and all_results.json,
  and with `plot_loss` the curves.

Kept apart from the loop so that what a checkpoint holds can be read in one place; the methods use the trainer's
`accelerator`, `model`, `policy`, `optimizer`, `scheduler`, `state`, `args`, `config`, `tokenizer` and `prompts`.
"""

import json
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from transformers import TrainerState

from tunelab.config import ConfigError
from tunelab.model.value_head import ValueHeadModel
from tunelab.training.checkpoints import saving_checkpoint, saving_final_weights
from tunelab.training.output_dir import TRAINER_STATE
from tunelab.training.plotting import plot_metrics

logger = logging.getLogger(__name__)

STAGE_STATE = "stage_state.json"
#: the folder in checkpoint-N where a DeepSpeed engine writes its partitions
DEEPSPEED_TAG = "deepspeed"


class RolloutCheckpoints:
    """Checkpoints, resuming from one, and the run's final files, for `RolloutTrainer`."""

    def _save_model(self, folder: Path) -> None:
        """Every process calls it: under DeepSpeed ZeRO-3 each holds pieces of the weights, gathered here so that the
        main process writes whole ones."""
        deepspeed = self.accelerator.state.deepspeed_plugin is not None
        state_dict = self.accelerator.get_state_dict(self.model) if deepspeed else None
        if not self.accelerator.is_main_process:
            return
        model = self.accelerator.unwrap_model(self.model)
        # Only the trained adapter: a reward adapter beside it (reward_model_type: lora) belongs to the rm run.
        kwargs = {"selected_adapters": [self.policy.active_adapter]} if hasattr(self.policy, "peft_config") else {}
        model.save_pretrained(folder, state_dict=state_dict, **kwargs)
        self.tokenizer.save_pretrained(folder)

    def _save_checkpoint(self) -> None:
        folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        main = self.accelerator.is_main_process
        with saving_checkpoint(folder, main, self.accelerator.wait_for_everyone,
                               self.accelerator.unwrap_model(self.model), self.optimizer):
            self._save_model(folder)
            if not self.args.save_only_model and self.accelerator.state.deepspeed_plugin is not None:
                # The engine's own format: each process writes its partition of the optimizer state (and weights).
                self.model.save_checkpoint(str(folder), tag=DEEPSPEED_TAG)
            if main:
                if not self.args.save_only_model:
                    if self.accelerator.state.deepspeed_plugin is None:
                        torch.save(self.optimizer.state_dict(), folder / "optimizer.pt")
                    torch.save(self.scheduler.state_dict(), folder / "scheduler.pt")
                (folder / STAGE_STATE).write_text(json.dumps(self.state_dict()), encoding="utf-8")
            self.accelerator.wait_for_everyone()
            rng = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.get_rng_state(),
                   "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
            torch.save(rng, folder / f"rng_state_{self.accelerator.process_index}.pth")
            self.accelerator.wait_for_everyone()
            if main:   # last, once every process has written its part: it marks the checkpoint complete
                self.state.save_to_json(str(folder / TRAINER_STATE))
        logger.info("saved %s", folder)

    def _load_checkpoint(self, folder: Path) -> None:
        deepspeed = self.accelerator.state.deepspeed_plugin is not None
        if not (folder / DEEPSPEED_TAG if deepspeed else folder / "optimizer.pt").exists():
            raise ConfigError(f"checkpoint {folder} has no {'DeepSpeed ' if deepspeed else ''}optimizer state (was it "
                              f"saved with `save_only_model`{'' if deepspeed else ', or under DeepSpeed'}?): it cannot "
                              f"be resumed")
        if deepspeed:
            # Weights (value head included) and optimizer partitions, each process its own.
            loaded, _ = self.model.load_checkpoint(str(folder), tag=DEEPSPEED_TAG, load_module_strict=False,
                                                   load_optimizer_states=True, load_lr_scheduler_states=False)
            if loaded is None:
                raise ConfigError(f"`resume_from_checkpoint`: DeepSpeed could not read {folder / DEEPSPEED_TAG}")
        else:
            self._load_weights(folder)
            self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True))
        self.scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
        saved = TrainerState.load_from_json(str(folder / TRAINER_STATE))
        self.state.global_step, self.state.epoch = saved.global_step, saved.epoch
        self.state.log_history, self.state.num_input_tokens_seen = saved.log_history, saved.num_input_tokens_seen
        self.load_state_dict(json.loads((folder / STAGE_STATE).read_text(encoding="utf-8")))
        rng_path = folder / f"rng_state_{self.accelerator.process_index}.pth"
        if rng_path.is_file():
            rng = torch.load(rng_path, weights_only=False)
            random.setstate(rng["python"])
            np.random.set_state(rng["numpy"])
            torch.set_rng_state(rng["cpu"])
            if rng["cuda"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
        else:
            logger.warning("%s has no %s (saved with another number of processes): sampling continues with fresh "
                           "random numbers", folder, rng_path.name)
        logger.info("resumed from %s at step %d", folder, self.state.global_step)

    def _load_weights(self, folder: Path) -> None:
        """The policy's weights (adapter or whole model) and the value head, as `_save_model` wrote them."""
        if hasattr(self.policy, "peft_config"):
            from peft import set_peft_model_state_dict

            weights = load_file(folder / "adapter_model.safetensors")
            result = set_peft_model_state_dict(self.policy, weights, adapter_name=self.policy.active_adapter)
        else:
            weights = {k: v for path in sorted(folder.glob("model*.safetensors")) for k, v in load_file(path).items()}
            # Not strict: a tied output head is saved once, under the embeddings' name.
            result = self.policy.load_state_dict(weights, strict=False)
        if not weights or result.unexpected_keys:
            raise ConfigError(f"`resume_from_checkpoint`: the weights in {folder} do not fit this model "
                              f"(unexpected: {', '.join(result.unexpected_keys[:5]) if weights else 'no weights'})")
        model = self.accelerator.unwrap_model(self.model)
        if isinstance(model, ValueHeadModel):
            model.load_value_head(folder)

    def _finish(self, runtime: float, steps_run: int) -> dict[str, Any]:
        output_dir = Path(self.args.output_dir)
        rows_per_step = self.prompts.per_round * self.completions_per_prompt * self.accelerator.num_processes
        losses = [r["loss"] for r in self.state.log_history if "loss" in r]
        metrics = {
            "epoch": self.state.epoch,
            "num_input_tokens_seen": self.state.num_input_tokens_seen,
            "train_loss": sum(losses) / len(losses) if losses else 0.0,
            "train_runtime": round(runtime, 4),
            "train_samples_per_second": round(steps_run * rows_per_step / max(runtime, 1e-9), 3),
            "train_steps_per_second": round(steps_run / max(runtime, 1e-9), 3),
        }
        self.accelerator.wait_for_everyone()
        with saving_final_weights(output_dir, self.accelerator.unwrap_model(self.model)):
            self._save_model(output_dir)
        if self.accelerator.is_main_process:
            self.state.save_to_json(str(output_dir / TRAINER_STATE))
            for name in ("train_results.json", "all_results.json"):
                (output_dir / name).write_text(json.dumps(metrics, indent=4, sort_keys=True) + "\n", encoding="utf-8")
            if self.config.plot_loss:
                for path in plot_metrics(output_dir, self.plot_keys):
                    logger.info("saved %s", path)
        self.accelerator.wait_for_everyone()
        return metrics
