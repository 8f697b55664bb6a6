"""`TokenizerTemplate`: a Jinja chat template used as is: the tokenizer's own (no `template:`), or a user's `.jinja`
file.

Turn borders are found by rendering conversation prefixes with `apply_chat_template` (the prompt of turn k is the
conversation up to it with the generation prompt), never by guessing where markup starts. A template that rewrites
earlier turns once later ones exist (Qwen3's drops the reasoning of past replies; Phi-3.5's ends a finished
conversation with eos) cannot have every reply cut out of the final text exactly; there, the last reply is trained in
the exact context it is generated in, and the earlier turns are its prompt (as with `mask_history`), which a warning
says once.
"""

import json
import logging
from typing import Any

from tunelab.data.template.base import Template
from tunelab.data.template.strings import TemplateError
from tunelab.data.template.table import TEMPLATES
from tunelab.data.template.tokens import to_hf_messages
from tunelab.data.template.tools import TOOL_FORMATS, ToolFormat

logger = logging.getLogger(__name__)

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

    def definition(self) -> dict[str, Any]:
        # The Jinja text itself is saved beside it, as chat_template.jinja.
        return {"kind": "jinja", "name": self.name}

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
