"""Chat templates: how a conversation becomes text, and that text becomes (prompt, reply) token pieces.

    template = get_template(config, tokenizer)     # from `template:` (and default_system, enable_thinking, tool_format)
    template.prepare_tokenizer(tokenizer)          # eos, pad and the chat template the saved tokenizer carries
    pairs = template.encode_turns(tokenizer, messages, system, tools)   # [(prompt_ids, reply_ids), ...]

`template:` in a config is one of

* a name from `TEMPLATES` (`template_table.py`: LLaMA-Factory's names, e.g. `qwen`, `llama3`, `qwen3`): a
  `ChatTemplate`, rendered in Python for training and saved as the Jinja template it equals;
* a YAML file (`template: my_template.yaml`) holding the fields of a `ChatTemplate`, listed below;
* a Jinja file (`template: my_template.jinja`): a chat template used like a tokenizer's own;
* omitted: the tokenizer's own chat template (`TokenizerTemplate`), used as is.

Fields of a template (YAML keys; only `user`, `assistant` and `system` hold `{{content}}`, and every text may hold
`{{bos_token}}` and `{{eos_token}}`):

    base               a template name whose fields are the defaults of this file's (e.g. `base: qwen`)
    name               shown in messages (default: the file's stem)
    prefix             text at the very start, e.g. "{{bos_token}}"
    system             a system prompt, e.g. "<|im_start|>system\\n{{content}}<|im_end|>\\n"
    system_in_user     true: the system text goes in front of the first user message instead (Llama 2, Gemma)
    default_system     the system prompt of a sample that has none
    user               a user message, e.g. "<|im_start|>user\\n{{content}}<|im_end|>\\n"
    assistant_header   what opens a reply; also the generation prompt, e.g. "<|im_start|>assistant\\n"
    assistant          a reply with its end of turn, e.g. "{{content}}<|im_end|>\\n"
                       (default "{{content}}{{eos_token}}")
    observation        a tool's result (default: like a user message); observation_open / observation_close wrap a
                       run of consecutive results (Qwen puts them in one user turn)
    function           a reply that calls tools, {{content}} being the calls (default: like `assistant`)
    tool_format        how tools and calls are written: qwen, llama3, glm4 or mistral (see tool_formats.py)
    thought            [open, close] of a reasoning block, e.g. ["<think>\\n", "\\n</think>\\n\\n"]: earlier replies
                       lose their reasoning and the last one always shows a block, as in Qwen3's own template
    stop_words         texts that end generation; replace_eos: true makes the first one the tokenizer's eos
    efficient_eos      true: replies carry no end of their own; the conversation's last one is followed by eos
    markers            markup that must be one token each (added as special tokens when the tokenizer lacks them)

`examples/templates/` holds an example of each kind of file.

When the tokenizer's own template is used, turn borders are found by rendering conversation prefixes with
`apply_chat_template` (the prompt of turn k is the conversation up to it with the generation prompt), never by
guessing where markup starts. A template that rewrites earlier turns once later ones exist (Qwen3's drops the
reasoning of past replies; Phi-3.5's ends a finished conversation with eos) cannot have every reply cut out of the
final text exactly; there, the last reply is trained in the exact context it is generated in, and the earlier turns
are its prompt (as with `mask_history`), which a warning says once.
"""

import difflib
import json
import logging
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from tunelab.data.chat_template import ChatTemplate, Pairs, Template, split_tokens, to_hf_messages
from tunelab.data.format_strings import TemplateError
from tunelab.data.template_table import TEMPLATES
from tunelab.data.tool_formats import TOOL_FORMATS, ToolFormat

logger = logging.getLogger(__name__)

__all__ = ["TEMPLATES", "ChatTemplate", "Pairs", "Template", "TemplateError", "TokenizerTemplate", "get_template",
           "load_template_file", "split_tokens", "to_hf_messages"]

REPLY_ROLES = ("assistant", "tool_call")
_rewriting_warned: set[str] = set()


class TokenizerTemplate(Template):
    """A Jinja chat template used as is: the tokenizer's own, or a user's `.jinja` file.

    `default_system` (config) is added as a Jinja header so the saved tokenizer inserts it too; `enable_thinking`
    reaches the template as a variable, and when it is false the saved template defaults to no thinking (so a served
    model is prompted without thinking, as it was trained).
    """

    def __init__(self, tokenizer: Any, default_system: str | None = None, enable_thinking: bool = True,
                 own: str | None = None, name: str = "tokenizer") -> None:
        if own is None:
            own = tokenizer.chat_template
            if isinstance(own, dict):  # older tokenizers store several named templates
                own = own.get("default")
        self.name = name
        self.own = own
        self.default_system = default_system
        self.render_kwargs = {"enable_thinking": enable_thinking}
        self.supports_tools = False
        self._tools = self._probe_tools(tokenizer) if own is not None else None

    @property
    def tools(self) -> ToolFormat | None:
        return self._tools

    @property
    def jinja(self) -> str | None:
        if self.own is None:
            return None
        header = ""
        if self.default_system:
            system = json.dumps(self.default_system, ensure_ascii=False)
            header += ("{%- if not messages or messages[0]['role'] != 'system' -%}"
                       f"{{%- set messages = [{{'role': 'system', 'content': {system}}}] + messages -%}}"
                       "{%- endif -%}\n")
        if not self.render_kwargs["enable_thinking"] and "enable_thinking" in self.own:
            header += "{%- if enable_thinking is not defined -%}{%- set enable_thinking = false -%}{%- endif -%}\n"
        return header + self.own

    def _render(self, tokenizer: Any, conversations: list[list[dict]], tools: list | None,
                add_generation_prompt: bool) -> list[str]:
        try:
            return tokenizer.apply_chat_template(conversations, tools=tools, chat_template=self.jinja, tokenize=False,
                                                 add_generation_prompt=add_generation_prompt, **self.render_kwargs)
        except Exception as err:  # jinja raises TemplateError and plain exceptions alike
            raise TemplateError(f"the chat template of {self.name} cannot render this conversation: {err}") from err

    def _probe_tools(self, tokenizer: Any) -> ToolFormat | None:
        """Set `supports_tools` when the template shows the tool list, a tool call and a tool result (rather than
        dropping them); return the tool format it writes calls in, when it is one of ours (so generated calls can be
        read back)."""
        tools = [{"type": "function", "function": {"name": "probe_tool_xq", "description": "probe",
                                                   "parameters": {"type": "object", "properties": {}}}}]
        probe_call = {"name": "probe_call_xq", "arguments": {"x": 1}}
        call = {"role": "tool_call", "content": json.dumps([probe_call])}
        messages = to_hf_messages([{"role": "user", "content": "hi"}, call,
                                   {"role": "tool", "content": "probe_result_xq"},
                                   {"role": "assistant", "content": "ok"}], None)
        try:
            (text,) = self._render(tokenizer, [messages], tools, False)
        except TemplateError:
            return None
        if not all(word in text for word in ("probe_tool_xq", "probe_call_xq", "probe_result_xq")):
            return None
        self.supports_tools = True
        return next((f for f in TOOL_FORMATS.values() if f.calls_text([probe_call]) in text), None)

    def render_pieces(self, tokenizer: Any, messages: list[dict], system: str | None,
                      tools: str | None) -> list[str]:
        if self.own is None:
            raise TemplateError("the tokenizer has no chat template: set `template:` (one of "
                                f"{', '.join(TEMPLATES)}) in the config")
        if not messages or messages[-1]["role"] not in REPLY_ROLES:
            raise TemplateError("the conversation does not end with an assistant reply")
        conversation = to_hf_messages(messages, system)
        offset = len(conversation) - len(messages)  # 1 with a system message
        replies_at = [offset + i for i, m in enumerate(messages) if m["role"] in REPLY_ROLES]
        tool_list = json.loads(tools) if tools else None
        prompts = self._render(tokenizer, [conversation[:at] for at in replies_at], tool_list, True)
        endings = self._render(tokenizer, [conversation[:at + 1] for at in replies_at], tool_list, False)
        pieces, done = [], ""
        for prompt, ending in zip(prompts, endings):
            # Rendering the conversation up to a turn must extend, never rewrite, what came before.
            if not (prompt.startswith(done) and ending.startswith(prompt) and len(ending) > len(prompt)):
                return self._last_reply_only(prompts[-1], endings[-1])
            pieces += [prompt[len(done):], ending[len(prompt):]]
            done = ending
        return pieces

    def _last_reply_only(self, prompt: str, full: str) -> list[str]:
        """Pieces for a template that rewrites earlier turns: the history is the prompt of the last reply."""
        if not (full.startswith(prompt) and len(full) > len(prompt)):
            raise TemplateError(
                f"the chat template of {self.name} renders the last reply's generation prompt differently from the "
                f"finished conversation (Mistral v0.3's drops a system prompt from a finished one; a reply holding "
                f"reasoning while enable_thinking is false does too), so the reply cannot be told apart from its "
                f"prompt exactly: set `template:` to one of {', '.join(TEMPLATES)}")
        if self.name not in _rewriting_warned:
            _rewriting_warned.add(self.name)
            logger.warning("the chat template of %s rewrites earlier turns once later ones exist (e.g. drops past "
                           "reasoning), so in multi-turn samples only the last reply is trained, in exactly the "
                           "context it is generated in; its earlier turns are prompt. A table template (`template:`) "
                           "trains every reply.", self.name)
        return [prompt, full[len(prompt):]]


# --- user-defined templates ---

_YAML_FIELDS = {f.name: f for f in fields(ChatTemplate) if f.name != "enable_thinking"}


def load_template_file(path: str | Path) -> ChatTemplate:
    """A `ChatTemplate` from a YAML file of its fields (see the module docstring)."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise TemplateError(f"{path}: cannot read the template file: {err}") from err
    if not isinstance(data, dict):
        raise TemplateError(f"{path}: a template file holds a mapping of template fields (user, assistant, ...)")
    base = data.pop("base", None)
    if base is not None and base not in TEMPLATES:
        raise TemplateError(f"{path}: `base: {base}` is not a template name; known: {', '.join(TEMPLATES)}")
    values: dict[str, Any] = {"name": path.stem}
    for key, value in data.items():
        if key not in _YAML_FIELDS:
            close = difflib.get_close_matches(str(key), [*_YAML_FIELDS, "base"], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TemplateError(f"{path}: unknown template field {key!r}{hint}; "
                                f"fields: base, {', '.join(_YAML_FIELDS)}")
        values[key] = _field_value(path, key, value)
    return replace(TEMPLATES[base], **values) if base else ChatTemplate(**values)


def _field_value(path: Path, key: str, value: Any) -> Any:
    """A YAML value checked against the field's kind: text, true/false, or a list of texts."""
    kind = _YAML_FIELDS[key].type
    texts = isinstance(value, list) and all(isinstance(v, str) for v in value)
    if key == "thought":
        valid, expected = texts and len(value) == 2, "a list of two texts [open, close]"
    elif key == "tool_format":
        valid, expected = value is None or value in TOOL_FORMATS, f"one of {', '.join(TOOL_FORMATS)}"
    elif kind is bool:
        valid, expected = isinstance(value, bool), "true or false"
    elif kind is str:
        valid, expected = isinstance(value, str), "text"
    else:
        valid, expected = texts, "a list of texts"
    if not valid:
        raise TemplateError(f"{path}: template field {key!r} must be {expected}, not {value!r}")
    return tuple(value) if isinstance(value, list) else value


def _named_template(name: str) -> ChatTemplate:
    if name not in TEMPLATES:
        close = difflib.get_close_matches(name, list(TEMPLATES), n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise TemplateError(f"unknown template {name!r}: {hint}known: {', '.join(TEMPLATES)} (or a .yaml / .jinja "
                            f"file, or omit `template` to use the tokenizer's own chat template)")
    return TEMPLATES[name]


def prepare_template(config: Any, tokenizer: Any) -> Template | None:
    """The run's chat template, already applied to the tokenizer (eos, pad, chat_template), so that the tokenizer a
    run saves renders prompts exactly as training did; None for `stage: pt`, which trains on plain text."""
    if config.stage == "pt":
        return None
    template = get_template(config, tokenizer)
    template.prepare_tokenizer(tokenizer)
    return template


def get_template(config: Any, tokenizer: Any) -> Template:
    """The template `config.template` names (a table name, a .yaml or .jinja file), or the tokenizer's own."""
    name = config.template
    if name is None or name.endswith(".jinja"):
        return _jinja_template(config, tokenizer)
    template = load_template_file(name) if name.endswith((".yaml", ".yml")) else _named_template(name)
    overrides: dict[str, Any] = {"enable_thinking": config.enable_thinking}
    if config.default_system is not None:
        overrides["default_system"] = config.default_system
    if config.tool_format is not None:
        if config.tool_format not in TOOL_FORMATS:
            raise TemplateError(f"unknown tool_format {config.tool_format!r}: known are {', '.join(TOOL_FORMATS)}")
        overrides["tool_format"] = config.tool_format
    template = replace(template, **overrides)
    template.check_tokenizer(tokenizer)
    return template


def _jinja_template(config: Any, tokenizer: Any) -> TokenizerTemplate:
    """The tokenizer's own chat template (`template` omitted) or a `.jinja` file's."""
    if config.tool_format is not None:
        raise TemplateError("`tool_format` applies to table and YAML templates; a Jinja chat template writes tools "
                            "its own way: drop `tool_format` or set `template:` to a table name")
    if config.template is None:
        template = TokenizerTemplate(tokenizer, config.default_system, config.enable_thinking)
        if template.own is None and config.stage != "pt":
            raise TemplateError(f"the tokenizer of {config.model_name_or_path} has no chat template: set `template:` "
                                f"to the one its model was trained with (one of {', '.join(TEMPLATES)})")
        return template
    try:
        text = Path(config.template).read_text(encoding="utf-8")
    except OSError as err:
        raise TemplateError(f"template file {config.template}: cannot be read: {err}") from err
    return TokenizerTemplate(tokenizer, config.default_system, config.enable_thinking, own=text, name=config.template)
