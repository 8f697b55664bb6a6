"""What to do with an output_dir that already holds something: resume, start over, or refuse.

The rule (LLaMA-Factory's, made safe): nothing a user trained is removed unless `overwrite_output_dir` says so.
- empty or missing: start fresh (the files `tunelab webui` writes before it starts a run do not count);
- `resume_from_checkpoint` given: continue from that folder;
- holds checkpoints of an unfinished run: continue from the last one;
- holds a finished run or other files: refuse, unless `overwrite_output_dir`, which removes the files a run writes
  (checkpoints, weights, logs, plots, predictions) and leaves anything else in place;
- no training (`do_train: false`, evaluation or prediction only): used as it is; the results files are added.
"""

import logging
import re
import shutil
from pathlib import Path

from tunelab.config import Config, ConfigError

logger = logging.getLogger(__name__)

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
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


def last_checkpoint(output_dir: Path) -> Path | None:
    steps = [(int(m.group(1)), p) for p in output_dir.glob("checkpoint-*") if (m := CHECKPOINT.match(p.name))]
    return max(steps)[1] if steps else None


def prepare_output_dir(config: Config, is_main_process: bool = True) -> str | None:
    """Apply the rule above; returns the checkpoint to resume from, or None to start fresh."""
    if not config.do_train:
        return None
    if config.resume_from_checkpoint is not None:
        if not Path(config.resume_from_checkpoint).is_dir():
            raise ConfigError(f"`resume_from_checkpoint`: no such folder: {config.resume_from_checkpoint}")
        return config.resume_from_checkpoint
    output_dir = Path(config.output_dir)
    if not output_dir.is_dir() or all(path.name in BOARD_FILES for path in output_dir.iterdir()):
        return None
    if config.overwrite_output_dir:
        if is_main_process:
            _remove_run_outputs(output_dir)
        return None
    if (output_dir / FINISHED_MARKER).exists():
        raise ConfigError(f"`output_dir` {output_dir} holds a finished run; set `overwrite_output_dir: true` to "
                          f"train again in it (its results are removed), or choose another `output_dir`")
    checkpoint = last_checkpoint(output_dir)
    if checkpoint is None:
        raise ConfigError(f"`output_dir` {output_dir} is not empty and holds no checkpoint to resume from; set "
                          f"`overwrite_output_dir: true` to train in it anyway, or choose another `output_dir`")
    logger.info("Resuming from %s (set overwrite_output_dir: true to start over)", checkpoint)
    return str(checkpoint)


def _remove_run_outputs(output_dir: Path) -> None:
    removed = []
    for path in sorted(output_dir.iterdir()):
        if CHECKPOINT.match(path.name) or RUN_OUTPUTS.match(path.name):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            removed.append(path.name)
    if removed:
        logger.info("overwrite_output_dir: removed %d earlier outputs from %s", len(removed), output_dir)
