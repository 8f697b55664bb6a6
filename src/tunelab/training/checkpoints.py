"""Checkpoints that count only once complete, and a full disk reported in one sentence.

A `checkpoint-N` folder is complete once its trainer_state.json is there and whole: the Trainer writes that file
last, after the weights, optimizer, scheduler and random states, and the rollout loop (`rollout_checkpoint.py`) does
the same. So the resume (`output_dir.py`) takes the newest complete checkpoint, and the Trainer's `save_total_limit`
rotation, which runs only after that file is written, never removes the last complete checkpoint before the new one
is complete.

Around every save, `saving_checkpoint`:
* refuses it before anything is written when the disk has less room than the previous checkpoint took;
* renames a `checkpoint-N` already there (one cut short by a kill, or of a later step of a run resumed from an
  earlier checkpoint) out of the way, and removes it once the new one is complete, so two saves never mix files
  (a folder so set aside is hidden, `.checkpoint-N.*.old`; one a kill left behind goes after the next save);
* on a failed save removes what it wrote and puts the renamed folder back; a full disk then stops the run with one
  message naming the folder, the space needed and the checkpoint to resume from (exit status 2).
"""

import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer

from tunelab.data.disk import folder_bytes, room_for, tensor_bytes
from tunelab.training.output_dir import SET_ASIDE, last_checkpoint


@contextmanager
def saving_checkpoint(folder: Path, writer: bool, wait: Callable[[], None], model: Any,
                      optimizer: Any) -> Iterator[None]:
    """Write checkpoint `folder` in the body. Every process enters it; `writer` is the one that writes the shared
    files, `wait` a barrier of all processes, `model` and `optimizer` what is saved (for the space it needs)."""
    previous = last_checkpoint(folder.parent)
    if previous is None:
        then = "No checkpoint is complete yet: free some space and run the same command again (it starts over)."
    else:
        then = (f"{previous.name}, the last complete checkpoint, is intact: free some space and run the same command "
                f"again to resume from it.")
    # The previous checkpoint is the best measure of the next; without one the state in memory is.
    needed = folder_bytes(previous) if previous is not None else state_bytes(model, optimizer)
    aside, writing = None, False
    try:
        with room_for(folder.parent, folder.name, needed, then, check_first=previous is not None):
            if writer and folder.exists():
                aside = folder.with_name(f".{folder.name}.{uuid.uuid4().hex}.old")
                folder.rename(aside)
            # No process may write its part into the folder before it has been moved out of the way.
            wait()
            writing = True
            yield
    # Cleaned up only now: `room_for` tells a full disk by what is left on it.
    except BaseException:
        if writer and writing:
            shutil.rmtree(folder, ignore_errors=True)
            if aside is not None:
                aside.rename(folder)
        raise
    if writer:   # the folder set aside, and any a kill left behind
        for path in folder.parent.iterdir():
            if SET_ASIDE.match(path.name):
                shutil.rmtree(path, ignore_errors=True)


def saving_final_weights(output_dir: Path, model: Any) -> AbstractContextManager[None]:
    """Write the trained weights of `model` into output_dir in the body, refused when they do not fit there. They go
    in place: output_dir holds other files, so it cannot be swapped whole, and train_results.json, written after
    them, is what says the run finished; a run stopped before it resumes and writes the weights again."""
    previous = last_checkpoint(output_dir)
    then = (f"The run is not finished: free some space and run the same command again to resume from {previous.name} "
            f"and write them." if previous is not None else "Free some space and train again.")
    return room_for(output_dir, "the final weights", state_bytes(model, None), then)


def state_bytes(model: Any, optimizer: Any) -> int:
    """About what a checkpoint of `model` and `optimizer` takes: the weights a save writes (an adapter's trainable
    ones only) and the optimizer's state."""
    adapter = hasattr(model, "peft_config")
    weights = [p for p in model.parameters() if p.requires_grad or not adapter]
    moments = [t for state in (optimizer.state.values() if optimizer is not None else ()) for t in state.values()
               if torch.is_tensor(t)]
    return tensor_bytes(weights + moments)


class CheckpointingTrainer(Trainer):
    """The Trainer with its checkpoints and final weights saved as the module docstring says."""

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        with saving_checkpoint(folder, self.args.should_save, self.accelerator.wait_for_everyone,
                               self.accelerator.unwrap_model(self.model), self.optimizer):
            super()._save_checkpoint(model, trial)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if _internal_call:   # into a checkpoint, inside `_save_checkpoint`
            super().save_model(output_dir, _internal_call)
            return
        with saving_final_weights(Path(output_dir or self.args.output_dir), self.accelerator.unwrap_model(self.model)):
            super().save_model(output_dir, _internal_call)
