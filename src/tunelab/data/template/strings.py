"""Format strings with `{{name}}` placeholders, rendered two ways from one definition: in Python (training text) and
as a Jinja expression (the chat template saved with the tokenizer). Templates and tool formats are written in them,
so the text a model is trained on and the text it is served with cannot drift apart.
"""

import json
import re

from tunelab.data.spec import DataError

PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


class TemplateError(DataError):
    """A template that cannot be used with this tokenizer or cannot render a conversation."""


def fill(fmt: str, **values: str) -> str:
    """Replace the placeholders in one pass, so a value that contains "{{eos_token}}" stays text."""
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], fmt)


def placeholders(fmt: str) -> set[str]:
    return set(PLACEHOLDER.findall(fmt))


def jinja_expr(fmt: str, **exprs: str) -> str:
    """The format string as one Jinja expression: literals quoted, each placeholder replaced by its expression
    (`{{bos_token}}` and `{{eos_token}}` by the template variables of those names)."""
    # A tokenizer without a bos token (Qwen's) leaves the variable undefined; the Python rendering writes "" then.
    exprs = {"bos_token": "bos_token | default('', true)", "eos_token": "eos_token", **exprs}
    parts = []
    for i, piece in enumerate(PLACEHOLDER.split(fmt)):
        if i % 2:
            parts.append(f"({exprs[piece]})")
        elif piece:
            parts.append(json.dumps(piece, ensure_ascii=False))  # JSON string escapes are valid in Jinja strings
    return " + ".join(parts) or '""'


def jinja_emit(fmt: str, **exprs: str) -> str:
    """A Jinja statement printing the format string (nothing for an empty one)."""
    return f"{{{{- {jinja_expr(fmt, **exprs)} -}}}}" if fmt else ""
