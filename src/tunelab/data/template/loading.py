"""Which template a config names (`get_template`), and user templates read from YAML files.

`template:` in a config is one of

* a name from `TEMPLATES` (table.py: LLaMA-Factory's names, e.g. `qwen`, `llama3`, `qwen3`): a
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
    tool_format        how tools and calls are written: qwen, llama3, glm4 or mistral (see tools.py)
    thought            [open, close] of a reasoning block, e.g. ["<think>\\n", "\\n</think>\\n\\n"]: earlier replies
                       lose their reasoning and the last one always shows a block, as in Qwen3's own template
    stop_words         texts that end generation; replace_eos: true makes the first one the tokenizer's eos
    efficient_eos      true: replies carry no end of their own; the conversation's last one is followed by eos
    markers            markup that must be one token each (added as special tokens when the tokenizer lacks them)
    trim               roles whose text loses its surrounding whitespace, as Jinja's `| trim` in an official template
                       does: any of system, user, assistant (e.g. [assistant] for Mistral v0.3)
    image_markup       what the saved Jinja writes for an image part of a message given as a list of parts
                       (`{"type": "image"}`), e.g. "<|vision_start|><|image_pad|><|vision_end|>" for Qwen2-VL;
                       video_markup: the same for a video part. Empty (the default): the template takes no such parts

`examples/templates/` holds an example of each kind of file.
"""

import difflib
import logging
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from tunelab.config.files import parse_yaml, read_text
from tunelab.data.template.base import Template
from tunelab.data.template.chat import ChatTemplate
from tunelab.data.template.strings import TemplateError
from tunelab.data.template.table import TEMPLATES
from tunelab.data.template.tokenizer import TokenizerTemplate
from tunelab.data.template.tools import TOOL_FORMATS
from tunelab.data.template.trained import describe, rebuild, trained_with

logger = logging.getLogger(__name__)

# --- user-defined templates ---

_YAML_FIELDS = {f.name: f for f in fields(ChatTemplate) if f.name != "enable_thinking"}


def load_template_file(path: str | Path) -> ChatTemplate:
    """A `ChatTemplate` from a YAML file of its fields (see the module docstring)."""
    path = Path(path)
    data = parse_yaml(read_text(path, TemplateError), path, TemplateError)
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
    """The template `config.template` names (a table name, a .yaml or .jinja file); when it names none, the one the
    model was trained with (recorded in its tokenizer by an earlier run), else the tokenizer's own. A config that
    names another template than the recorded one gets a warning naming both."""
    trained = trained_with(tokenizer)
    template = _configured_template(config, tokenizer, trained)
    if trained is not None and template.definition() != trained:
        logger.warning("%s was trained with template %s, and this config renders prompts with %s: the model will "
                       "see other prompts than it learned; drop `template` (and `tool_format`, `default_system`) to "
                       "use the trained one", (config.adapter_name_or_path or [config.model_name_or_path])[-1],
                       describe(trained), describe(template.definition()))
    return template


def _configured_template(config: Any, tokenizer: Any, trained: dict[str, Any] | None) -> Template:
    name = config.template
    if name is None and trained is not None and trained["kind"] == "table":
        return _with_config(rebuild(trained), config, tokenizer)
    if name is None and trained is not None:
        # The tokenizer's chat template is the Jinja it was trained with (saved by that run).
        return TokenizerTemplate(tokenizer, config.default_system, config.enable_thinking, name=trained["name"])
    if name is None or name.endswith(".jinja"):
        return _jinja_template(config, tokenizer)
    template = load_template_file(name) if name.endswith((".yaml", ".yml")) else _named_template(name)
    return _with_config(template, config, tokenizer)


def _with_config(template: ChatTemplate, config: Any, tokenizer: Any) -> ChatTemplate:
    """The template with what a config sets on top of it: thinking, the default system prompt, the tool format."""
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
    text = read_text(config.template, TemplateError)
    return TokenizerTemplate(tokenizer, config.default_system, config.enable_thinking, own=text, name=config.template)
