"""Supervised fine-tuning: next-token loss on the assistant replies of chat-formatted samples.

    tunelab train examples/quickstart.yaml

Flow: training arguments (refuses bad values before anything loads) -> output_dir policy -> tokenizer and chat
template -> tokenized data -> model with its fine-tuning method (and, with `moe_aux_loss_coef`, its router loss on)
-> for ASFT the frozen reference -> Trainer -> train, save, evaluate, plot -> with `do_predict`, generate replies to
the evaluation set and score them (predict.py). The loss variants (`use_dft_loss`, `use_eaft_loss`, `use_asft_loss`)
live in sft_losses.py.
"""

from typing import Any

from tunelab.config import Config
from tunelab.data import DataCollator
from tunelab.model import load_model
from tunelab.model.frozen import load_reference_model
from tunelab.model.segment_attention import use_padding_free
from tunelab.training.callbacks import TrainerLogCallback
from tunelab.training.moe import enable_router_loss
from tunelab.training.predict import predict
from tunelab.training.sft_losses import SFTTrainer
from tunelab.training.workflow import start_run, train_and_report


def run(config: Config) -> dict[str, Any]:
    start = start_run(config)
    args, resume_from, tokenizer, splits = start.args, start.resume_from, start.tokenizer, start.splits
    model = load_model(config, tokenizer, trainable=config.do_train)
    # Training and evaluation never reuse a KV cache; with one, transformers would also let neat-packed samples
    # attend to each other.
    model.config.use_cache = False
    if config.moe_aux_loss_coef is not None:
        enable_router_loss(model, config.moe_aux_loss_coef)
    # ASFT's anchor is the model before training; without training the policy is that model.
    reference = load_reference_model(config, tokenizer) if config.use_asft_loss and config.do_train else None
    padding_free = use_padding_free(config, model)
    collator = DataCollator(tokenizer, pad_to_multiple_of=start.pad_to_multiple_of, media=start.media,
                            padding_free=padding_free)
    trainer = SFTTrainer(model=model, args=args, train_dataset=splits.train, eval_dataset=splits.eval,
                         data_collator=collator, processing_class=tokenizer, callbacks=[TrainerLogCallback()],
                         config=config, reference=reference)
    results = train_and_report(trainer, config, resume_from)
    if config.do_predict:
        results.update(predict(trainer, config, start.template, start.media))
    return results
