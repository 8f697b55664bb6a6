"""Tool formats: how the list of available tools is shown to the model and how a reply calling tools is written.

A template names its tool format (`tool_format: qwen`); the config key `tool_format` overrides it, so any template can
be trained on tool data. Where a tool result goes and what wraps a calling reply (end-of-turn markup) belong to the
template (`observation`, `function`); this module only writes the tool list and the calls themselves.

A tool is an OpenAI-style spec, `{"type": "function", "function": {"name", "description", "parameters"}}`; a call is
`{"name", "arguments"}`. Placeholders: in `tool`, `{{tool_json}}` (the spec as compact JSON), `{{tool_json_indent}}`
(indented by 4), `{{function_json_indent}}` (the inner function, indented by 4) and `{{name}}`; in `call`, `{{name}}`
and `{{arguments}}` (compact JSON). JSON is written as the chat templates' `tojson` writes it (`json.dumps`,
non-ASCII kept).
"""

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tunelab.data.template.strings import TemplateError, fill, jinja_expr


def _dumps(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


#: placeholder of `ToolFormat.tool` -> (its value for a tool spec, its Jinja expression for the loop variable `tool`)
TOOL_FIELDS: dict[str, tuple[Callable[[dict], str], str]] = {
    "tool_json": (_dumps, "tool | tojson"),
    "tool_json_indent": (lambda tool: _dumps(tool, 4), "tool | tojson(indent=4)"),
    "function_json_indent": (lambda tool: _dumps(tool["function"], 4), "tool.function | tojson(indent=4)"),
    "name": (lambda tool: tool["function"]["name"], "tool.function.name"),
}
#: placeholder of `ToolFormat.call` -> its Jinja expression for the loop variable `fn` (a call's function part).
#: String arguments are taken as JSON text already (OpenAI clients send them so), as Qwen3's own template does.
CALL_FIELDS = {"name": "fn.name", "arguments": "(fn.arguments if fn.arguments is string else fn.arguments | tojson)"}


@dataclass(frozen=True)
class ToolFormat:
    name: str
    tool: str                    # one tool of the list
    call: str                    # one call of a reply
    tools_intro: str = ""        # before the first tool
    tool_separator: str = ""     # between two tools
    tools_outro: str = ""        # after the last tool
    in_system: bool = True       # the tool list joins the system prompt; else it is a block before the first turn
    tools_first: bool = False    # joined before the system prompt rather than after it
    system_separator: str = ""   # between the system prompt and the tool list, when there is a system prompt
    calls_open: str = ""
    call_separator: str = ""
    calls_close: str = ""
    parallel_calls: bool = True  # several calls in one reply

    def tools_text(self, tools: list[dict]) -> str:
        listed = [fill(self.tool, **{key: value(tool) for key, (value, _) in TOOL_FIELDS.items()}) for tool in tools]
        return self.tools_intro + self.tool_separator.join(listed) + self.tools_outro

    def join_system(self, system: str, tools_text: str) -> str:
        if not system:
            return tools_text
        return tools_text + self.system_separator + system if self.tools_first else \
            system + self.system_separator + tools_text

    def calls_text(self, calls: list[dict]) -> str:
        if len(calls) > 1 and not self.parallel_calls:
            raise TemplateError(f"tool format {self.name!r} writes one tool call per reply, this reply makes "
                            f"{len(calls)}: split it into several replies or pick another `tool_format`")
        written = [fill(self.call, name=call["name"], arguments=_dumps(call["arguments"])) for call in calls]
        return self.calls_open + self.call_separator.join(written) + self.calls_close

    @property
    def call_opening(self) -> str:
        """The fixed text a reply's calls start with (empty for glm4, whose calls open with the function name)."""
        return self.calls_open + self.call.split("{{name}}")[0]

    def parse_calls(self, text: str) -> tuple[str, list[dict]]:
        """(text before the calls, calls) of a generated reply: the inverse of `calls_text`, read with the same format
        strings. Each call is `{"name", "arguments"}` with the arguments as JSON text, as OpenAI's API returns them.
        A reply without a well-formed call gives (text, [])."""
        start_pattern = _loose(self.call_opening)
        # A format whose calls open with the name itself (glm4) only calls at the start of the reply.
        if start_pattern:
            starts = [m.start() for m in re.finditer(start_pattern, text)]
        else:
            starts = [len(text) - len(text.lstrip())]
        for start in starts:
            calls = self._read_calls(text, start)
            if calls:
                return text[:start].strip(), calls
        return text, []

    def _read_calls(self, text: str, at: int) -> list[dict] | None:
        opening = re.compile(_loose(self.calls_open)).match(text, at)
        position, calls = opening.end(), []
        while True:
            read = _read_call(self.call, text, position)
            if read is None:
                return None
            call, position = read
            calls.append(call)
            separator = re.compile(_loose(self.call_separator)).match(text, position)
            if not self.call_separator or separator is None or _read_call(self.call, text, separator.end()) is None:
                break
            position = separator.end()
        closing = re.compile(_loose(self.calls_close) + r"\s*$").match(text, position)
        return calls if closing else None

    def jinja_tools_text(self, target: str) -> list[str]:
        """Jinja statements setting the variable `target` to `tools_text(tools)`."""
        tool_expr = jinja_expr(self.tool, **{key: expr for key, (_, expr) in TOOL_FIELDS.items()})
        return [
            f"{{%- set listed = namespace(text={json.dumps(self.tools_intro, ensure_ascii=False)}) -%}}",
            "{%- for tool in tools -%}",
            f"{{%- if not loop.first -%}}{{%- set listed.text = listed.text + {jinja_expr(self.tool_separator)} -%}}"
            "{%- endif -%}",
            f"{{%- set listed.text = listed.text + {tool_expr} -%}}",
            "{%- endfor -%}",
            f"{{%- set {target} = listed.text + {jinja_expr(self.tools_outro)} -%}}",
        ]

    def jinja_join_system(self, tools_var: str) -> str:
        """A Jinja statement joining the tool list (in `tools_var`) into the variable `system`."""
        separator = jinja_expr(self.system_separator)
        joined = (f"{tools_var} + {separator} + system" if self.tools_first else
                  f"system + {separator} + {tools_var}")
        return (f"{{%- if system -%}}{{%- set system = {joined} -%}}"
                f"{{%- else -%}}{{%- set system = {tools_var} -%}}{{%- endif -%}}")

    def jinja_calls_text(self, target: str) -> list[str]:
        """Jinja statements setting `target` to `calls_text(message.tool_calls)`."""
        lines = []
        if not self.parallel_calls:
            lines.append("{%- if message.tool_calls | length > 1 -%}"
                         f"{{{{- raise_exception('tool format {self.name} writes one tool call per reply') -}}}}"
                         "{%- endif -%}")
        return lines + [
            f"{{%- set written = namespace(text={json.dumps(self.calls_open, ensure_ascii=False)}) -%}}",
            "{%- for call in message.tool_calls -%}",
            "{%- set fn = call.function if call.function is defined else call -%}",
            f"{{%- if not loop.first -%}}{{%- set written.text = written.text + {jinja_expr(self.call_separator)} -%}}"
            "{%- endif -%}",
            f"{{%- set written.text = written.text + {jinja_expr(self.call, **CALL_FIELDS)} -%}}",
            "{%- endfor -%}",
            f"{{%- set {target} = written.text + {jinja_expr(self.calls_close)} -%}}",
        ]


def _loose(literal: str) -> str:
    """A regex for a literal of a format string that lets generated text vary its whitespace."""
    return r"\s*".join(re.escape(part) for part in literal.split())


def _read_call(call_format: str, text: str, at: int) -> tuple[dict, int] | None:
    """One call written as `call_format` at `text[at:]`, and where it ends; None when the text is not one."""
    before_name, rest = call_format.split("{{name}}")
    between, after = rest.split("{{arguments}}")
    head = re.compile(r"\s*" + _loose(before_name) + r"([^\s\"]+)" + _loose(between) + r"\s*").match(text, at)
    if head is None:
        return None
    try:
        arguments, end = json.JSONDecoder().raw_decode(text, head.end())
    except json.JSONDecodeError:
        return None
    tail = re.compile(_loose(after)).match(text, end)
    if not isinstance(arguments, dict) or tail is None:
        return None
    return {"name": head.group(1), "arguments": _dumps(arguments)}, tail.end()


_TOOL_CALL_FORMAT = "<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>"

#: name -> tool format. Texts are the model vendors' (Qwen's and Llama 3.x's as their own chat templates write them)
#: or LLaMA-Factory's (GLM-4, Mistral), so data trained with LLaMA-Factory renders the same.
TOOL_FORMATS: dict[str, ToolFormat] = {f.name: f for f in (
    # Qwen2.5 / Qwen3 (Hermes style): JSON specs in <tools>, each call a JSON object in <tool_call>.
    ToolFormat(
        name="qwen",
        tools_intro="# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n",
        tool="{{tool_json}}",
        tool_separator="\n",
        tools_outro="\n</tools>\n\nFor each function call, return a json object with function name and arguments "
                    f"within <tool_call></tool_call> XML tags:\n{_TOOL_CALL_FORMAT}",
        system_separator="\n\n",
        call='<tool_call>\n{"name": "{{name}}", "arguments": {{arguments}}}\n</tool_call>',
        call_separator="\n",
    ),
    # Llama 3.1-3.3 JSON tool calling with the tools in the system message (`tools_in_user_message=False` in Meta's
    # template). The date is the template's own fallback, fixed so that the same data always gives the same tokens.
    ToolFormat(
        name="llama3",
        tools_intro="Environment: ipython\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
                    "You have access to the following functions. To call a function, please respond with JSON for a "
                    "function call.Respond in the format {\"name\": function name, \"parameters\": dictionary of "
                    "argument name and its value}.Do not use variables.\n\n",
        tool="{{tool_json_indent}}\n\n",
        tools_first=True,
        call='{"name": "{{name}}", "parameters": {{arguments}}}',
        parallel_calls=False,
    ),
    # GLM-4: the tools as indented JSON under "# 可用工具", a call as its name and its arguments on the next line.
    ToolFormat(
        name="glm4",
        tools_intro="你是一个名为 ChatGLM 的人工智能助手。你是基于智谱 AI 公司训练的语言模型 GLM-4 模型开发的，"
                    "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具",
        tool="\n\n## {{name}}\n\n{{function_json_indent}}\n在调用上述函数时，请使用 Json 格式表示调用的参数。",
        call="{{name}}\n{{arguments}}",
        parallel_calls=False,
    ),
    # Mistral v3 tokenizer: the tool list in [AVAILABLE_TOOLS] right before the first [INST], calls as a JSON list.
    ToolFormat(
        name="mistral",
        tools_intro="[AVAILABLE_TOOLS] [",
        tool="{{tool_json}}",
        tool_separator=", ",
        tools_outro="][/AVAILABLE_TOOLS]",
        in_system=False,
        calls_open="[",
        call='{"name": "{{name}}", "arguments": {{arguments}}}',
        call_separator=", ",
        calls_close="]",
    ),
)}


def get_tool_format(name: str) -> ToolFormat:
    if name not in TOOL_FORMATS:
        raise TemplateError(f"unknown tool_format {name!r}: known are {', '.join(TOOL_FORMATS)}")
    return TOOL_FORMATS[name]

