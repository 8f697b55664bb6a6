"""The Jinja twin of a `ChatTemplate`: the chat template saved with the tokenizer, built from the same format strings
the Python rendering (chat.py) fills, so a served model is prompted exactly as it was trained. Every branch here
mirrors one in `ChatTemplate.render_pieces`; test_templates.py renders every table row both ways and compares.

A template with media markup (`image_markup` / `video_markup`: the vision-language rows) also takes message content
given as a list of parts, as processors, vLLM and the OpenAI API send it: an image part (`{"type": "image"}`,
`image_url`) becomes the image markup, a video part the video markup and a text part its text, in order, exactly as
Qwen2-VL's own chat template writes them (test_template_media.py compares). The Jinja of every other template is
unchanged by this.
"""

import json
from typing import Any

from tunelab.data.template.strings import jinja_emit, jinja_expr

#: (kind of part, the Jinja test that recognises one), as Qwen2-VL's own chat template recognises them: by `type`, or
#: by the key that holds the file (`{"image": PATH}`, `{"image_url": {"url": ...}}`, `{"video": PATH}`).
MEDIA_PARTS = (("image", "part['type'] == 'image' or 'image' in part or 'image_url' in part"),
               ("video", "part['type'] == 'video' or 'video' in part"))


def build_jinja(template: Any) -> str:
    """The Jinja chat template that renders a conversation exactly as `template.render_pieces` does.

    `template` is a `ChatTemplate`; it is not imported here, as chat.py imports this module (no import cycle)."""
    emit_system = jinja_expr(template.system, content="system")
    # As in the Python rendering, a blank system prompt still opens a system block once trimmed (`shown`).
    trim_system = "system" in template.trim
    has_system = "(shown or system)" if trim_system else "system"
    message_text = _text(template, "message")
    user_content = f"({message_text} | trim)" if "user" in template.trim else message_text
    reply_content = f"({message_text} | trim)" if "assistant" in template.trim else message_text
    # A reply that only calls tools may have no content (None): its text is "" (content_text writes none as "").
    reply_guard = "" if _takes_media(template) else " if message['content'] is string else ''"
    lines = _jinja_content_text(template)
    if template.thought:
        lines.append(f"{{%- set thinking = enable_thinking if enable_thinking is defined else "
                     f"{str(template.enable_thinking).lower()} -%}}")
    lines += [
        "{%- if messages and messages[0]['role'] == 'system' -%}",
        f"{{%- set system = {_text(template, 'messages[0]')} -%}}{{%- set loop_messages = messages[1:] -%}}",
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
            f"{{%- if message['role'] == 'user' and not ({message_text}.startswith('<tool_response>') and "
            f"{message_text}.endswith('</tool_response>')) -%}}{{%- set query.index = loop.index0 -%}}"
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
        jinja_emit(template.observation or template.user, content=message_text),
        "{%- if loop.last or loop.nextitem['role'] != 'tool' -%}" + jinja_emit(template.observation_close)
        + "{%- endif -%}",
        "{%- elif message['role'] == 'assistant' -%}",
        jinja_emit(template.assistant_header),
        f"{{%- set content = {reply_content}{reply_guard} -%}}",
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


def _takes_media(template: Any) -> bool:
    return bool(template.image_markup or template.video_markup)


def _text(template: Any, message: str) -> str:
    """The Jinja expression of a message's text: its content, written out by `content_text` when it may be a list of
    parts."""
    return f"content_text({message})" if _takes_media(template) else f"{message}['content']"


def _jinja_content_text(template: Any) -> list[str]:
    """The macro `content_text(message)`: the message's content as text. A string as is; a list of parts as
    Qwen2-VL's own template writes it (each media part its markup, each text part its text, other parts nothing);
    none as "". Nothing for a text-only template, whose Jinja reads `message['content']` directly.

    The macro takes the message, not its content, so that the loop reads `for part in message['content']`: vLLM looks
    for that loop to decide that the template takes parts ("openai" content format); without it, vLLM flattens the
    parts to text in its own way (text parts joined by newlines) before rendering."""
    if not _takes_media(template):
        return []
    # Qwen2-VL's own template numbers the files ("Picture 1: ") when asked to; this one writes no numbers, so it
    # refuses rather than quietly render another prompt than the caller asked for.
    unnumbered = ("{%- if add_vision_id is defined and add_vision_id -%}"
                  f"{{{{- raise_exception('template {template.name} does not number images and videos "
                  "(add_vision_id)') -}}{%- endif -%}")
    lines = [
        "{%- macro content_text(message) -%}",
        "{%- if message['content'] is string -%}{{- message['content'] -}}",
        "{%- elif message['content'] is not none -%}",
        "{%- for part in message['content'] -%}",
    ]
    for i, (kind, is_kind) in enumerate(MEDIA_PARTS):
        markup = getattr(template, f"{kind}_markup")
        # A part the model family cannot take fails loudly instead of vanishing from the prompt.
        emit = unnumbered + jinja_emit(markup) if markup else \
            f"{{{{- raise_exception('template {template.name} takes no {kind}') -}}}}"
        lines += [f"{{%- {'el' if i else ''}if {is_kind} -%}}", emit]
    lines += [
        "{%- elif 'text' in part -%}{{- part['text'] -}}",
        "{%- endif -%}",
        "{%- endfor -%}",
        "{%- endif -%}",
        "{%- endmacro -%}",
    ]
    return lines


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
