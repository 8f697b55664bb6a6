"""The default backend: transformers' `generate` on the model the config names (base, adapters merged; a merged
export; a GGUF file), on the GPU when there is one. Runs anywhere, CPU included."""

import logging
import queue
import threading
from collections.abc import Iterator
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from tunelab.config import Config, ConfigError
from tunelab.infer.engine import Engine, Prompt
from tunelab.model import load_model
from tunelab.model.inference import load_tokenizer_and_template, to_inference_device
from tunelab.model.generation import generation_config
from tunelab.model.loader import resolve_source
from tunelab.model.value_head import ValueHeadModel, has_value_head, last_token_scores

logger = logging.getLogger(__name__)


class OpenAIPenalties(LogitsProcessor):
    """OpenAI's presence and frequency penalties: each token's logit is lowered by `frequency` times the number of
    times the reply has used it so far, plus `presence` once it has been used at all. Only the reply counts, not the
    prompt (unlike transformers' repetition_penalty, which divides logits and counts the prompt too)."""

    def __init__(self, prompt_length: int, presence: float, frequency: float) -> None:
        self.prompt_length, self.presence, self.frequency = prompt_length, presence, frequency

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_length:]
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - counts * self.frequency - (counts > 0).to(scores.dtype) * self.presence


class _Cancelled(StoppingCriteria):
    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class _TokenQueue(BaseStreamer):
    """Receives the new token ids from `generate` (the first `put` is the prompt) for another thread to read."""

    def __init__(self) -> None:
        self.queue: queue.Queue = queue.Queue()
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self.prompt_seen:
            self.queue.put(value.reshape(-1).tolist())
        self.prompt_seen = True

    def end(self) -> None:
        self.queue.put(None)


class HuggingFaceEngine(Engine):
    def __init__(self, config: Config) -> None:
        super().__init__(config, *load_tokenizer_and_template(config))
        self.model = self._load_model()
        self.device = next(self.model.parameters()).device
        backbone = self.model.pretrained_model if self.is_reward_model else self.model
        self.max_context = getattr(backbone.config, "max_position_embeddings", None)
        self.stop_ids = self.template.stop_token_ids(self.tokenizer)

    def _load_model(self) -> torch.nn.Module:
        config = self.config
        model = to_inference_device(load_model(config, self.tokenizer, trainable=False), config)
        if not self.is_reward_model:
            return model
        head_folder = (config.adapter_name_or_path or [resolve_source(config).path])[-1]
        if not has_value_head(head_folder):
            raise ConfigError(f"`stage: rm` serves a reward model, but {head_folder} has no value_head.safetensors: "
                              f"point `adapter_name_or_path` (or `model_name_or_path`) at an rm stage's output")
        scorer = ValueHeadModel(model)
        scorer.load_value_head(head_folder)
        return scorer.to(next(model.parameters()).device).eval()

    # --- generation ---

    def _generate(self, prompt: Prompt, n: int, settings: dict[str, Any]) -> list[tuple[str, int, bool]]:
        inputs = torch.tensor([prompt.ids] * n, device=self.device)
        with torch.inference_mode():
            output = self.model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs),
                                         **self._media_inputs(prompt, n), **self._generate_kwargs(prompt, settings))
        results = []
        for row in output[:, len(prompt.ids):].tolist():
            # A row that ended early (on a stop string) is padded to the longest one.
            while len(row) > 1 and row[-1] == self.tokenizer.pad_token_id and row[-2] == row[-1]:
                row.pop()
            ended = next((i for i, token in enumerate(row) if token in self.stop_ids), None)
            count = len(row) if ended is None else ended + 1
            text = self._decode(row[:count if ended is None else ended], settings)
            results.append((text, count, ended is None and count >= self._max_new(settings)))
        return results

    def _stream(self, prompt: Prompt, settings: dict[str, Any]) -> Iterator[str | tuple[int, bool]]:
        inputs = torch.tensor([prompt.ids], device=self.device)
        streamer, cancel, failure = _TokenQueue(), threading.Event(), []
        kwargs = self._generate_kwargs(prompt, settings)
        kwargs["stopping_criteria"] = StoppingCriteriaList([_Cancelled(cancel)])
        kwargs.update(self._media_inputs(prompt, 1))

        def generate() -> None:
            try:
                with torch.inference_mode():
                    self.model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs), streamer=streamer,
                                        **kwargs)
            except BaseException as err:  # re-raised in the reading thread
                failure.append(err)
                streamer.end()

        worker = threading.Thread(target=generate, daemon=True)
        worker.start()
        ids: list[int] = []
        shown, count, ended = "", 0, False
        try:
            while not ended and (new := streamer.queue.get()) is not None:
                for token in new:
                    count += 1
                    if token in self.stop_ids:
                        ended = True
                        break
                    ids.append(token)
                text = self._decode(ids, settings)
                # A character split over tokens decodes as U+FFFD until its last byte arrives.
                if len(text) > len(shown) and not text.endswith("\ufffd"):
                    yield text[len(shown):]
                    shown = text
            if failure:
                raise failure[0]
            text = self._decode(ids, settings)
            if len(text) > len(shown):
                yield text[len(shown):]
            yield count, not ended and count >= self._max_new(settings)
        finally:
            cancel.set()
            worker.join()

    def _media_inputs(self, prompt: Prompt, n: int) -> dict[str, Any]:
        """The prompt's media inputs for n copies of it, on the model's device, pixels in the model's dtype."""
        inputs = {}
        for key, value in prompt.media_inputs.items():
            # Per-token inputs repeat as rows; per-file ones (pixels, grids, seconds) repeat as more files.
            value = value.repeat(n, 1) if key == "mm_token_type_ids" else torch.cat([value] * n)
            inputs[key] = value.to(self.device, self.model.dtype if value.is_floating_point() else None)
        return inputs

    def _generate_kwargs(self, prompt: Prompt, settings: dict[str, Any]) -> dict[str, Any]:
        overrides = {key: value for key, value in settings.items()
                     if key not in ("stop", "presence_penalty", "frequency_penalty", "skip_special_tokens")}
        # A request's stop strings and a template's multi-token end of turn end generation here (the engine cuts the
        # text at them); the template's single-token stop words are already eos ids.
        stop_strings = [*settings.get("stop", []), *(word for word in self.template.stop_words
                                                     if len(self.tokenizer.encode(word, add_special_tokens=False)) > 1)]
        if stop_strings:
            overrides["stop_strings"] = stop_strings
        kwargs: dict[str, Any] = {
            "generation_config": generation_config(self.config, self.tokenizer, self.stop_ids, **overrides),
            "tokenizer": self.tokenizer}
        presence, frequency = settings.get("presence_penalty", 0.0), settings.get("frequency_penalty", 0.0)
        if presence or frequency:
            kwargs["logits_processor"] = LogitsProcessorList([OpenAIPenalties(len(prompt.ids), presence, frequency)])
        return kwargs

    def _decode(self, ids: list[int], settings: dict[str, Any]) -> str:
        skip = settings.get("skip_special_tokens", self.config.skip_special_tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=skip)

    def _max_new(self, settings: dict[str, Any]) -> int:
        return settings.get("max_new_tokens", self.config.max_new_tokens)

    # --- scoring ---

    def score(self, texts: list[str]) -> list[float]:
        if not self.is_reward_model:
            return super().score(texts)
        scores: list[float] = []
        size = self.config.per_device_eval_batch_size
        with self.lock, torch.inference_mode():
            for start in range(0, len(texts), size):
                batch = self.tokenizer(texts[start:start + size], padding=True, truncation=True,
                                       max_length=self.config.cutoff_len, add_special_tokens=False,
                                       return_tensors="pt").to(self.device)
                values = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).values
                scores += last_token_scores(values, batch["attention_mask"]).float().tolist()
        return scores
