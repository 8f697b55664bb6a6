"""The steps every Trainer-based stage shares after its model and data are built: train, save, evaluate, report."""

import logging
import math
from dataclasses import dataclass, replace
from typing import Any

from transformers import PreTrainedTokenizerBase, Trainer, TrainingArguments, set_seed

from tunelab.config import Config
from tunelab.config.stages import STAGE_SPECS
from tunelab.data import DatasetSplits, MediaProcessor, Template, load_datasets, load_media_processor, prepare_template
from tunelab.data.stats import row_lengths
from tunelab.model import copy_processor_files, load_tokenizer
from tunelab.training.arguments import build_training_arguments, padding_multiple
from tunelab.training.engines import EngineReport, force_fsdp_on_cpu, save_whole_model
from tunelab.training.optimizers import attach_optimizer
from tunelab.training.output_dir import prepare_output_dir
from tunelab.training.pissa import add_pissa_conversion
from tunelab.training.plotting import plot_metrics

logger = logging.getLogger(__name__)


@dataclass
class RunStart:
    """What every stage builds before its model: arguments, where to resume from, tokenizer, template, data."""

    args: TrainingArguments
    resume_from: str | None
    tokenizer: PreTrainedTokenizerBase
    template: Template | None
    splits: DatasetSplits
    media: MediaProcessor | None = None   # a vision-language model's images and videos; the collator takes it too
    pad_to_multiple_of: int | None = None   # for the collator (`padding_multiple`)


def start_run(config: Config) -> RunStart:
    """Training arguments (bad values stop the run before anything loads) -> output_dir policy -> seed ->
    tokenizer and chat template -> tokenized datasets (by the main process first, the others read its cache)."""
    args = build_training_arguments(config)
    resume_from = prepare_output_dir(config, is_main_process=args.process_index == 0)
    set_seed(config.seed)
    tokenizer = load_tokenizer(config)
    template = prepare_template(config, tokenizer)
    media = load_media_processor(config, tokenizer)
    with args.main_process_first(desc="tokenizing the datasets"):
        # The others read what the main process of their node has just written, `overwrite_cache` or not.
        reading = replace(config, overwrite_cache=False) if args.local_process_index else config
        splits = load_datasets(reading, tokenizer, template, media=media)
    if args.train_sampling_strategy in ("group_by_length", "batch_rebalance") and hasattr(splits.train, "add_column"):
        # transformers' samplers read the lengths from this column; without it they would read every row, and could
        # not measure pairs at all.
        lengths = row_lengths(splits.train, STAGE_SPECS[config.stage].data)
        splits.train = splits.train.add_column(args.length_column_name, lengths.tolist())
    return RunStart(args, resume_from, tokenizer, template, splits, media, padding_multiple(config, args))


def train_and_report(trainer: Trainer, config: Config, resume_from: str | None,
                     plot_keys: tuple[str, ...] = ("loss", "eval_loss")) -> dict[str, Any]:
    """Run `do_train` and `do_eval` as configured and write what LLaMA-Factory writes:
    the weights and tokenizer, trainer_state.json, train/eval/all_results.json and, with `plot_loss`, the curves."""
    results: dict[str, Any] = {}
    force_fsdp_on_cpu(trainer)
    trainer.add_callback(EngineReport(trainer))
    if config.do_train:
        attach_optimizer(trainer, config)
        add_pissa_conversion(trainer, config)
        output = trainer.train(resume_from_checkpoint=resume_from)
        metrics = dict(output.metrics)
        state = trainer.state
        tokens = state.num_input_tokens_seen
        metrics["num_input_tokens_seen"] = tokens
        # Tokens of this session over its runtime (a resumed run counts only what it trained itself).
        session_tokens = tokens - getattr(trainer, "_initial_num_input_tokens_seen", 0)
        metrics["train_tokens_per_second"] = round(session_tokens / max(metrics["train_runtime"], 1e-9), 2)
        save_whole_model(trainer)
        if trainer.is_world_process_zero():
            # A vision-language model's image processor settings go beside the weights, so the folder chats and
            # exports on its own.
            copy_processor_files(config, config.output_dir)
        trainer.save_state()
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        results.update(metrics)
        if config.plot_loss and trainer.is_world_process_zero():
            for path in plot_metrics(config.output_dir, plot_keys):
                logger.info("Saved %s", path)
    if trainer.args.do_eval and trainer.eval_dataset is not None:
        metrics = last_step_evaluation(trainer) or trainer.evaluate(metric_key_prefix="eval")
        # Perplexity is exp of the next-token cross-entropy; the other stages' losses, and the SFT variants that
        # weight each token (DFT, EAFT, ASFT), are not one.
        if "eval_loss" in metrics and STAGE_SPECS[config.stage].next_token_loss and not config.sft_loss_variant:
            metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        results.update(metrics)
    return results


def last_step_evaluation(trainer: Trainer) -> dict[str, float] | None:
    """The metrics of the evaluation the Trainer ran after the last step, when it ran one (`eval_steps` divides the
    run): the weights have not changed since, so evaluating again would repeat a whole pass over the set for the same
    numbers. None otherwise, and with `load_best_model_at_end` (the weights now are the best step's)."""
    last = next((record for record in reversed(trainer.state.log_history) if "eval_loss" in record), None)
    if last is None or last["step"] != trainer.state.global_step or trainer.args.load_best_model_at_end:
        return None
    return {key: value for key, value in last.items() if key.startswith("eval_") or key == "epoch"}
