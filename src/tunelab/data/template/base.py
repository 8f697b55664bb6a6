"""`Template`: what the data layer needs of any chat template. Two kinds implement it: `ChatTemplate` (chat.py, a
table row or a YAML file) and `TokenizerTemplate` (tokenizer.py, a Jinja template used as is).

A conversation in the internal form (`data/formats.py`) is a list of messages whose roles are `user` and `tool` (a
tool's result) on the prompt side and `assistant` and `tool_call` (content: a JSON list of `{"name", "arguments"}`) on
the reply side. `encode_turns` renders it as text cut into prompt, reply, prompt, reply, ... pieces and cuts the ids of
the whole text at the piece borders (`tokens.split_tokens_batch`); `encode_batch` does so for many conversations
with one tokenizer call.
"""

import logging
from typing import Any

from tunelab.data.template.strings import TemplateError
from tunelab.data.template.tokens import Pairs, split_tokens_batch
from tunelab.data.template.tools import TOOL_FORMATS, ToolFormat

logger = logging.getLogger(__name__)
#: A conversation as the data processors hold it: its messages, its system prompt and its tool list (JSON), or None.
Conversation = tuple[list[dict], str | None, str | None]
#: The tokenizer_config.json key holding the definition of the template a model was trained with.
TRAINED_KEY = "tunelab_template"


class Template:
    """What the data layer needs of a chat template. See `ChatTemplate` and `TokenizerTemplate`."""

    name: str
    default_system: str | None
    stop_words: tuple[str, ...] = ()
    replace_eos: bool = False
    supports_tools: bool = False

    @property
    def jinja(self) -> str | None:
        """The Jinja chat template that renders exactly as `encode_turns` encodes."""
        raise NotImplementedError

    def render_pieces(self, tokenizer: Any, messages: list[dict], system: str | None,
                      tools: str | None) -> list[str]:
        """The conversation as text, cut into prompt, reply, prompt, reply, ... pieces."""
        raise NotImplementedError

    def encode_turns(self, tokenizer: Any, messages: list[dict], system: str | None = None,
                     tools: str | None = None) -> Pairs:
        """(prompt_ids, response_ids) per turn; concatenated, they equal `apply_chat_template` with `.jinja`."""
        return self.encode_batch(tokenizer, [(messages, system, tools)])[0]

    def encode_batch(self, tokenizer: Any, conversations: list[Conversation]) -> list[Pairs]:
        """`encode_turns` of each (messages, system, tools), with one tokenizer call for them all (see
        `tokens.split_tokens_batch`): the data processors encode a whole `datasets.map` batch this way."""
        texts = []
        for messages, system, tools in conversations:
            if not self.supports_tools and (tools or any(m["role"] in ("tool", "tool_call") for m in messages)):
                raise TemplateError(f"template {self.name!r} cannot render tools or tool calls: set `tool_format` "
                                    f"(one of {', '.join(TOOL_FORMATS)}) or use a template whose format has tools")
            texts.append(self.render_pieces(tokenizer, messages, system, tools))
        return [list(zip(ids[0::2], ids[1::2])) for ids in split_tokens_batch(tokenizer, texts)]

    def encode_prompt(self, tokenizer: Any, messages: list[dict], system: str | None = None,
                      tools: str | None = None) -> list[int]:
        """The ids a model continues to write the next reply: the conversation (ending on a user or tool turn) and
        the generation prompt. An empty reply stands in for the one to come, so every template renders its prompt
        exactly as in training."""
        pairs = self.encode_turns(tokenizer, [*messages, {"role": "assistant", "content": ""}], system, tools)
        return [i for prompt, reply in pairs[:-1] for i in prompt + reply] + pairs[-1][0]

    @property
    def tools(self) -> ToolFormat | None:
        """The tool format replies call tools in (to read calls out of generated text), if known."""
        return None

    def prepare_tokenizer(self, tokenizer: Any) -> None:
        """Make the tokenizer end turns, pad and render chats as this template does (before saving it)."""
        if self.replace_eos and tokenizer.eos_token != self.stop_words[0]:
            logger.info("eos token: %s -> %s (the end of a turn in template %r)", tokenizer.eos_token,
                        self.stop_words[0], self.name)
            tokenizer.eos_token = self.stop_words[0]
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        if self.jinja is not None:
            tokenizer.chat_template = self.jinja
        # Saved into tokenizer_config.json with the tokenizer, so every trained copy says what it was trained with
        # (read back by trained.py).
        tokenizer.init_kwargs[TRAINED_KEY] = self.definition()

    def definition(self) -> dict[str, Any]:
        """What identifies this template's prompts, as JSON (`kind` table or jinja)."""
        raise NotImplementedError

    def stop_token_ids(self, tokenizer: Any) -> list[int]:
        """Ids that end generation: the eos and every stop word the tokenizer knows as one token."""
        ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        for word in self.stop_words:
            encoded = tokenizer.encode(word, add_special_tokens=False)
            if len(encoded) == 1 and encoded[0] not in ids:
                ids.append(encoded[0])
        return ids
