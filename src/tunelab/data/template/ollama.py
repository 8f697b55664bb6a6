"""An Ollama `Modelfile` for an exported model, so `ollama create NAME -f Modelfile` in the export folder prompts the
model exactly as training did.

    text = modelfile(template, tokenizer)   # the run's Template (None for stage pt) and its prepared tokenizer

A `ChatTemplate` is translated from its format strings into Ollama's TEMPLATE, a Go text/template. Ollama gives it
`.System` (the system prompt: the request's system messages, else the Modelfile's SYSTEM) and `.Messages` (each with
`.Role` and `.Content`; system messages stay in the list, and consecutive messages of one role arrive merged). A
conversation ending on a user or tool message gets the generation prompt; one ending on an assistant message is a
prefill the model continues, so that message is written without its end of turn (as transformers'
`continue_final_message` does). Not translated: the tool list and tool calls (their formats are Python code in
`tools.py`), the removal of reasoning from past replies (Go templates cannot split text; Ollama passes
reasoning apart from the content anyway), and `trim` (Ollama's templates have no function that trims text, so a
message with whitespace around it is served with it; a warning says so).

Ollama's runtime puts a BOS token in front of every prompt when the tokenizer does so itself, so the first BOS a
template writes is left to it; every later one is written out. (A template that writes no BOS cannot take away the
one such a runtime adds.)

A `TokenizerTemplate` (any Jinja template) cannot be translated in general: its Modelfile holds FROM, SYSTEM and the
stop words, with a comment saying how to check the template Ollama picks.
"""

import json
import logging
from typing import Any

from tunelab.data.template.base import Template
from tunelab.data.template.chat import ChatTemplate
from tunelab.data.template.strings import PLACEHOLDER, TemplateError

logger = logging.getLogger(__name__)

_JINJA_NOTE = """\
# The chat template is a Jinja template (chat_template.jinja), which Ollama cannot run and tunelab cannot translate
# in general. Ollama picks a Go template of its own when it recognises the Jinja one; compare
# `ollama show NAME --template` with chat_template.jinja, or write a TEMPLATE here, or export with a `template:` from
# tunelab's table (`tunelab help keys`), which is translated.
"""


def modelfile(template: Template | None, tokenizer: Any) -> str:
    """The Modelfile text: FROM the export folder, TEMPLATE, SYSTEM and a stop parameter per stop word."""
    lines = ["# Ollama Modelfile written by tunelab export: ollama create NAME -f Modelfile", "", "FROM ."]
    if isinstance(template, ChatTemplate):
        lines.append(f'TEMPLATE """{_go_template(template, tokenizer)}"""')
        if template.trim:
            logger.warning("template %r trims the whitespace around %s messages, which Ollama's Go templates cannot "
                           "do: the Modelfile's TEMPLATE writes those messages as given", template.name,
                           "/".join(template.trim))
    elif template is not None:
        logger.warning("the Modelfile has no TEMPLATE: the chat template is a Jinja template, which cannot be "
                       "translated for Ollama (see the comment in the Modelfile)")
        lines[1:1] = ["", _JINJA_NOTE.rstrip("\n")]
    if template is not None and template.default_system:
        lines.append(f"SYSTEM {_quote(template.default_system, 'default_system')}")
    stops = list(template.stop_words) if template is not None else []
    if tokenizer.eos_token and tokenizer.eos_token not in stops:
        stops.append(tokenizer.eos_token)
    lines += [f"PARAMETER stop {_quote(word, 'stop_words')}" for word in stops]
    return "\n".join(lines) + "\n"


def _go_template(template: ChatTemplate, tokenizer: Any) -> str:
    """The template as Ollama's Go template, rendering each conversation as the template's Jinja twin does."""
    bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""
    runtime_bos = bool(bos) and tokenizer.bos_token_id is not None and \
        tokenizer.encode("x")[:1] == [tokenizer.bos_token_id]
    # With a runtime BOS, `$bos` is empty until the first BOS the template writes, and the BOS text after it.

    def go(fmt: str, content: str = "") -> str:
        """A format string as Go template text, `content` (Go template text) in place of {{content}}."""
        out = []
        for i, piece in enumerate(PLACEHOLDER.split(fmt)):
            if i % 2 == 0:
                out.append(_go_text(piece))
            elif piece == "content":
                out.append(content)
            elif piece == "bos_token":
                out.append("{{ $bos }}{{ $bos = " + _go_literal(bos) + " }}" if runtime_bos else _go_text(bos))
            else:
                out.append(_go_text(eos))
        return "".join(out)

    header = go(template.assistant_header)
    generation = header
    if template.thought and not template.enable_thinking:
        generation += _go_text(template.thought[0] + template.thought[1])
    reply_head, reply_tail = template.assistant.split("{{content}}", 1)
    # The last reply (a prefill) shows an empty reasoning block, as the Jinja twin writes for a reply after the query.
    block = "{{ if $last }}" + _go_text("".join(template.thought)) + "{{ end }}" if template.thought else ""

    parts = ['{{ $bos := "" }}' if runtime_bos else "", go(template.prefix)]
    if template.system_in_user:
        parts.append("{{ $system := .System }}")
        fused = "{{ if $system }}" + go(template.system, "{{ $system }}") + '{{ $system = "" }}{{ end }}'
        user = go(template.user, fused + "{{ .Content }}")
    else:
        parts.append("{{ if .System }}" + go(template.system, "{{ .System }}") + "{{ end }}")
        user = go(template.user, "{{ .Content }}")
    to_reply = "{{ if $last }}" + generation + "{{ end }}" if generation else ""
    parts += [
        "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}",
        '{{ if eq .Role "user" }}', user, to_reply,
        '{{ else if eq .Role "tool" }}', go(template.observation_open),
        go(template.observation or template.user, "{{ .Content }}"), go(template.observation_close), to_reply,
        '{{ else if eq .Role "assistant" }}', header, block, go(reply_head), "{{ .Content }}",
        "{{ if not $last }}", go(reply_tail), "{{ end }}",
        "{{ end }}{{ end }}",
    ]
    return "".join(parts)


def _go_text(text: str) -> str:
    """Literal text for the Go template. Text that would open an action, or whose quotes could run into the
    Modelfile's closing triple quote, is written as a Go string instead."""
    return "{{ " + _go_literal(text) + " }}" if "{{" in text or '"' in text else text


def _go_literal(text: str) -> str:
    # A JSON string is a valid Go string literal (the same escapes), and never holds a triple quote.
    return json.dumps(text, ensure_ascii=False)


def _quote(text: str, key: str) -> str:
    """A Modelfile argument: quoted, triple-quoted when it holds a quote or spans lines."""
    if '"' not in text and "\n" not in text:
        return f'"{text}"'
    if '"""' in text or text.endswith('"'):
        raise TemplateError(f"`{key}`: {text!r} cannot be written in an Ollama Modelfile, whose triple-quoted text "
                            f"ends at the first three quotes in a row")
    return f'"""{text}"""'
