"""The template engine: `Template` (what the data layer needs of any chat template) and `ChatTemplate` (a template
written as a few format strings: one row of `template_table.TEMPLATES`, or a user's YAML file).

A conversation in the internal form (`formats.py`) is a list of messages whose roles are `user` and `tool` (a tool's
result) on the prompt side and `assistant` and `tool_call` (content: a JSON list of `{"name", "arguments"}`) on the
reply side. `encode_turns` renders it as text cut into prompt, reply, prompt, reply, ... pieces, tokenizes the whole
text in one piece as `tokenizer.apply_chat_template` does, and cuts the ids at the piece borders (`split_tokens`).

A `ChatTemplate` renders itself twice from the same format strings: in Python for training (`render_pieces`), and as
a Jinja chat template (`jinja`) saved with the tokenizer, so any serving engine formats prompts as training did.
Tests render every row both ways and compare.
"""

import json
import logging
from bisect import bisect_right
from dataclasses import dataclass, fields
from itertools import accumulate
from typing import Any
from weakref import WeakKeyDictionary

from tunelab.data.format_strings import TemplateError, fill, jinja_emit, jinja_expr, placeholders
from tunelab.data.tool_formats import TOOL_FORMATS, ToolFormat, get_tool_format

logger = logging.getLogger(__name__)

Pairs = list[tuple[list[int], list[int]]]
PROMPT_ROLES = ("user", "tool")


def split_tokens(tokenizer: Any, pieces: list[str]) -> list[list[int]]:
    """Tokenize `"".join(pieces)` as one text (as `apply_chat_template` does) and cut its ids at the piece borders.

    The ids are always the whole text's, so prompt and reply ids concatenated are exactly what inference sees. A
    token belongs to the piece its text ends in: one that spans a border (Qwen's "\\n\\n" when a reply starts with a
    newline after "assistant\\n") goes to the later piece. Fast tokenizers give each token's character span; others
    are cut where the whole-text ids stop agreeing with the ids of the text up to each border.
    """
    backend = _backend(tokenizer)
    if backend is None:
        return _split_by_prefixes(tokenizer, pieces)
    encoding = backend.encode("".join(pieces), add_special_tokens=False)
    full, ends = encoding.ids, [end for _, end in encoding.offsets]
    if any(a > b for a, b in zip(ends, ends[1:])):
        return _split_by_prefixes(tokenizer, pieces)
    borders = accumulate(len(piece) for piece in pieces[:-1])
    cuts = [0, *(bisect_right(ends, border) for border in borders), len(full)]
    return [full[a:b] for a, b in zip(cuts, cuts[1:])]


_PROBE = "<|im_start|>user\n Hi  there,\t世界!\n\n</s><s>[INST] ok ✓<|im_end|>\n"
_backends: "WeakKeyDictionary[Any, Any]" = WeakKeyDictionary()


def _backend(tokenizer: Any) -> Any:
    """The tokenizer's Rust backend when it encodes exactly as the tokenizer does (checked once per tokenizer): calling
    it directly gives character spans and halves the cost of encoding a sample. None for Python tokenizers."""
    if tokenizer not in _backends:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        same = backend is not None and \
            backend.encode(_PROBE, add_special_tokens=False).ids == tokenizer.encode(_PROBE, add_special_tokens=False)
        _backends[tokenizer] = backend if same else None
    return _backends[tokenizer]


def _split_by_prefixes(tokenizer: Any, pieces: list[str]) -> list[list[int]]:
    full = tokenizer("".join(pieces), add_special_tokens=False)["input_ids"]
    prefix_ids = tokenizer(list(accumulate(pieces))[:-1], add_special_tokens=False)["input_ids"]
    cuts = [0]
    for ids in prefix_ids:
        agree = next((n for n, (a, b) in enumerate(zip(ids, full)) if a != b), min(len(ids), len(full)))
        cuts.append(max(agree, cuts[-1]))
    cuts.append(len(full))
    return [full[a:b] for a, b in zip(cuts, cuts[1:])]


def to_hf_messages(messages: list[dict[str, str]], system: str | None) -> list[dict[str, Any]]:
    """The internal conversation as the messages `apply_chat_template` takes (OpenAI style tool calls)."""
    out: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    for message in messages:
        if message["role"] == "tool_call":
            calls = [{"type": "function", "function": call} for call in json.loads(message["content"])]
            out.append({"role": "assistant", "content": "", "tool_calls": calls})
        else:
            out.append({"role": message["role"], "content": message["content"]})
    return out


class Template:
    """What the data layer needs of a chat template. See `ChatTemplate` and `templates.TokenizerTemplate`."""

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
        if (tools or any(m["role"] in ("tool", "tool_call") for m in messages)) and not self.supports_tools:
            raise TemplateError(f"template {self.name!r} cannot render tools or tool calls: set `tool_format` (one of "
                                f"{', '.join(TOOL_FORMATS)}) or use a template whose format has tools")
        ids = split_tokens(tokenizer, self.render_pieces(tokenizer, messages, system, tools))
        return list(zip(ids[0::2], ids[1::2]))

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

    def stop_token_ids(self, tokenizer: Any) -> list[int]:
        """Ids that end generation: the eos and every stop word the tokenizer knows as one token."""
        ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        for word in self.stop_words:
            encoded = tokenizer.encode(word, add_special_tokens=False)
            if len(encoded) == 1 and encoded[0] not in ids:
                ids.append(encoded[0])
        return ids


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
    prompt. The fields are documented in `templates.py`, where user templates are read from YAML.
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
        head = fill(self.prefix, **special)
        if tool_list and self.tools.in_system:
            system_text = self.tools.join_system(system_text, self.tools.tools_text(tool_list))
        fused = ""
        if system_text and self.system_in_user:
            fused = fill(self.system, content=system_text, **special)
            if not messages or messages[0]["role"] != "user":
                raise TemplateError(f"template {self.name!r} writes the system prompt into the first user turn, "
                                    f"but this conversation starts with a {messages[0]['role'] if messages else 'no'} "
                                    f"turn")
        elif system_text:
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
                prompt += fill(self.user, content=(fused if i == 0 else "") + message["content"], **special)
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
        content = "" if calling else message["content"]
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

    # --- Jinja rendering (the saved chat template) ---

    @property
    def jinja(self) -> str:
        emit_system = jinja_expr(self.system, content="system")
        lines = []
        if self.thought:
            lines.append(f"{{%- set thinking = enable_thinking if enable_thinking is defined else "
                         f"{str(self.enable_thinking).lower()} -%}}")
        lines += [
            "{%- if messages and messages[0]['role'] == 'system' -%}",
            "{%- set system = messages[0]['content'] -%}{%- set loop_messages = messages[1:] -%}",
            "{%- else -%}",
            f"{{%- set system = {json.dumps(self.default_system, ensure_ascii=False)} -%}}"
            "{%- set loop_messages = messages -%}",
            "{%- endif -%}",
        ]
        style = self.tools
        if style:
            lines += ["{%- if tools -%}", *style.jinja_tools_text("tool_text")]
            if style.in_system:
                lines.append(style.jinja_join_system("tool_text"))
            lines.append("{%- endif -%}")
        lines.append(jinja_emit(self.prefix))
        if not self.system_in_user:
            lines.append(f"{{%- if system -%}}{{{{- {emit_system} -}}}}{{%- endif -%}}")
        if style and not style.in_system:
            lines.append("{%- if tools -%}{{- tool_text -}}{%- endif -%}")
        if self.thought:
            lines += [
                "{%- set query = namespace(index=loop_messages | length - 1) -%}",
                "{%- for message in loop_messages -%}",
                "{%- if message['role'] == 'user' and not (message['content'].startswith('<tool_response>') and "
                "message['content'].endswith('</tool_response>')) -%}{%- set query.index = loop.index0 -%}"
                "{%- endif -%}",
                "{%- endfor -%}",
            ]
        lines += ["{%- for message in loop_messages -%}", "{%- if message['role'] == 'user' -%}"]
        if self.system_in_user:
            lines += [
                "{%- if loop.first and system -%}",
                jinja_emit(self.user, content=f"{emit_system} + message['content']"),
                "{%- else -%}", jinja_emit(self.user, content="message['content']"), "{%- endif -%}",
            ]
        else:
            lines.append(jinja_emit(self.user, content="message['content']"))
        lines += [
            "{%- elif message['role'] == 'tool' -%}",
            "{%- if loop.first or loop.previtem['role'] != 'tool' -%}" + jinja_emit(self.observation_open)
            + "{%- endif -%}",
            jinja_emit(self.observation or self.user, content="message['content']"),
            "{%- if loop.last or loop.nextitem['role'] != 'tool' -%}" + jinja_emit(self.observation_close)
            + "{%- endif -%}",
            "{%- elif message['role'] == 'assistant' -%}",
            jinja_emit(self.assistant_header),
            "{%- set content = message['content'] if message['content'] is string else '' -%}",
            *self._jinja_thought(),
            "{%- if message.tool_calls -%}",
        ]
        if style:
            lines += [*style.jinja_calls_text("calls"), jinja_emit(self.function or self.assistant,
                                                                   content="content + calls")]
        else:
            lines.append(f"{{{{- raise_exception('template {self.name} has no tool format') -}}}}")
        lines += [
            "{%- else -%}", jinja_emit(self.assistant, content="content"), "{%- endif -%}",
            "{%- else -%}",
            f"{{{{- raise_exception('template {self.name} cannot render the role ' + message['role']) -}}}}",
            "{%- endif -%}",
            "{%- endfor -%}",
        ]
        if self.efficient_eos:
            lines.append("{%- if loop_messages and loop_messages[-1]['role'] == 'assistant' and not "
                         "add_generation_prompt -%}{{- eos_token -}}{%- endif -%}")
        lines += ["{%- if add_generation_prompt -%}", jinja_emit(self.assistant_header)]
        if self.thought:
            lines.append("{%- if not thinking -%}" + jinja_emit(self.thought[0] + self.thought[1]) + "{%- endif -%}")
        lines.append("{%- endif -%}")
        return "\n".join(line for line in lines if line) + "\n"

    def _jinja_thought(self) -> list[str]:
        """The Jinja twin of `_reply`'s reasoning handling (Qwen3's own template, plus the enable_thinking switch)."""
        if not self.thought:
            return []
        open_word, close_word = self.thought
        open_tag, close_tag = json.dumps(open_word.strip()), json.dumps(close_word.strip())
        return [
            "{%- set reasoning = '' -%}",
            # A served conversation may pass reasoning apart from the answer, as Qwen3's own template accepts it.
            "{%- if message.reasoning_content is defined and message.reasoning_content is not none -%}",
            "{%- set reasoning = message.reasoning_content -%}",
            f"{{%- elif {close_tag} in content -%}}",
            f"{{%- set reasoning = content.split({close_tag})[0].rstrip('\\n').split({open_tag})[-1]"
            ".lstrip('\\n') -%}",
            f"{{%- set content = content.split({close_tag})[-1].lstrip('\\n') -%}}",
            "{%- endif -%}",
            "{%- if not thinking -%}{%- set reasoning = '' -%}{%- endif -%}",
            "{%- if loop.index0 > query.index and (loop.last or reasoning) -%}",
            f"{{%- set content = {json.dumps(open_word)} + reasoning.strip('\\n') + {json.dumps(close_word)} + "
            "content.lstrip('\\n') -%}",
            "{%- endif -%}",
        ]


def _is_one_token(tokenizer: Any, text: str) -> bool:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return len(ids) == 1 and ids[0] != tokenizer.unk_token_id
