"""The Jinja twin of a `ChatTemplate`: the chat template saved with the tokenizer, built from the same format strings
the Python rendering (chat.py) fills, so a served model is prompted exactly as it was trained. Every branch here
mirrors one in `ChatTemplate.render_pieces`; test_templates.py renders every table row both ways and compares.
"""

import json
from typing import Any

from tunelab.data.template.strings import jinja_emit, jinja_expr


def build_jinja(template: Any) -> str:
    """The Jinja chat template that renders a conversation exactly as `template.render_pieces` does.

    `template` is a `ChatTemplate`; it is not imported here, as chat.py imports this module (no import cycle)."""
    emit_system = jinja_expr(template.system, content="system")
    # As in the Python rendering, a blank system prompt still opens a system block once trimmed (`shown`).
    trim_system = "system" in template.trim
    has_system = "(shown or system)" if trim_system else "system"
    user_content = "(message['content'] | trim)" if "user" in template.trim else "message['content']"
    reply_content = "(message['content'] | trim)" if "assistant" in template.trim else "message['content']"
    lines = []
    if template.thought:
        lines.append(f"{{%- set thinking = enable_thinking if enable_thinking is defined else "
                     f"{str(template.enable_thinking).lower()} -%}}")
    lines += [
        "{%- if messages and messages[0]['role'] == 'system' -%}",
        "{%- set system = messages[0]['content'] -%}{%- set loop_messages = messages[1:] -%}",
        "{%- else -%}",
        f"{{%- set system = {json.dumps(template.default_system, ensure_ascii=False)} -%}}"
        "{%- set loop_messages = messages -%}",
        "{%- endif -%}",
    ]
    if trim_system:
        lines.append("{%- set shown = system | length > 0 -%}{%- set system = system | trim -%}")
    style = template.tools
    if style:
        lines += ["{%- if tools -%}", *style.jinja_tools_text("tool_text")]
        if style.in_system:
            lines.append(style.jinja_join_system("tool_text"))
        lines.append("{%- endif -%}")
    lines.append(jinja_emit(template.prefix))
    if not template.system_in_user:
        lines.append(f"{{%- if {has_system} -%}}{{{{- {emit_system} -}}}}{{%- endif -%}}")
    if style and not style.in_system:
        lines.append("{%- if tools -%}{{- tool_text -}}{%- endif -%}")
    if template.thought:
        lines += [
            "{%- set query = namespace(index=loop_messages | length - 1) -%}",
            "{%- for message in loop_messages -%}",
            "{%- if message['role'] == 'user' and not (message['content'].startswith('<tool_response>') and "
            "message['content'].endswith('</tool_response>')) -%}{%- set query.index = loop.index0 -%}"
            "{%- endif -%}",
            "{%- endfor -%}",
        ]
    lines += ["{%- for message in loop_messages -%}", "{%- if message['role'] == 'user' -%}"]
    if template.system_in_user:
        lines += [
            f"{{%- if loop.first and {has_system} -%}}",
            jinja_emit(template.user, content=f"{emit_system} + {user_content}"),
            "{%- else -%}", jinja_emit(template.user, content=user_content), "{%- endif -%}",
        ]
    else:
        lines.append(jinja_emit(template.user, content=user_content))
    lines += [
        "{%- elif message['role'] == 'tool' -%}",
        "{%- if loop.first or loop.previtem['role'] != 'tool' -%}" + jinja_emit(template.observation_open)
        + "{%- endif -%}",
        jinja_emit(template.observation or template.user, content="message['content']"),
        "{%- if loop.last or loop.nextitem['role'] != 'tool' -%}" + jinja_emit(template.observation_close)
        + "{%- endif -%}",
        "{%- elif message['role'] == 'assistant' -%}",
        jinja_emit(template.assistant_header),
        f"{{%- set content = {reply_content} if message['content'] is string else '' -%}}",
        *_jinja_thought(template),
        "{%- if message.tool_calls -%}",
    ]
    if style:
        lines += [*style.jinja_calls_text("calls"), jinja_emit(template.function or template.assistant,
                                                               content="content + calls")]
    else:
        lines.append(f"{{{{- raise_exception('template {template.name} has no tool format') -}}}}")
    lines += [
        "{%- else -%}", jinja_emit(template.assistant, content="content"), "{%- endif -%}",
        "{%- else -%}",
        f"{{{{- raise_exception('template {template.name} cannot render the role ' + message['role']) -}}}}",
        "{%- endif -%}",
        "{%- endfor -%}",
    ]
    if template.efficient_eos:
        lines.append("{%- if loop_messages and loop_messages[-1]['role'] == 'assistant' and not "
                     "add_generation_prompt -%}{{- eos_token -}}{%- endif -%}")
    lines += ["{%- if add_generation_prompt -%}", jinja_emit(template.assistant_header)]
    if template.thought:
        think_block = jinja_emit(template.thought[0] + template.thought[1])
        lines.append("{%- if not thinking -%}" + think_block + "{%- endif -%}")
    lines.append("{%- endif -%}")
    return "\n".join(line for line in lines if line) + "\n"

def _jinja_thought(template: Any) -> list[str]:
    """The Jinja twin of `ChatTemplate._reply`'s reasoning handling (Qwen3's own template, plus the
    enable_thinking switch)."""
    if not template.thought:
        return []
    open_word, close_word = template.thought
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
