"""What to do with an output_dir that already holds something: resume, start over, or refuse.

The rule (LLaMA-Factory's, made safe): nothing a user trained is removed unless `overwrite_output_dir` says so.
- empty or missing: start fresh (the files `tunelab webui` writes before it starts a run do not count);
- `resume_from_checkpoint` given: continue from that folder;
- holds checkpoints of an unfinished run: continue from the newest complete one (`last_checkpoint`), saying which
  newer ones it passed over and why;
- holds only what a run stopped before its first complete checkpoint leaves (its log, checkpoints cut short): start
  fresh;
- holds a finished run or other files: refuse, unless `overwrite_output_dir`, which removes the files a run writes
  (checkpoints, weights, logs, plots, predictions) and leaves anything else in place;
- no training (`do_train: false`, evaluation or prediction only): used as it is; the results files are added.
"""

import json
import logging
import re
import shutil
from pathlib import Path

from tunelab.config import Config, ConfigError

logger = logging.getLogger(__name__)

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
#: A checkpoint being replaced while its successor is written (`checkpoints.py`); left behind only by a kill.
SET_ASIDE = re.compile(r"^\.checkpoint-\d+\.[0-9a-f]+\.old$")
#: Written last into a checkpoint (by the Trainer and by the rollout loop alike): a checkpoint without it, or with
#: one cut short, was stopped while being saved.
TRAINER_STATE = "trainer_state.json"
#: Written last at the end of a run: a folder holding it whole holds a finished run.
FINISHED_MARKER = "train_results.json"
TRAINER_LOG = "trainer_log.jsonl"
#: What `tunelab webui` writes into output_dir before the run starts: its config, state and log. They belong to the
#: run being started, so they neither make the folder "not empty" nor are removed by `overwrite_output_dir`.
RUN_CONFIG, RUN_STATE, RUN_LOG, RUN_EXIT_CODE = "run_config.yaml", "run_state.json", "run.log", "run_exit_code"
BOARD_FILES = frozenset({RUN_CONFIG, RUN_STATE, RUN_LOG, RUN_EXIT_CODE})
#: Files a training run writes at the top of output_dir; `overwrite_output_dir` removes exactly these.
RUN_OUTPUTS = re.compile(
    r"^(adapter_model\.safetensors|adapter_config\.json|model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json"
    r"|value_head\.safetensors|config\.json|generation_config\.json|tokenizer.*\.json|special_tokens_map\.json|chat_template\.jinja"
    r"|vocab\.json|merges\.txt|tokenizer\.model|added_tokens\.json|training_args\.bin|trainer_state\.json"
    r"|trainer_log\.jsonl|(train|eval|predict|all)_results\.json|generated_predictions\.jsonl|training_.*\.png"
    r"|README\.md|runs)$"
)
#: What a run writes before its first checkpoint is complete: a folder holding only these (and checkpoints cut
#: short) is started afresh.
EARLY_OUTPUTS = frozenset({TRAINER_LOG, "runs"})


def last_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint in output_dir, or None."""
    return newest_complete_checkpoint(Path(output_dir))[0]


def newest_complete_checkpoint(output_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete checkpoint (or None), and each newer one passed over with the reason."""
    steps = sorted(((int(m.group(1)), p) for p in output_dir.glob("checkpoint-*") if (m := CHECKPOINT.match(p.name))
                    and p.is_dir()), reverse=True)
    skipped = []
    for step, folder in steps:
        problem = checkpoint_problem(folder, step)
        if problem is None:
            return folder, skipped
        skipped.append((folder, problem))
    return None, skipped


def checkpoint_problem(folder: Path, step: int | None = None) -> str | None:
    """Why `folder` cannot be resumed from, or None when it is complete (its trainer_state.json, written last, is
    whole and of `step`)."""
    path = folder / TRAINER_STATE
    if not path.is_file():
        return f"incomplete (no {TRAINER_STATE}: the run was probably stopped while saving it)"
    try:
        saved_step = json.loads(path.read_text(encoding="utf-8"))["global_step"]
    except (ValueError, KeyError, TypeError):
        return f"incomplete ({TRAINER_STATE} is cut short: the run was probably stopped while writing it)"
    if step is not None and saved_step != step:
        return f"its {TRAINER_STATE} is of step {saved_step}, not {step}"
    return None


def run_finished(output_dir: Path) -> bool:
    """Whether output_dir holds a finished run: its train_results.json (written last) is there and whole."""
    try:
        json.loads((output_dir / FINISHED_MARKER).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return False
    except ValueError:
        logger.warning("%s is cut short (the run was stopped while writing it): the run is unfinished",
                       output_dir / FINISHED_MARKER)
        return False
    return True


def prepare_output_dir(config: Config, is_main_process: bool = True) -> str | None:
    """Apply the rule above; returns the checkpoint to resume from, or None to start fresh."""
    if not config.do_train:
        return None
    if config.resume_from_checkpoint is not None:
        folder = Path(config.resume_from_checkpoint)
        if not folder.is_dir():
            raise ConfigError(f"`resume_from_checkpoint`: no such folder: {config.resume_from_checkpoint}")
        problem = checkpoint_problem(folder)
        if problem is not None:
            raise ConfigError(f"`resume_from_checkpoint`: {folder} cannot be resumed from: {problem}")
        return config.resume_from_checkpoint
    output_dir = Path(config.output_dir)
    if not output_dir.is_dir() or all(path.name in BOARD_FILES for path in output_dir.iterdir()):
        return None
    if config.overwrite_output_dir:
        if is_main_process:
            _remove_run_outputs(output_dir)
        return None
    if run_finished(output_dir):
        raise ConfigError(f"`output_dir` {output_dir} holds a finished run; set `overwrite_output_dir: true` to "
                          f"train again in it (its results are removed), or choose another `output_dir`")
    checkpoint, skipped = newest_complete_checkpoint(output_dir)
    # Every process decides the same; the main one says why.
    if is_main_process:
        for folder, problem in skipped:
            logger.warning("Skipping %s: %s", folder.name, problem)
    level = logging.INFO if is_main_process else logging.DEBUG
    if checkpoint is None and all(_early_output(path) for path in output_dir.iterdir()):
        logger.log(level, "%s holds no complete checkpoint yet (its run stopped before the first one was saved): "
                   "starting over", output_dir)
        return None
    if checkpoint is None:
        raise ConfigError(f"`output_dir` {output_dir} is not empty and holds no checkpoint to resume from; set "
                          f"`overwrite_output_dir: true` to train in it anyway, or choose another `output_dir`")
    logger.log(level, "Resuming from %s (set overwrite_output_dir: true to start over)", checkpoint)
    return str(checkpoint)


def _early_output(path: Path) -> bool:
    """Whether `path` is what a run writes before its first complete checkpoint (called once none is complete)."""
    return (path.name in BOARD_FILES or path.name in EARLY_OUTPUTS or bool(SET_ASIDE.match(path.name))
            or bool(CHECKPOINT.match(path.name)))


def _remove_run_outputs(output_dir: Path) -> None:
    removed = []
    for path in sorted(output_dir.iterdir()):
        if CHECKPOINT.match(path.name) or SET_ASIDE.match(path.name) or RUN_OUTPUTS.match(path.name):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            removed.append(path.name)
    if removed:
        logger.info("overwrite_output_dir: removed %d earlier outputs from %s", len(removed), output_dir)
