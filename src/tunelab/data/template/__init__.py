"""Chat templates: how a conversation becomes text, and that text becomes (prompt, reply) token pieces.

    from tunelab.data.template import get_template
    template = get_template(config, tokenizer)     # from `template:` (and default_system, enable_thinking, tool_format)
    template.prepare_tokenizer(tokenizer)          # eos, pad and the chat template the saved tokenizer carries
    pairs = template.encode_turns(tokenizer, messages, system, tools)   # [(prompt_ids, reply_ids), ...]

One module per job; everything else in tunelab imports from this package, never from its modules:

    table.py      TEMPLATES: the named templates (LLaMA-Factory's names), one `ChatTemplate` row each
    chat.py       `ChatTemplate`: format strings rendered in Python (training text)
    jinja.py      the Jinja twin of a `ChatTemplate` (the chat template saved with the tokenizer)
    tokenizer.py  `TokenizerTemplate`: a Jinja template used as is (the tokenizer's own, or a .jinja file)
    base.py       `Template`: what the data layer needs of either kind (encode_turns, prepare_tokenizer, ...)
    loading.py    `get_template` / `prepare_template` (what `template:` names) and YAML template files
    tools.py      tool formats: how the tool list and tool calls are written (qwen, llama3, glm4, mistral)
    tokens.py     text pieces to token pieces (`split_tokens`), and messages as `apply_chat_template` takes them
    strings.py    `{{name}}` format strings, filled in Python and written as Jinja expressions; `TemplateError`
    ollama.py     an Ollama Modelfile (Go template) for an exported model
    trained.py    the template a model was trained with, read back from its tokenizer_config.json

Adding a template: add a `ChatTemplate(name=..., ...)` row (or a `replace(...)` of a related row) to `TEMPLATES` in
table.py; the fields are documented in loading.py. test_templates.py then checks its Python and Jinja renderings
agree on its own. When the family's real tokenizer is in ../shared/tokenizers, also add a row (template name,
folder, ...) to `FAMILIES` in tests/data/test_template_parity.py, which compares it token for token with the
official chat template on whitespace, missing and empty system prompts, unicode and many turns; set `trim` where the
official template trims messages (`| trim`), and list a template that cannot equal it in `DIFFERENT` with the
reason.
"""

from tunelab.data.template.base import Template
from tunelab.data.template.chat import ChatTemplate, split_thought
from tunelab.data.template.loading import get_template, load_template_file, prepare_template
from tunelab.data.template.ollama import modelfile
from tunelab.data.template.strings import TemplateError
from tunelab.data.template.table import TEMPLATES
from tunelab.data.template.tokenizer import TokenizerTemplate
from tunelab.data.template.tokens import Pairs, split_tokens, to_hf_messages
from tunelab.data.template.tools import TOOL_FORMATS, ToolFormat

__all__ = ["TEMPLATES", "TOOL_FORMATS", "ChatTemplate", "Pairs", "Template", "TemplateError", "TokenizerTemplate",
           "ToolFormat", "get_template", "load_template_file", "modelfile", "prepare_template", "split_thought",
           "split_tokens", "to_hf_messages"]
