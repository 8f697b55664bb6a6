"""`ChatTemplate`: a template written as a few format strings (one row of `table.TEMPLATES`, or a user's YAML
file), rendered in Python for training (`render_pieces`, here) and as the Jinja chat template saved with the tokenizer
(`jinja`, built in jinja.py from the same strings), so any serving engine formats prompts as training did. Tests
render every row both ways and compare.
"""

import json
import logging
from dataclasses import dataclass, fields
from typing import Any

from tunelab.data.template.base import Template
from tunelab.data.template.jinja import build_jinja
from tunelab.data.template.strings import TemplateError, fill, placeholders
from tunelab.data.template.tools import ToolFormat, get_tool_format

logger = logging.getLogger(__name__)

PROMPT_ROLES = ("user", "tool")
TRIMMABLE = ("system", "user", "assistant")
MEDIA_MARKUP = ("image_markup", "video_markup")


def split_thought(content: str, open_tag: str, close_tag: str) -> tuple[str, str]:
    """(reasoning, answer) of a reply, split exactly as Qwen3's chat template splits `<think>...</think>answer`."""
    if close_tag not in content:
        return "", content
    reasoning = content.split(close_tag)[0].rstrip("\n").split(open_tag)[-1].lstrip("\n")
    return reasoning, content.split(close_tag)[-1].lstrip("\n")


def _is_query(message: dict) -> bool:
    """A user turn that asks something (Qwen3 counts a user turn holding only a <tool_response> as a tool result)."""
    content = message["content"]
    return message["role"] == "user" and not (content.startswith("<tool_response>")
                                             and content.endswith("</tool_response>"))


@dataclass(frozen=True)
class ChatTemplate(Template):
    """A template from format strings (placeholders `{{content}}`, `{{bos_token}}`, `{{eos_token}}`).

    A conversation renders as: `prefix`, the system block, then per message `user` / `observation` / `assistant`
    (or `function` for a reply calling tools), each reply preceded by `assistant_header`, which is also the generation
    prompt. The fields are documented in loading.py, where user templates are read from YAML.

    `image_markup` and `video_markup` (set in the rows of vision-language families) are read by the Jinja only, which
    writes them for the image and video parts of a message given as a list of parts. The Python rendering never sees
    parts: the data layer has already replaced each file's `<image>` / `<video>` placeholder with the family's vision
    block (data/media), so training text arrives as strings, and that block is this markup with the pad token repeated
    once per image token, as the processor expands the served prompt's markup.
    """

    name: str
    user: str = "{{content}}"
    assistant: str = "{{content}}{{eos_token}}"
    assistant_header: str = ""
    system: str = "{{content}}"
    system_in_user: bool = False
    prefix: str = ""
    default_system: str = ""
    observation: str = ""
    observation_open: str = ""
    observation_close: str = ""
    function: str = ""
    tool_format: str | None = None
    thought: tuple[str, str] | None = None
    enable_thinking: bool = True
    stop_words: tuple[str, ...] = ()
    replace_eos: bool = False
    efficient_eos: bool = False
    markers: tuple[str, ...] = ()
    trim: tuple[str, ...] = ()
    image_markup: str = ""
    video_markup: str = ""

    def __post_init__(self) -> None:
        allowed = {"content", "bos_token", "eos_token"}
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, str) and field.name not in ("name", "default_system", "tool_format"):
                if placeholders(value) - allowed:
                    raise TemplateError(f"template {self.name!r}: `{field.name}` uses unknown placeholders "
                                        f"{sorted(placeholders(value) - allowed)}; allowed are {sorted(allowed)}")
        for name in ("user", "assistant", "system"):
            if "{{content}}" not in getattr(self, name):
                raise TemplateError(f"template {self.name!r}: `{name}` must contain {{{{content}}}}")
        if self.tool_format is not None:
            get_tool_format(self.tool_format)
        if self.thought is not None and not self.assistant.startswith("{{content}}"):
            # With thinking off, the empty reasoning block is part of the prompt: it must sit right after the header.
            raise TemplateError(f"template {self.name!r}: a template with `thought` must start `assistant` with "
                                f"{{{{content}}}}")
        if set(self.trim) - set(TRIMMABLE):
            unknown = sorted(set(self.trim) - set(TRIMMABLE))
            raise TemplateError(f"template {self.name!r}: `trim` names roles whose text loses its surrounding "
                                f"whitespace, one or more of {', '.join(TRIMMABLE)}; not {unknown}")
        if self.replace_eos and not self.stop_words:
            raise TemplateError(f"template {self.name!r}: `replace_eos` makes the first stop word the eos token, "
                                f"but `stop_words` is empty")

    @property
    def supports_tools(self) -> bool:  # type: ignore[override]
        return self.tool_format is not None

    @property
    def tools(self) -> ToolFormat | None:
        return get_tool_format(self.tool_format) if self.tool_format else None

    def check_tokenizer(self, tokenizer: Any) -> None:
        """Make sure the tokenizer reads this template's markup as single tokens, adding the ones it lacks.

        A LLaMA-Factory config may pair a template with a model of another family (the llama3 template on a ChatML
        model, say); it must still run. The missing markers become new special tokens, so the model layer resizes
        the embeddings and trains them; the warning says what that costs and what fits better.
        """
        wanted = (*self.markers, *self.stop_words[:1]) if self.replace_eos else self.markers
        missing = [t for t in wanted if not _is_one_token(tokenizer, t)]
        if missing:
            tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
            logger.warning(
                "template %r needs %s as single tokens, which this tokenizer lacks: added them as new special "
                "tokens, so the embeddings grow and are trained from scratch for them (with LoRA they are saved "
                "beside the adapter). The template of the model's own family, or omitting `template` to use the "
                "tokenizer's chat template, trains faster and better.", self.name, ", ".join(missing))
        texts = [getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), str)]
        # A missing bos renders as nothing (Qwen-family tokenizers have none); a reply must still be able to end.
        if (self.efficient_eos or any("{{eos_token}}" in t for t in texts)) and tokenizer.eos_token is None:
            raise TemplateError(f"template {self.name!r} ends replies with the tokenizer's eos_token, which it lacks")

    # --- Python rendering (training) ---

    def render_pieces(self, tokenizer: Any, messages: list[dict], system: str | None,
                      tools: str | None) -> list[str]:
        special = {"bos_token": tokenizer.bos_token or "", "eos_token": tokenizer.eos_token or ""}
        tool_list = json.loads(tools) if tools else []
        system_text = system or self.default_system
        # Taken before trimming: a blank system prompt still opens an (empty) system block, as `| trim` leaves it.
        shown = bool(system_text)
        system_text = self._trimmed("system", system_text)
        head = fill(self.prefix, **special)
        if tool_list and self.tools.in_system:
            system_text = self.tools.join_system(system_text, self.tools.tools_text(tool_list))
        shown = shown or bool(system_text)
        fused = ""
        if shown and self.system_in_user:
            fused = fill(self.system, content=system_text, **special)
            if not messages or messages[0]["role"] != "user":
                raise TemplateError(f"template {self.name!r} writes the system prompt into the first user turn, "
                                    f"but this conversation starts with a {messages[0]['role'] if messages else 'no'} "
                                    f"turn")
        elif shown:
            head += fill(self.system, content=system_text, **special)
        if tool_list and not self.tools.in_system:
            head += self.tools.tools_text(tool_list)
        last_query = max((i for i, m in enumerate(messages) if _is_query(m)), default=len(messages) - 1)
        pieces, prompt = [], head
        for i, message in enumerate(messages):
            role = message["role"]
            before = messages[i - 1]["role"] if i else None
            after = messages[i + 1]["role"] if i + 1 < len(messages) else None
            if role == "user":
                prompt += fill(self.user, content=(fused if i == 0 else "") + self._trimmed("user", message["content"]),
                               **special)
            elif role == "tool":
                prompt += ((self.observation_open if before != "tool" else "")
                           + fill(self.observation or self.user, content=message["content"], **special)
                           + (self.observation_close if after != "tool" else ""))
            elif role in ("assistant", "tool_call"):
                if before not in PROMPT_ROLES:
                    raise TemplateError(f"message {i} ({role}) does not follow a user or tool message")
                to_prompt, reply = self._reply(message, i > last_query, after is None, special)
                pieces += [prompt + fill(self.assistant_header, **special) + to_prompt, reply]
                prompt = ""
            else:
                raise TemplateError(f"template {self.name!r} cannot render the role {role!r}")
        if prompt:
            raise TemplateError("the conversation does not end with an assistant reply")
        if self.efficient_eos:
            pieces[-1] += special["eos_token"]
        return pieces

    def _reply(self, message: dict, after_query: bool, last: bool, special: dict[str, str]) -> tuple[str, str]:
        """(text that joins the prompt, the reply text) of one reply, as the Jinja template's assistant branch."""
        calling = message["role"] == "tool_call"
        content = "" if calling else self._trimmed("assistant", message["content"])
        to_prompt = ""
        if self.thought:
            open_word, close_word = self.thought
            reasoning, answer = split_thought(content, open_word.strip(), close_word.strip())
            if not self.enable_thinking:
                reasoning = ""
            if after_query and (last or reasoning):
                block = open_word + reasoning.strip("\n") + close_word
                if last and not self.enable_thinking:
                    # The generation prompt holds the empty block when thinking is off: it is not trained.
                    to_prompt, content = block, answer.lstrip("\n")
                else:
                    content = block + answer.lstrip("\n")
            else:
                content = answer
        if calling:
            calls = self.tools.calls_text(json.loads(message["content"]))
            return to_prompt, fill(self.function or self.assistant, content=content + calls, **special)
        return to_prompt, fill(self.assistant, content=content, **special)

    def _trimmed(self, role: str, text: str) -> str:
        return text.strip() if role in self.trim else text

    def definition(self) -> dict[str, Any]:
        # Every field but enable_thinking, which a request may switch. A text-only template leaves its (empty) media
        # markup out, so definitions recorded before those fields existed still match it.
        values = {f.name: getattr(self, f.name) for f in fields(self)
                  if f.name != "enable_thinking" and (f.name not in MEDIA_MARKUP or getattr(self, f.name))}
        return {"kind": "table", **{key: list(v) if isinstance(v, tuple) else v for key, v in values.items()}}

    @property
    def jinja(self) -> str:
        return build_jinja(self)


def _is_one_token(tokenizer: Any, text: str) -> bool:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return len(ids) == 1 and ids[0] != tokenizer.unk_token_id
