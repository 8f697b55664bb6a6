"""The vLLM backend (`infer_backend: vllm`): paged attention and continuous batching on a GPU machine with the vllm
package installed (`pip install 'tunelab[vllm]'`). The prompt is rendered by the same template as with the default
backend and handed to vLLM as token ids, so both backends see identical prompts.

It serves a model folder or hub id with at most one LoRA adapter (vLLM applies it per request). Its offline `LLM`
class returns finished replies, so a stream arrives as one piece. Not exercised by tunelab's CPU test suite.
"""

from collections.abc import Iterator
from typing import Any

from tunelab.config import Config, ConfigError
from tunelab.infer.engine import Engine, Prompt
from tunelab.model.inference import load_tokenizer_and_template
from tunelab.model.loader import resolve_source


class VllmEngine(Engine):
    def __init__(self, config: Config) -> None:
        from vllm import LLM  # installed: config/packages.py refuses the config otherwise
        source = resolve_source(config)
        adapters = config.adapter_name_or_path or []
        if source.gguf_file or config.quantization_bit is not None or len(adapters) > 1 or config.stage == "rm":
            raise ConfigError("`infer_backend: vllm` serves a float model folder or hub id with at most one LoRA "
                              "adapter and no value head: export a merged model (`tunelab export`) for GGUF, "
                              "quantized or multi-adapter setups, and use `infer_backend: huggingface` for `stage: rm`")
        super().__init__(config, *load_tokenizer_and_template(config))
        if self.media is not None:
            raise ConfigError(f"`infer_backend: vllm` cannot serve tunelab's vision-language models yet (their images "
                              f"are not handed to vLLM): serve {config.model_name_or_path} with `infer_backend: "
                              f"huggingface`")
        self.llm = LLM(model=source.path, tokenizer=adapters[-1] if adapters else source.path,
                       trust_remote_code=config.trust_remote_code, dtype=config.infer_dtype,
                       max_model_len=config.vllm_maxlen, gpu_memory_utilization=config.vllm_gpu_util,
                       enforce_eager=config.vllm_enforce_eager, enable_lora=bool(adapters),
                       max_lora_rank=config.vllm_max_lora_rank, revision=config.model_revision)
        self.lora = None
        if adapters:
            from vllm.lora.request import LoRARequest

            self.lora = LoRARequest("adapter", 1, adapters[0])
        self.max_context = config.vllm_maxlen

    def _sampling(self, n: int, settings: dict[str, Any]) -> Any:
        from vllm import SamplingParams

        get = lambda key: settings.get(key, getattr(self.config, key))  # noqa: E731
        sampling = get("do_sample")
        return SamplingParams(
            n=n, temperature=get("temperature") if sampling else 0.0, top_p=get("top_p") if sampling else 1.0,
            top_k=get("top_k") if sampling and get("top_k") > 0 else -1, max_tokens=get("max_new_tokens"),
            repetition_penalty=get("repetition_penalty"), presence_penalty=settings.get("presence_penalty", 0.0),
            frequency_penalty=settings.get("frequency_penalty", 0.0), stop=settings.get("stop") or None,
            stop_token_ids=self.template.stop_token_ids(self.tokenizer), skip_special_tokens=get("skip_special_tokens"))

    def _generate(self, prompt: Prompt, n: int, settings: dict[str, Any]) -> list[tuple[str, int, bool]]:
        (result,) = self.llm.generate([{"prompt_token_ids": prompt.ids}], self._sampling(n, settings),
                                      lora_request=self.lora, use_tqdm=False)
        return [(out.text, len(out.token_ids), out.finish_reason == "length") for out in result.outputs]

    def _stream(self, prompt: Prompt, settings: dict[str, Any]) -> Iterator[str | tuple[int, bool]]:
        ((text, count, hit_limit),) = self._generate(prompt, 1, settings)
        yield text
        yield count, hit_limit
