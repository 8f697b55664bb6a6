"""Trainer callbacks that write what LLaMA-Factory users and tools read: `trainer_log.jsonl`, one line per log step."""

import json
import math
import os
import time
from pathlib import Path

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from tunelab.training.output_dir import TRAINER_LOG as LOG_FILE


class TrainerLogCallback(TrainerCallback):
    """Appends `{current_steps, total_steps, loss, eval_loss, lr, epoch, percentage, elapsed_time, remaining_time,
    throughput, total_tokens}` to output_dir/trainer_log.jsonl on every log, from the main process only.

    On resume, lines past the resumed step (written after the checkpoint was taken) are dropped first, with a last
    line cut short by a kill, so the file reads as one uninterrupted run. The shortened file replaces the old one
    whole, so a kill while shortening it loses nothing.
    """

    def __init__(self) -> None:
        self.start_time = 0.0
        self.start_step = 0
        self.start_tokens = 0

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        self.start_time = time.time()
        self.start_step = state.global_step
        self.start_tokens = state.num_input_tokens_seen
        if state.is_world_process_zero:
            self._drop_lines_after(Path(args.output_dir) / LOG_FILE, state.global_step)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None,
               **kwargs) -> None:
        if not state.is_world_process_zero or not logs:
            return
        elapsed = time.time() - self.start_time
        steps_done = state.global_step - self.start_step
        remaining = elapsed / steps_done * (state.max_steps - state.global_step) if steps_done else 0.0
        tokens = state.num_input_tokens_seen
        record = {
            "current_steps": state.global_step,
            "total_steps": state.max_steps,
            "loss": logs.get("loss"),
            "eval_loss": logs.get("eval_loss"),
            "lr": logs.get("learning_rate"),
            "epoch": round(state.epoch or 0.0, 4),
            "percentage": round(100 * state.global_step / state.max_steps, 2) if state.max_steps else 0.0,
            "elapsed_time": _clock(elapsed),
            "remaining_time": _clock(remaining),
            "throughput": round((tokens - self.start_tokens) / elapsed, 2) if elapsed > 0 else None,
            "total_tokens": tokens,
        }
        # Stage-specific metrics (rewards, accuracies, ...) ride along under their own names.
        record.update({k: v for k, v in logs.items() if k not in ("loss", "eval_loss", "learning_rate", "epoch")
                       and isinstance(v, (int, float))})
        record = {k: v for k, v in record.items() if v is not None}
        with open(Path(args.output_dir) / LOG_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")

    @staticmethod
    def _drop_lines_after(path: Path, step: int) -> None:
        if not path.exists():
            return
        if step == 0:
            path.unlink()
            return
        kept = [line for line in path.read_text(encoding="utf-8").splitlines() if _step_of(line) <= step]
        shortened = path.with_name(f".{path.name}.tmp")
        shortened.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(shortened, path)


def _step_of(line: str) -> float:
    """The step of a log line; infinite for one cut short by a kill (always the last one, past the checkpoint)."""
    try:
        return json.loads(line).get("current_steps", 0)
    except ValueError:
        return math.inf


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
