"""`tunelab.ChatModel`: the engine for people who embed a trained model in their own Python code.

    from tunelab import ChatModel
    model = ChatModel("examples/quickstart_chat.yaml")        # a config file, a dict, or a Config
    model.chat([{"role": "user", "content": "Who are you?"}])[0].text
    for piece in model.stream_chat(messages, temperature=0.2):
        print(piece, end="", flush=True)
    replies = await model.achat(messages)                     # and astream_chat, aget_scores

For a vision-language model, `images=[...]` (paths or PIL images) and `videos=[...]` go with any call, as in
LLaMA-Factory's ChatModel, or as content parts ({"type": "image", "image": ...}) of a user message.

Messages take LLaMA-Factory's roles (user, assistant, observation, function) or OpenAI's (system, user, assistant
with tool_calls, tool); `system` and `tools` (OpenAI function specs) are optional; keyword settings override the
config's generation keys for one call. A reply is a `Reply`: text, finish_reason, token counts, tool_calls.
"""

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from tunelab.config import Config, load_config
from tunelab.infer.backends import build_engine
from tunelab.infer.engine import Reply


class ChatModel:
    def __init__(self, config: Config | dict[str, Any] | str | Path) -> None:
        self.config = config if isinstance(config, Config) else load_config(config)
        self.engine = build_engine(self.config)

    def chat(self, messages: list[dict], system: str | None = None, tools: list[dict] | None = None,
             **settings: Any) -> list[Reply]:
        """Replies to the conversation (`n=2` for two)."""
        return self.engine.chat(messages, system, tools, **settings)

    def stream_chat(self, messages: list[dict], system: str | None = None, tools: list[dict] | None = None,
                    **settings: Any) -> Iterator[str]:
        """The reply's text, piece by piece as it is generated."""
        for delta in self.engine.stream(messages, system, tools, **settings):
            if delta.text:
                yield delta.text

    def get_scores(self, texts: list[str]) -> list[float]:
        """Reward scores of whole conversations as text (a reward model, `stage: rm`)."""
        return self.engine.score(texts)

    async def achat(self, messages: list[dict], system: str | None = None, tools: list[dict] | None = None,
                    **settings: Any) -> list[Reply]:
        return await self.engine.achat(messages, system, tools, **settings)

    async def astream_chat(self, messages: list[dict], system: str | None = None, tools: list[dict] | None = None,
                           **settings: Any) -> AsyncIterator[str]:
        async for delta in self.engine.astream(messages, system, tools, **settings):
            if delta.text:
                yield delta.text

    async def aget_scores(self, texts: list[str]) -> list[float]:
        return await self.engine.ascore(texts)
