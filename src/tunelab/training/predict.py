"""`do_predict` with `predict_with_generate` (stage sft): generate a reply to every sample of the evaluation set and
score it against the sample's own reply, writing to output_dir what LLaMA-Factory writes:

- `generated_predictions.jsonl`: one line per sample, in the dataset's order, `{"prompt", "predict", "label"}`;
- `predict_results.json` (also merged into `all_results.json`): `predict_bleu-4`, `predict_rouge-1`,
  `predict_rouge-2`, `predict_rouge-l` (percent, averaged over the samples; see tunelab/eval/text_metrics.py),
  `predict_runtime`, `predict_samples_per_second`, `predict_steps_per_second`.

    tunelab train examples/smollm2_lora_predict.yaml

It runs after training in the same run (on the model just trained), or alone (`do_train: false`, the model loaded
with its `adapter_name_or_path`). Decoding follows the generation keys (`do_sample`, `temperature`, `num_beams`,
`max_new_tokens`, ...); a reply ends at the template's end of turn or the eos.

Speed: prompts are sorted by length and generated `per_device_eval_batch_size` at a time, padded on the left so that
every row's new tokens line up at the end; sorting keeps that padding small. Under torchrun each process generates
every N-th prompt of the sorted order, and the main process gathers the replies, writes the files and scores them.
A model sharded across the processes (DeepSpeed ZeRO-3, FSDP) generates with its layers gathered as they run: every
process makes the same number of generate calls (the shorter shares padded with a repeated prompt whose reply is
dropped) and steps with the others until all are done (transformers' `synced_gpus`).

Texts: `prompt` is the prompt as the model saw it (special tokens included, as LLaMA-Factory writes it); `predict`
and `label` are the generated and the reference reply up to their first stop token, decoded with
`skip_special_tokens`.
"""

import json
import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase, Trainer

from tunelab.config import Config
from tunelab.data import DataCollator, Template, load_datasets
from tunelab.model.generation import generation_config
from tunelab.eval import text_metrics
from tunelab.training.engines import place_frozen_model
from tunelab.training.rollout_types import evaluating

logger = logging.getLogger(__name__)

PREDICTIONS_FILE = "generated_predictions.jsonl"


def load_prompts(config: Config, tokenizer: PreTrainedTokenizerBase, template: Template, media: Any = None) -> Any:
    """The evaluation set as rows of data kind `prompt`: the generation prompt in `input_ids`, the reference reply in
    `labels`. They are the samples of the sft evaluation set, in its order (a `val_size` split depends only on the
    row count and the seed). Packing, streaming and `tokenized_path` shape only the training data and are left out;
    the training datasets are read only when the evaluation set is held out of them."""
    prompt_config = replace(config, packing=False, neat_packing=False, streaming=False, tokenized_path=None,
                            dataset=config.dataset if config.val_size > 0 else None)
    return load_datasets(prompt_config, tokenizer, template, kind="prompt", media=media).eval


def cut_at_stop(ids: list[int], stop_ids: list[int]) -> list[int]:
    """The tokens before the first stop token (all of them when there is none)."""
    stops = set(stop_ids)
    return next((ids[:i] for i, token in enumerate(ids) if token in stops), ids)


@contextmanager
def _padding_left(tokenizer: PreTrainedTokenizerBase) -> Iterator[None]:
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        yield
    finally:
        tokenizer.padding_side = side


def generate_replies(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[dict[str, Any]],
                     generation: GenerationConfig, batch_size: int, show_progress: bool = False,
                     media: Any = None) -> list[list[int]]:
    """The reply to each prompt (token ids, cut before the first stop token of `generation.eos_token_id`), generated
    `batch_size` prompts at a time, longest first, left padded; returned in the order of `prompts`.

    A prompt is a row with `input_ids` and, for a vision-language model (`media`), its `images` and `videos`: the
    collator adds their pixels and mm_token_type_ids, from which the model places its positions past the padding."""
    import torch
    from tqdm.auto import tqdm

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]["input_ids"]), reverse=True)
    collator = DataCollator(tokenizer, media=media)
    device = next(model.parameters()).device
    replies: list[list[int]] = [[] for _ in prompts]
    batches = range(0, len(order), batch_size)
    with _padding_left(tokenizer), evaluating(model), torch.inference_mode():
        for start in tqdm(batches, desc="predicting", unit="batch", disable=not show_progress):
            rows = order[start:start + batch_size]
            batch = collator([{**prompts[i], "attention_mask": [1] * len(prompts[i]["input_ids"])} for i in rows])
            batch = {name: tensor.to(device) for name, tensor in batch.items()}
            output = model.generate(**batch, generation_config=generation)
            new_tokens = output[:, batch["input_ids"].shape[1]:].tolist()
            for i, ids in zip(rows, new_tokens):
                replies[i] = cut_at_stop(ids, generation.eos_token_id)
    return replies


def generating_model(trainer: Trainer) -> PreTrainedModel:
    """The trained model, ready to generate. Under ZeRO-3 a model that has not trained in this run (`do_train:
    false`) holds only its shards and no engine gathers them yet: it gets an inference engine, as a frozen
    reference does."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled() and trainer.model_wrapped is trainer.model:
        return place_frozen_model(trainer.model, trainer.args).module
    return trainer.model


def predict(trainer: Trainer, config: Config, template: Template, media: Any = None) -> dict[str, float]:
    """Generate, write generated_predictions.jsonl and predict_results.json; return the predict_ metrics (the main
    process returns them all, the others only the speed)."""
    from accelerate.utils import gather_object
    from transformers.trainer_utils import speed_metrics

    args, tokenizer = trainer.args, trainer.processing_class
    with args.main_process_first(desc="tokenizing the prediction prompts"):
        dataset = load_prompts(config, tokenizer, template, media)
    columns = dataset.to_dict()  # plain lists: read row by row below
    prompts, references = columns["input_ids"], columns["labels"]
    generation = generation_config(config, tokenizer, template.stop_token_ids(tokenizer), use_cache=True)
    batch_size = args.per_device_eval_batch_size
    logger.info("predicting %d samples, %d per batch on each of %d processes (%s)", len(prompts), batch_size,
                args.world_size, "sampling: set do_sample: false for greedy replies" if generation.do_sample
                else "greedy" if generation.num_beams == 1 else f"beam search, {generation.num_beams} beams")

    start = time.time()
    # Every N-th of the sorted prompts: each process gets as many prompts, and prompts as long, as the others.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    share = order[args.process_index::args.world_size]
    # A sharded model needs every process in every generate call: the same number of rows everywhere.
    padding = [order[-1]] * (math.ceil(len(order) / args.world_size) - len(share))
    rows = [{"input_ids": prompts[i], **{key: columns[key][i] for key in ("images", "videos") if key in columns}}
            for i in share + padding]
    replies = generate_replies(generating_model(trainer), tokenizer, rows, generation, batch_size,
                               show_progress=trainer.is_world_process_zero() and not args.disable_tqdm, media=media)
    by_row = dict(gather_object(list(zip(share, replies[:len(share)]))))
    metrics = speed_metrics("predict", start, num_samples=len(prompts),
                            num_steps=math.ceil(len(prompts) / (batch_size * args.world_size)))
    if not trainer.is_world_process_zero():
        return metrics

    stop_ids = generation.eos_token_id
    records = [{"prompt": tokenizer.decode(prompts[i], skip_special_tokens=False),
                "predict": tokenizer.decode(by_row[i], skip_special_tokens=config.skip_special_tokens),
                "label": tokenizer.decode(cut_at_stop(references[i], stop_ids),
                                          skip_special_tokens=config.skip_special_tokens)}
               for i in range(len(prompts))]
    path = Path(args.output_dir) / PREDICTIONS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    logger.info("saved %d predictions to %s", len(records), path)
    scores = text_metrics.mean_similarity([r["predict"] for r in records], [r["label"] for r in records])
    metrics.update({f"predict_{name}": value for name, value in scores.items()})
    trainer.log_metrics("predict", metrics)
    trainer.save_metrics("predict", metrics)
    return metrics
