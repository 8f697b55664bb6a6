"""The template a model was trained with, kept in the tokenizer's own config so it travels with every copy.

`Template.prepare_tokenizer` records the template's `definition()` under `TRAINED_KEY` in the tokenizer's init kwargs,
which `save_pretrained` writes into tokenizer_config.json: the final weights, every checkpoint, the rollout stages'
folders and an export all carry it beside `chat_template.jinja`. A tokenizer loaded from such a folder (the last
adapter's, or a trained model's) brings it back, and `loading.get_template` makes it the default and warns, naming
both, when a config asks for a different one.
"""

from typing import Any

from tunelab.data.template.base import TRAINED_KEY
from tunelab.data.template.chat import ChatTemplate


def trained_with(tokenizer: Any) -> dict[str, Any] | None:
    """The definition recorded in a trained model's tokenizer, or None for a tokenizer no tunelab run saved."""
    recorded = tokenizer.init_kwargs.get(TRAINED_KEY)
    return recorded if isinstance(recorded, dict) and recorded.get("kind") in ("table", "jinja") else None


def rebuild(recorded: dict[str, Any]) -> ChatTemplate:
    """The `ChatTemplate` of a recorded table definition, exactly as trained."""
    values = {key: tuple(v) if isinstance(v, list) else v for key, v in recorded.items() if key != "kind"}
    return ChatTemplate(**values)


def describe(recorded: dict[str, Any]) -> str:
    """How messages name a template: `'qwen' (tool_format qwen)`, or the Jinja template's name."""
    if recorded["kind"] == "jinja":
        return "the tokenizer's own chat template" if recorded["name"] == "tokenizer" else repr(recorded["name"])
    tools = f" (tool_format {recorded['tool_format']})" if recorded.get("tool_format") else ""
    return f"{recorded['name']!r}{tools}"
