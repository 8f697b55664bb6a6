"""Chat templates: how a conversation becomes text, and that text becomes (prompt, response) token pieces.

Two kinds, one interface (`Template`):

* `ChatTemplate`, a row of the `TEMPLATES` table (`template: qwen`): a few format strings with `{{content}}`,
  `{{bos_token}}` and `{{eos_token}}` placeholders. It renders itself in Python for training and as a Jinja chat
  template (`.jinja`) for the saved tokenizer; tests check both give the same tokens.
* `TokenizerTemplate` (no `template:` key): the tokenizer's own Jinja chat template, used as is. Its turn boundaries
  are found by rendering conversation prefixes, never by guessing where a turn's markup starts.

Both tokenize the whole rendered conversation in one piece, exactly as `tokenizer.apply_chat_template` does, and then
cut the ids at the turn boundaries (`split_tokens`), so training sees the very ids inference will see.

Adding a model family is one `ChatTemplate(...)` row plus a parity test against its tokenizer's own template.
"""

import json
import logging
import re
from dataclasses import dataclass, replace
from itertools import accumulate
from typing import Any

from tunelab.data.registry import DataError

logger = logging.getLogger(__name__)

Pairs = list[tuple[list[int], list[int]]]
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


class TemplateError(DataError):
    """A template that cannot be used with this tokenizer or cannot render a conversation."""


def _fill(fmt: str, **values: str) -> str:
    """Replace `{{name}}` placeholders in one pass (a reply containing "{{eos_token}}" stays text)."""
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], fmt)


def _jinja_expr(fmt: str, exprs: dict[str, str]) -> str:
    """A format string as one Jinja expression: literals quoted, placeholders replaced by the given expressions."""
    parts = []
    for i, piece in enumerate(_PLACEHOLDER.split(fmt)):
        if i % 2:
            parts.append(exprs[piece])
        elif piece:
            parts.append(json.dumps(piece, ensure_ascii=False))  # JSON escapes are valid Jinja string escapes
    return " + ".join(parts) or '""'


def _emit(fmt: str, **exprs: str) -> str:
    exprs = {"content": "message['content']", "bos_token": "bos_token", "eos_token": "eos_token", **exprs}
    return f"{{{{- {_jinja_expr(fmt, exprs)} -}}}}" if fmt else ""


def split_tokens(tokenizer: Any, pieces: list[str]) -> list[list[int]]:
    """Tokenize `"".join(pieces)` as one text (as `apply_chat_template` does) and cut its ids at the piece borders.

    Usually every border sits next to a special token and the pieces tokenize alone to the same ids. Where a token
    spans a border (a reply starting with a newline after "assistant\\n"), the whole-text ids are cut where they stop
    agreeing with the ids of the text up to the border, so the spanning token goes to the later piece. Either way the
    concatenated pieces equal the whole-text ids, exactly.
    """
    texts = ["".join(pieces), *pieces]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    full, parts = encoded[0], encoded[1:]
    if [i for part in parts for i in part] == full:
        return parts
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
    """What the data layer needs of a chat template. See `ChatTemplate` and `TokenizerTemplate`."""

    name: str
    default_system: str | None
    stop_words: tuple[str, ...] = ()
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
            raise TemplateError(f"template {self.name!r} cannot render tools or tool calls; use `template: qwen` "
                                f"or a tokenizer whose own chat template supports tools")
        pieces = self.render_pieces(tokenizer, messages, system, tools)
        ids = split_tokens(tokenizer, pieces)
        return list(zip(ids[0::2], ids[1::2]))

    def prepare_tokenizer(self, tokenizer: Any) -> None:
        """Make the tokenizer end turns, pad and render chats as this template does (before saving it)."""
        if self.stop_words and tokenizer.eos_token != self.stop_words[0]:
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


@dataclass(frozen=True)
class ToolStyle:
    """How a template shows the tool list (inside the system prompt), a tool call and a tool's result."""

    tools_intro: str        # system text before the tool list: one JSON object per line follows
    tools_outro: str        # system text after the list
    call: str               # one call, with {{name}} and {{arguments}} (JSON)
    call_separator: str     # between several calls of one reply
    call_end: str           # after the calls: the template's end of an assistant turn
    observation: str        # a tool-result turn, with {{content}}

    def system_text(self, tools: list[dict]) -> str:
        return self.tools_intro + "".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools) + self.tools_outro

    def call_text(self, calls: list[dict]) -> str:
        return self.call_separator.join(
            _fill(self.call, name=c["name"], arguments=json.dumps(c["arguments"], ensure_ascii=False))
            for c in calls) + self.call_end


@dataclass(frozen=True)
class ChatTemplate(Template):
    """A template from format strings. A reply is `assistant_header` (also the generation prompt) + `assistant`."""

    name: str
    user: str
    assistant: str
    assistant_header: str = ""
    system: str = "{{content}}"
    prefix: str = ""
    default_system: str = ""
    stop_words: tuple[str, ...] = ()     # the first one becomes the tokenizer's eos
    markers: tuple[str, ...] = ()        # markup that must be one token each in the tokenizer
    tool_style: ToolStyle | None = None

    @property
    def supports_tools(self) -> bool:  # type: ignore[override]
        return self.tool_style is not None

    def check_tokenizer(self, tokenizer: Any) -> None:
        """Make sure the tokenizer reads this template's markup as single tokens, adding the ones it lacks.

        A LLaMA-Factory config may pair a template with a model of another family (the llama3 template on a ChatML
        model, say); it must still run. The missing markers become new special tokens, so the model layer resizes
        the embeddings and trains them; the warning says what that costs and what fits better.
        """
        missing = [t for t in (*self.markers, *self.stop_words[:1]) if not _is_one_token(tokenizer, t)]
        if missing:
            tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
            logger.warning(
                "template %r needs %s as single tokens, which this tokenizer lacks: added them as new special "
                "tokens, so the embeddings grow and are trained from scratch for them (with LoRA they are saved "
                "beside the adapter). The template of the model's own family, or omitting `template` to use the "
                "tokenizer's chat template, trains faster and better.", self.name, ", ".join(missing))
        # A missing bos renders as nothing (Qwen-family tokenizers have none); a reply must still be able to end.
        formats = (self.prefix, self.system, self.user, self.assistant_header, self.assistant)
        if any("{{eos_token}}" in f for f in formats) and tokenizer.eos_token is None:
            raise TemplateError(f"template {self.name!r} ends replies with the tokenizer's eos_token, which it lacks")

    def render_pieces(self, tokenizer: Any, messages: list[dict], system: str | None,
                      tools: str | None) -> list[str]:
        special = {"bos_token": tokenizer.bos_token or "", "eos_token": tokenizer.eos_token or ""}
        system_text = system or self.default_system
        if tools:
            system_text += self.tool_style.system_text(json.loads(tools))
        head = _fill(self.prefix, **special)
        if system_text:
            head += _fill(self.system, content=system_text, **special)
        header = _fill(self.assistant_header, **special)
        pieces = []
        for i in range(0, len(messages), 2):
            query, reply = messages[i], messages[i + 1]
            turn = self.user if query["role"] == "user" else self.tool_style.observation
            pieces.append((head if i == 0 else "") + _fill(turn, content=query["content"], **special) + header)
            if reply["role"] == "tool_call":
                pieces.append(self.tool_style.call_text(json.loads(reply["content"])))
            else:
                pieces.append(_fill(self.assistant, content=reply["content"], **special))
        return pieces

    @property
    def jinja(self) -> str:
        lines = [
            "{%- if messages and messages[0]['role'] == 'system' -%}",
            "{%- set system = messages[0]['content'] -%}{%- set loop_messages = messages[1:] -%}",
            "{%- else -%}",
            f"{{%- set system = {json.dumps(self.default_system, ensure_ascii=False)} -%}}"
            "{%- set loop_messages = messages -%}",
            "{%- endif -%}",
            _emit(self.prefix),
        ]
        style = self.tool_style
        if style:
            tool_list = f"""{json.dumps(style.tools_intro)} + '\\n' + (tools | map('tojson') | join('\\n')) + \
{json.dumps(style.tools_outro)}"""
            lines.append(f"{{%- if tools -%}}{{%- set system = system + {tool_list} -%}}{{%- endif -%}}")
        lines += [
            "{%- if system -%}", _emit(self.system, content="system"), "{%- endif -%}",
            "{%- for message in loop_messages -%}",
            "{%- if message['role'] == 'user' -%}", _emit(self.user),
        ]
        if style:
            lines += [
                "{%- elif message['role'] == 'assistant' and message.tool_calls -%}", _emit(self.assistant_header),
                "{%- for call in message.tool_calls -%}",
                "{%- set fn = call.function if call.function is defined else call -%}",
                "{%- if not loop.first -%}" + _emit(style.call_separator) + "{%- endif -%}",
                _emit(style.call, name="fn.name", arguments="(fn.arguments | tojson)"),
                "{%- endfor -%}", _emit(style.call_end),
                "{%- elif message['role'] == 'tool' -%}", _emit(style.observation),
            ]
        lines += [
            "{%- elif message['role'] == 'assistant' -%}", _emit(self.assistant_header + self.assistant),
            "{%- else -%}",
            f"{{{{- raise_exception('template {self.name} cannot render the role ' + message['role']) -}}}}",
            "{%- endif -%}",
            "{%- endfor -%}",
            "{%- if add_generation_prompt -%}", _emit(self.assistant_header), "{%- endif -%}",
        ]
        return "\n".join(line for line in lines if line) + "\n"


def _is_one_token(tokenizer: Any, text: str) -> bool:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return len(ids) == 1 and ids[0] != tokenizer.unk_token_id


class TokenizerTemplate(Template):
    """The tokenizer's own chat template. `default_system` (config) is added as a Jinja header so the saved
    tokenizer inserts it too; `render_kwargs` (enable_thinking) reach the template as variables."""

    name = "tokenizer"

    def __init__(self, tokenizer: Any, default_system: str | None = None, enable_thinking: bool = True) -> None:
        own = tokenizer.chat_template
        if isinstance(own, dict):  # older tokenizers store several named templates
            own = own.get("default")
        self.own = own
        self.default_system = default_system
        self.render_kwargs = {"enable_thinking": enable_thinking}
        self.supports_tools = own is not None and self._probe_tools(tokenizer)

    @property
    def jinja(self) -> str | None:
        if self.own is None or not self.default_system:
            return self.own
        system = json.dumps(self.default_system, ensure_ascii=False)
        return ("{%- if not messages or messages[0]['role'] != 'system' -%}"
                f"{{%- set messages = [{{'role': 'system', 'content': {system}}}] + messages -%}}"
                "{%- endif -%}\n" + self.own)

    def _render(self, tokenizer: Any, conversations: list[list[dict]], tools: list | None,
                add_generation_prompt: bool) -> list[str]:
        try:
            return tokenizer.apply_chat_template(conversations, tools=tools, chat_template=self.jinja, tokenize=False,
                                                 add_generation_prompt=add_generation_prompt, **self.render_kwargs)
        except Exception as err:  # jinja raises TemplateError and plain exceptions alike
            raise TemplateError(f"the tokenizer's own chat template cannot render this conversation: {err}") from err

    def _probe_tools(self, tokenizer: Any) -> bool:
        """Whether the template shows the tool list, a tool call and a tool result (rather than dropping them)."""
        tools = [{"type": "function", "function": {"name": "probe_tool_xq", "description": "probe",
                                                   "parameters": {"type": "object", "properties": {}}}}]
        call = {"role": "tool_call", "content": json.dumps([{"name": "probe_call_xq", "arguments": {}}])}
        messages = to_hf_messages([{"role": "user", "content": "hi"}, call,
                                   {"role": "tool", "content": "probe_result_xq"},
                                   {"role": "assistant", "content": "ok"}], None)
        try:
            (text,) = self._render(tokenizer, [messages], tools, False)
        except TemplateError:
            return False
        return all(word in text for word in ("probe_tool_xq", "probe_call_xq", "probe_result_xq"))

    def render_pieces(self, tokenizer: Any, messages: list[dict], system: str | None,
                      tools: str | None) -> list[str]:
        if self.own is None:
            raise TemplateError("the tokenizer has no chat template: set `template:` (one of "
                                f"{', '.join(TEMPLATES)}) in the config")
        conversation = to_hf_messages(messages, system)
        offset = len(conversation) - len(messages)  # 1 with a system message
        tool_list = json.loads(tools) if tools else None
        ends = range(offset + 1, len(conversation) + 1, 2)  # after each prompt-side message
        prompts = self._render(tokenizer, [conversation[:end] for end in ends], tool_list, True)
        replies = self._render(tokenizer, [conversation[:end + 1] for end in ends], tool_list, False)
        pieces, done = [], ""
        for turn, (prompt, reply) in enumerate(zip(prompts, replies)):
            # Rendering the conversation up to a turn must extend, never rewrite, what came before.
            if not (prompt.startswith(done) and reply.startswith(prompt) and len(reply) > len(prompt)):
                raise TemplateError(
                    f"the tokenizer's own chat template is not prefix-stable at turn {turn + 1} (it rewrites earlier "
                    f"turns, e.g. drops past reasoning), so prompt and reply tokens cannot be told apart exactly; "
                    f"set `template:` to one of {', '.join(TEMPLATES)}")
            pieces += [prompt[len(done):], reply[len(prompt):]]
            done = reply
        return pieces


QWEN_TOOLS = ToolStyle(
    tools_intro="\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n<tools>",
    tools_outro="\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
                "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
                "<args-json-object>}\n</tool_call>",
    call='<tool_call>\n{"name": "{{name}}", "arguments": {{arguments}}}\n</tool_call>',
    call_separator="\n",
    call_end="<|im_end|>\n",
    observation="<|im_start|>user\n<tool_response>\n{{content}}\n</tool_response><|im_end|>\n",
)

_CHATML = ChatTemplate(
    name="chatml",
    system="<|im_start|>system\n{{content}}<|im_end|>\n",
    user="<|im_start|>user\n{{content}}<|im_end|>\n",
    assistant_header="<|im_start|>assistant\n",
    assistant="{{content}}<|im_end|>\n",
    stop_words=("<|im_end|>",),
    markers=("<|im_start|>", "<|im_end|>"),
)

#: The template table: name -> template. LLaMA-Factory's names and formats.
TEMPLATES: dict[str, ChatTemplate] = {t.name: t for t in (
    # No markup: the prompt as is, the reply followed by eos (so a model trained with it learns to stop).
    ChatTemplate(name="empty", user="{{content}}", assistant="{{content}}{{eos_token}}"),
    _CHATML,
    replace(_CHATML, name="qwen", default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
            tool_style=QWEN_TOOLS),
    ChatTemplate(
        name="llama3",
        prefix="{{bos_token}}",
        system="<|start_header_id|>system<|end_header_id|>\n\n{{content}}<|eot_id|>",
        user="<|start_header_id|>user<|end_header_id|>\n\n{{content}}<|eot_id|>",
        assistant_header="<|start_header_id|>assistant<|end_header_id|>\n\n",
        assistant="{{content}}<|eot_id|>",
        stop_words=("<|eot_id|>", "<|eom_id|>"),
        markers=("<|start_header_id|>", "<|end_header_id|>"),
    ),
)}


def get_template(config: Any, tokenizer: Any) -> Template:
    """The template `config.template` names, or the tokenizer's own chat template when it names none."""
    name = config.template
    if name is None:
        template = TokenizerTemplate(tokenizer, config.default_system, config.enable_thinking)
        if template.own is None and config.stage != "pt":
            raise TemplateError(f"the tokenizer of {config.model_name_or_path} has no chat template: set `template:` "
                                f"to the one its model was trained with (one of {', '.join(TEMPLATES)})")
        return template
    if name not in TEMPLATES:
        import difflib

        close = difflib.get_close_matches(name, list(TEMPLATES), n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise TemplateError(f"unknown template {name!r}: {hint}known: {', '.join(TEMPLATES)} "
                            f"(or omit `template` to use the tokenizer's own chat template)")
    template = TEMPLATES[name]
    if config.default_system is not None:
        template = replace(template, default_system=config.default_system)
    template.check_tokenizer(tokenizer)
    return template
