"""Chat templates against the real tokenizers' own chat templates, token for token.

    .venv/bin/python -m pytest tests/test_templates.py -q

What parity means here. The reference is always `tokenizer.apply_chat_template` with a template we did not write:
the tokenizer's own (from ../shared/tokenizers, see SOURCES.md) or a vendor template quoted below. For each
conversation our `encode_turns` pieces, concatenated, must equal the reference ids, and the reply pieces (the trained
tokens) must decode to exactly the reply plus its end-of-turn markup.

* `qwen` = Qwen2.5-Instruct's own template, with and without a system prompt (both use Qwen's default system),
  tools and tool calls included.
* `chatml` = SmolLM2-Instruct's own template (and Qwen2.5's) when a system prompt is given. Without one, SmolLM2's
  template inserts its own default system prompt; `chatml` equals it once `default_system` is set to that prompt.
* `llama3` is LLaMA-Factory's llama3: the Llama 3 Instruct format without a date header. Llama-3.2's own template
  always adds a system header with "Cutting Knowledge Date" and today's date, so `llama3` is compared with Meta's
  Llama-3-8B-Instruct template (quoted below) applied with the Llama-3.2 tokenizer (same tokenizer.json for 3.x).
  Its `| trim` changes nothing here: no content used below starts or ends with whitespace.
* The tokenizer-own path (no `template:`) is checked on all three, Llama-3.2's date header included.
"""

import json
from functools import cache
from pathlib import Path

import pytest

from tunelab.config import load_config
from tunelab.data import TEMPLATES, TemplateError, get_template
from tunelab.data.templates import split_tokens, to_hf_messages

SHARED = Path(__file__).resolve().parents[2] / "shared"
TOKENIZERS = SHARED / "tokenizers"
pytestmark = pytest.mark.skipif(not TOKENIZERS.is_dir(), reason="../shared/tokenizers is not present")

# Meta-Llama-3-8B-Instruct's chat_template (tokenizer_config.json), verbatim.
LLAMA3_META_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

SINGLE = [{"role": "user", "content": "What is the capital of France?"},
          {"role": "assistant", "content": "The capital of France is Paris."}]
MULTI = SINGLE + [{"role": "user", "content": "And of Japan? 请用中文回答。"},
                  {"role": "assistant", "content": "日本的首都是东京。"},
                  {"role": "user", "content": "Thanks!"},
                  {"role": "assistant", "content": "You're welcome."}]
SYSTEM = "You are a concise geography tutor."
TOOLS = json.dumps([{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}])
TOOL_CHAT = [{"role": "user", "content": "Weather in Oslo?"},
             {"role": "tool_call", "content": json.dumps([{"name": "get_weather", "arguments": {"city": "Oslo"}}])},
             {"role": "tool", "content": '{"temp_c": -3, "sky": "snow"}'},
             {"role": "assistant", "content": "It is -3 °C and snowing in Oslo."}]
TWO_CALLS = [{"role": "user", "content": "Weather in Oslo and Rome?"},
             {"role": "tool_call", "content": json.dumps([{"name": "get_weather", "arguments": {"city": "Oslo"}},
                                                          {"name": "get_weather", "arguments": {"city": "Rome"}}])},
             {"role": "tool", "content": '[{"temp_c": -3}, {"temp_c": 14}]'},
             {"role": "assistant", "content": "Oslo: -3 °C. Rome: 14 °C."}]


@cache
def _load(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZERS / name)


def fresh(name: str):
    """A tokenizer that tests may modify (prepare_tokenizer sets eos and chat_template)."""
    import copy

    return copy.deepcopy(_load(name))


def template_for(tokenizer, name: str | None, **keys):
    return get_template(load_config({"model_name_or_path": "m", "template": name, **keys}), tokenizer)


def reference_ids(tokenizer, messages, system=None, tools=None, chat_template=None):
    return tokenizer.apply_chat_template(to_hf_messages(messages, system), tools=json.loads(tools) if tools else None,
                                         chat_template=chat_template, return_dict=False)


def check_parity(tokenizer, template, messages, system=None, tools=None, chat_template=None, reply_end=""):
    pairs = template.encode_turns(tokenizer, messages, system, tools)
    ours = [i for prompt, reply in pairs for i in prompt + reply]
    assert ours == reference_ids(tokenizer, messages, system, tools, chat_template)
    replies = [m for m in messages if m["role"] in ("assistant", "tool_call")]
    assert len(pairs) == len(replies)
    for (_, reply), message in zip(pairs, replies):
        if message["role"] == "assistant":
            # The trained tokens are the reply and its end of turn, nothing of the prompt around them.
            assert tokenizer.decode(reply) == message["content"] + reply_end


CONVERSATIONS = [(SINGLE, None), (SINGLE, SYSTEM), (MULTI, None), (MULTI, SYSTEM)]


@pytest.mark.parametrize(("messages", "system"), CONVERSATIONS)
def test_qwen_equals_qwen25_own_template(messages, system):
    tokenizer = _load("qwen2.5-instruct")
    check_parity(tokenizer, template_for(tokenizer, "qwen"), messages, system, reply_end="<|im_end|>\n")


def test_qwen_tools_equal_qwen25_own_template():
    tokenizer = _load("qwen2.5-instruct")
    for messages in (TOOL_CHAT, TWO_CALLS):
        for system in (None, SYSTEM):
            check_parity(tokenizer, template_for(tokenizer, "qwen"), messages, system, TOOLS, reply_end="<|im_end|>\n")
    reply = template_for(tokenizer, "qwen").encode_turns(tokenizer, TOOL_CHAT, None, TOOLS)[0][1]
    assert tokenizer.decode(reply) == ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
                                       '</tool_call><|im_end|>\n')


@pytest.mark.parametrize(("messages", "system"), [(SINGLE, SYSTEM), (MULTI, SYSTEM)])
def test_chatml_equals_smollm2_and_qwen25_with_a_system_prompt(messages, system):
    for name in ("smollm2-135m-instruct-from-gguf", "qwen2.5-instruct"):
        tokenizer = _load(name)
        check_parity(tokenizer, template_for(tokenizer, "chatml"), messages, system, reply_end="<|im_end|>\n")


def test_chatml_with_default_system_equals_smollm2_without_one():
    tokenizer = _load("smollm2-135m-instruct-from-gguf")
    template = template_for(tokenizer, "chatml", default_system=SMOLLM_SYSTEM)
    check_parity(tokenizer, template, MULTI, None, reply_end="<|im_end|>\n")
    # and plain chatml has no system block at all, unlike SmolLM2's own template
    ours = template_for(tokenizer, "chatml").encode_turns(tokenizer, SINGLE)
    assert tokenizer.decode(ours[0][0]).startswith("<|im_start|>user\n")


@pytest.mark.parametrize(("messages", "system"), CONVERSATIONS)
def test_llama3_equals_meta_llama3_template(messages, system):
    tokenizer = _load("llama-3.2-instruct")
    check_parity(tokenizer, template_for(tokenizer, "llama3"), messages, system, chat_template=LLAMA3_META_TEMPLATE,
                 reply_end="<|eot_id|>")
    first_prompt = template_for(tokenizer, "llama3").encode_turns(tokenizer, messages, system)[0][0]
    assert first_prompt[0] == tokenizer.bos_token_id


@pytest.mark.parametrize("name", ["qwen2.5-instruct", "llama-3.2-instruct", "smollm2-135m-instruct-from-gguf"])
@pytest.mark.parametrize(("messages", "system"), CONVERSATIONS)
def test_tokenizer_own_template(name, messages, system):
    tokenizer = _load(name)
    template = template_for(tokenizer, None)
    end = "<|eot_id|>" if name.startswith("llama") else "<|im_end|>\n"
    check_parity(tokenizer, template, messages, system, reply_end=end)


def test_tokenizer_own_template_with_tools():
    tokenizer = _load("qwen2.5-instruct")
    check_parity(tokenizer, template_for(tokenizer, None), TOOL_CHAT, None, TOOLS, reply_end="<|im_end|>\n")


def test_token_spanning_a_turn_border_keeps_exact_ids():
    # Qwen merges "\n\n" into one token: the header's newline and a reply's leading newline become one token.
    tokenizer = _load("qwen2.5-instruct")
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "\nHello"}]
    for name in ("qwen", None):
        pairs = template_for(tokenizer, name).encode_turns(tokenizer, messages)
        assert [i for p, r in pairs for i in p + r] == reference_ids(tokenizer, messages)
        assert tokenizer.decode(pairs[0][1]).endswith("Hello<|im_end|>\n")
    pieces = split_tokens(tokenizer, ["a\n", "\nb"])
    assert sum(pieces, []) == tokenizer("a\n\nb", add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize(("name", "tokenizer_name"), [
    ("qwen", "qwen2.5-instruct"), ("chatml", "smollm2-135m-instruct-from-gguf"),
    ("llama3", "llama-3.2-instruct"), ("empty", "qwen2.5-instruct"),
])
def test_prepared_tokenizer_renders_as_training_encoded(name, tokenizer_name):
    """After prepare_tokenizer, the tokenizer's chat template (what gets saved) gives our training ids."""
    tokenizer = fresh(tokenizer_name)
    template = template_for(tokenizer, name, default_system="Be brief.")
    template.prepare_tokenizer(tokenizer)
    assert tokenizer.chat_template == template.jinja
    cases = [(MULTI, None, None), (MULTI, SYSTEM, None)]
    if template.supports_tools:
        cases += [(TOOL_CHAT, None, TOOLS), (TWO_CALLS, SYSTEM, TOOLS)]
    for messages, system, tools in cases:
        pairs = template.encode_turns(tokenizer, messages, system, tools)
        assert [i for p, r in pairs for i in p + r] == reference_ids(tokenizer, messages, system, tools)
        # the generation prompt of the last turn is what training saw as that turn's prompt
        prompt = tokenizer.apply_chat_template(to_hf_messages(messages[:-1], system), add_generation_prompt=True,
                                               tools=json.loads(tools) if tools else None, return_dict=False)
        assert prompt == [i for p, r in pairs[:-1] for i in p + r] + pairs[-1][0]


def test_prepare_tokenizer_sets_eos_and_pad():
    tokenizer = fresh("qwen2.5-instruct")
    tokenizer.eos_token = "<|endoftext|>"  # a base model's eos
    template_for(tokenizer, "qwen").prepare_tokenizer(tokenizer)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token is not None
    llama = fresh("llama-3.2-instruct")
    template = template_for(llama, "llama3")
    template.prepare_tokenizer(llama)
    assert llama.pad_token == "<|eot_id|>"
    assert llama.convert_tokens_to_ids("<|eom_id|>") in template.stop_token_ids(llama)


def test_empty_template_trains_eos():
    tokenizer = _load("qwen2.5-instruct")
    pairs = template_for(tokenizer, "empty").encode_turns(tokenizer, SINGLE)
    assert tokenizer.decode(pairs[0][0]) == SINGLE[0]["content"]
    assert pairs[0][1][-1] == tokenizer.eos_token_id


def test_tokenizer_own_default_system_is_saved_too():
    tokenizer = fresh("smollm2-135m-instruct-from-gguf")
    template = template_for(tokenizer, None, default_system="You are Kestrel.")
    template.prepare_tokenizer(tokenizer)
    pairs = template.encode_turns(tokenizer, SINGLE)
    assert tokenizer.decode(pairs[0][0]).startswith("<|im_start|>system\nYou are Kestrel.<|im_end|>")
    assert [i for p, r in pairs for i in p + r] == reference_ids(tokenizer, SINGLE)


def test_template_that_rewrites_earlier_turns_is_refused():
    # Qwen3's own template drops the reasoning of earlier replies once a later user turn exists.
    tokenizer = _load("qwen3")
    template = template_for(tokenizer, None)
    messages = [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "<think>\nadd\n</think>\n\n2"},
                {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"}]
    with pytest.raises(TemplateError, match="not prefix-stable at turn 2"):
        template.encode_turns(tokenizer, messages)


def test_template_errors():
    qwen = _load("qwen2.5-instruct")
    with pytest.raises(TemplateError, match="did you mean 'llama3'"):
        template_for(qwen, "llama-3")
    # Qwen's tokenizer would split Llama's markup into text pieces: the markers are added as special tokens.
    foreign = fresh("qwen2.5-instruct")
    size = len(foreign)
    template_for(foreign, "llama3")
    for marker in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"):
        assert len(foreign.encode(marker, add_special_tokens=False)) == 1, marker
    assert len(foreign) > size
    bare = fresh("qwen2.5-instruct")
    bare.chat_template = None
    with pytest.raises(TemplateError, match="set `template:`"):
        template_for(bare, None)
    assert template_for(bare, None, stage="pt").jinja is None  # pt needs no chat template
    smol = _load("smollm2-135m-instruct-from-gguf")
    own = template_for(smol, None)
    assert not own.supports_tools  # SmolLM2's template would silently drop the tool list
    with pytest.raises(TemplateError, match="cannot render tools"):
        own.encode_turns(smol, TOOL_CHAT, None, TOOLS)
    with pytest.raises(TemplateError, match="cannot render tools"):
        template_for(smol, "chatml").encode_turns(smol, TOOL_CHAT)


def test_table_rows_are_complete():
    assert {"empty", "chatml", "qwen", "llama3"} <= set(TEMPLATES)
    for template in TEMPLATES.values():
        assert "{{content}}" in template.user and "{{content}}" in template.assistant
