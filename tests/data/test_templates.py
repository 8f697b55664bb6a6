"""The template engine and table: every row renders the same in Python (training) and as its saved Jinja (serving),
tool formats, reasoning, user-defined templates (YAML and Jinja files), tokenizer preparation and errors.

    .venv/bin/python -m pytest tests/data/test_templates.py -q

Token-for-token parity with the real tokenizers' own chat templates is in test_template_parity.py. Golden texts here
come from the model vendors' documented formats or LLaMA-Factory's definitions, quoted at each test.
"""

import json
import random
from dataclasses import replace
from functools import cache
from types import SimpleNamespace

import pytest

from tunelab.config import load_config
from tunelab.data import TEMPLATES, TemplateError, get_template
from tunelab.data.template import TOOL_FORMATS, load_template_file, split_thought, split_tokens, to_hf_messages
from tunelab.data.template.tokens import (_backend, _byte_sizes, _cut, _cut_by_bytes, _cuts_by_spans,
                                         _split_by_prefixes, split_tokens_batch)
from helpers import REPO, TOKENIZERS

needs_tokenizers = pytest.mark.skipif(not TOKENIZERS.is_dir(), reason="../shared/tokenizers is not present")

#: the row of each family in ../shared/tokenizers
FAMILY_ROWS = {"baichuan2-13b-chat": "baichuan2", "chatglm3-6b": "chatglm3", "glm-4-9b-chat": "glm4",
               "llama-3.2-instruct": "llama3", "mistral-7b-instruct-v0.3": "mistral", "phi-3.5-mini-instruct": "phi",
               "qwen2-vl-instruct": "qwen2_vl", "qwen2.5-instruct": "qwen", "qwen2.5-vl-instruct": "qwen2_vl",
               "qwen3": "qwen3", "smollm2-135m-instruct-from-gguf": "smollm2", "yi-6b-chat": "yi"}
LLAMA_FACTORY_NAMES = ["llama3", "llama2", "qwen", "qwen3", "qwen3_nothink", "qwen2_vl", "chatglm3", "glm4", "chatml",
                       "mistral", "gemma", "phi", "phi4", "yi", "baichuan2", "deepseek", "deepseek3", "deepseekr1",
                       "smollm2", "alpaca", "vicuna", "zephyr", "default", "empty"]

SPECIAL = {"bos_token": "<s>", "eos_token": "</s>"}
TEXT_TOKENIZER = SimpleNamespace(**SPECIAL)  # render_pieces reads only bos_token and eos_token

SINGLE = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}]
MULTI = [*SINGLE, {"role": "user", "content": "Q2 请"}, {"role": "assistant", "content": "\nA2"}]
#: surrounding whitespace, which some templates trim (`trim`); the blank system prompt of these cases is "  \n"
SPACED = [{"role": "user", "content": "  Q1 \n"}, {"role": "assistant", "content": " A1\t\n"},
          {"role": "user", "content": "\nQ2"}, {"role": "assistant", "content": "A2  "}]
REASONED = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "<think>\nR1\n</think>\n\nA1"},
            {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "<think>R2</think>A2"}]
TOOLS = json.dumps([{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                                      "parameters": {"type": "object",
                                                                     "properties": {"city": {"type": "string"}}}}}])
OSLO = {"name": "get_weather", "arguments": {"city": "Oslo"}}
ROME = {"name": "get_weather", "arguments": {"city": "Rome"}}
ONE_CALL = [{"role": "user", "content": "W?"}, {"role": "tool_call", "content": json.dumps([OSLO])},
            {"role": "tool", "content": '{"t": -3}'}, {"role": "assistant", "content": "Cold."}]
TWO_CALLS = [{"role": "user", "content": "W?"}, {"role": "tool_call", "content": json.dumps([OSLO, ROME])},
             {"role": "tool", "content": '{"t": -3}'}, {"role": "tool", "content": '{"t": 14}'},
             {"role": "assistant", "content": "Cold, warm."}]


def jinja_text(template, messages, system=None, tools=None, generation=False, **kwargs) -> str:
    """What a serving engine renders from the template's saved Jinja (transformers' own renderer)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    (text,), _ = render_jinja_template(conversations=[to_hf_messages(messages, system)], chat_template=template.jinja,
                                       tools=json.loads(tools) if tools else None, add_generation_prompt=generation,
                                       **SPECIAL, **kwargs)
    return text


def cases_of(template):
    """Conversations for a row: plain ones, and tool ones under every tool format (the config may set any)."""
    cases = [(template, m, s, None) for m in (SINGLE, MULTI, REASONED) for s in (None, "SYS")]
    cases += [(template, SPACED, s, None) for s in (" SYS \n", "  \n")]
    for name, style in TOOL_FORMATS.items():
        with_tools = replace(template, tool_format=name)
        cases += [(with_tools, m, s, TOOLS) for m in ([ONE_CALL, TWO_CALLS] if style.parallel_calls else [ONE_CALL])
                  for s in (None, "SYS")]
    return cases


def test_table_covers_the_families_and_llama_factory_names():
    assert len(TEMPLATES) >= 30
    assert set(LLAMA_FACTORY_NAMES) <= set(TEMPLATES)
    assert set(FAMILY_ROWS.values()) <= set(TEMPLATES)
    if TOKENIZERS.is_dir():
        assert {p.name for p in TOKENIZERS.iterdir() if p.is_dir()} == set(FAMILY_ROWS)


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_every_row_renders_as_its_saved_jinja(name):
    for thinking in (True, False):
        for template, messages, system, tools in cases_of(replace(TEMPLATES[name], enable_thinking=thinking)):
            pieces = template.render_pieces(TEXT_TOKENIZER, messages, system, tools)
            assert "".join(pieces) == jinja_text(template, messages, system, tools)
            # The last turn's prompt is the generation prompt a served model gets.
            assert "".join(pieces[:-1]) == jinja_text(template, messages[:-1], system, tools, generation=True)
            assert len(pieces) == 2 * sum(m["role"] in ("assistant", "tool_call") for m in messages)


def test_llama2_writes_the_system_prompt_into_the_first_user_turn():
    # Meta's Llama 2 chat format: <s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST] {reply} </s>, each turn
    # opening with bos (LLaMA-Factory's row has no space around the reply).
    pieces = TEMPLATES["llama2"].render_pieces(TEXT_TOKENIZER, MULTI, "S", None)
    assert pieces == ["<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nQ1 [/INST]", "A1</s>", "<s>[INST] Q2 请 [/INST]", "\nA2</s>"]
    with pytest.raises(TemplateError, match="first user turn"):
        TEMPLATES["llama2"].render_pieces(TEXT_TOKENIZER, ONE_CALL[2:], "S", None)


@pytest.mark.parametrize("base", ["llama2", "qwen", "llama3"])
def test_trim_equals_stripping_the_messages(base):
    # llama2 fuses the system prompt into the first user turn, qwen has a default one, llama3 joins tools before it.
    plain = replace(TEMPLATES[base], tool_format="llama3" if base == "llama2" else TEMPLATES[base].tool_format)
    trimmed = replace(plain, trim=("system", "user", "assistant"))
    spaced_call = [{**m, "content": f" {m['content']}\n"} if m["role"] in ("user", "assistant") else m
                   for m in ONE_CALL]
    for messages, system, tools in ((SPACED, " SYS \n", None), (SPACED, None, None), (spaced_call, "\tSYS ", TOOLS)):
        text = "".join(trimmed.render_pieces(TEXT_TOKENIZER, messages, system, tools))
        assert text == jinja_text(trimmed, messages, system, tools)
        stripped = [{**m, "content": m["content"].strip()} if m["role"] in ("user", "assistant") else m
                    for m in messages]
        assert text == "".join(plain.render_pieces(TEXT_TOKENIZER, stripped, system and system.strip(), tools))
    # A blank system prompt opens an empty system block (as `| trim` leaves it), rather than falling back to none.
    text = "".join(trimmed.render_pieces(TEXT_TOKENIZER, SINGLE, "  \n", None))
    assert text == jinja_text(trimmed, SINGLE, "  \n") and plain.system.replace("{{content}}", "") in text
    with pytest.raises(TemplateError, match="`trim` names roles"):
        replace(trimmed, trim=("tool",))


def test_efficient_eos_ends_only_the_conversation():
    glm4 = TEMPLATES["glm4"]
    pieces = glm4.render_pieces(TEXT_TOKENIZER, MULTI, "S", None)
    # GLM-4's chat format: [gMASK]<sop><|system|>\n{system}<|user|>\n{query}<|assistant|>\n{reply}...
    assert pieces == ["[gMASK]<sop><|system|>\nS<|user|>\nQ1<|assistant|>", "\nA1", "<|user|>\nQ2 请<|assistant|>",
                      "\n\nA2</s>"]
    assert not jinja_text(glm4, MULTI[:-1], generation=True).endswith("</s>")


def test_reasoning_drops_past_reasoning_and_shows_the_last():
    for name in ("qwen3", "deepseekr1"):
        pieces = TEMPLATES[name].render_pieces(TEXT_TOKENIZER, REASONED, None, None)
        assert pieces[1].startswith("A1") and "R1" not in "".join(pieces)
        assert pieces[3].startswith("<think>\nR2\n</think>\n\nA2")
        off = replace(TEMPLATES[name], enable_thinking=False).render_pieces(TEXT_TOKENIZER, REASONED, None, None)
        assert off[2].endswith("<think>\n\n</think>\n\n") and off[3].startswith("A2")  # the block is prompt
    # Qwen3's own splitting rules: text after </think> minus leading newlines; reasoning inside <think>...</think>.
    assert split_thought("<think>\nplan\n</think>\n\nanswer", "<think>", "</think>") == ("plan", "answer")
    assert split_thought("no block", "<think>", "</think>") == ("", "no block")


def test_tool_formats_write_the_vendors_formats():
    tools, calls = json.loads(TOOLS), [OSLO, ROME]
    # LLaMA-Factory's Mistral format: the tool list and the calls are JSON lists.
    mistral = TOOL_FORMATS["mistral"]
    assert mistral.tools_text(tools) == "[AVAILABLE_TOOLS] " + json.dumps(tools) + "[/AVAILABLE_TOOLS]"
    assert mistral.calls_text(calls) == json.dumps(calls)
    # GLM-4: each tool under "## name" as indented JSON; a call is its name, a newline, its arguments.
    glm4 = TOOL_FORMATS["glm4"]
    weather = json.dumps(tools[0]["function"], indent=4)
    assert glm4.tools_text(tools).endswith("# 可用工具\n\n## get_weather\n\n" + weather
                                           + "\n在调用上述函数时，请使用 Json 格式表示调用的参数。")
    assert glm4.calls_text([OSLO]) == 'get_weather\n{"city": "Oslo"}'
    # Llama 3.1+ JSON tool calling: {"name": ..., "parameters": ...}, one call per reply.
    assert TOOL_FORMATS["llama3"].calls_text([OSLO]) == '{"name": "get_weather", "parameters": {"city": "Oslo"}}'
    assert TOOL_FORMATS["qwen"].calls_text(calls).count("<tool_call>") == 2
    for name in ("glm4", "llama3"):
        with pytest.raises(TemplateError, match="one tool call per reply"):
            TOOL_FORMATS[name].calls_text(calls)
        with pytest.raises(Exception, match="one tool call per reply"):
            jinja_text(replace(TEMPLATES["chatml"], tool_format=name), TWO_CALLS, tools=TOOLS)


def test_tools_need_a_tool_format():
    template = TEMPLATES["llama2"]
    with pytest.raises(TemplateError, match="set `tool_format`"):
        template.encode_turns(TEXT_TOKENIZER, ONE_CALL, None, TOOLS)
    # The config's tool_format gives any template tools: here Qwen's, inside Llama 2's first user turn.
    with_tools = replace(template, tool_format="qwen")
    first = with_tools.render_pieces(TEXT_TOKENIZER, ONE_CALL, None, TOOLS)[0]
    assert first.startswith("<s>[INST] <<SYS>>\n# Tools") and '"name": "get_weather"' in first


def test_yaml_template_file(tmp_path):
    example = load_template_file(REPO / "examples" / "templates" / "kestrel.yaml")
    assert example == replace(TEMPLATES["qwen"], name="kestrel", default_system="You are Kestrel, made by TuneLab.")
    based = tmp_path / "mine.yaml"
    based.write_text("base: gemma\ndefault_system: Be brief.\nstop_words: [<end_of_turn>, <eos>]\ntrim: [assistant]\n")
    assert load_template_file(based) == replace(TEMPLATES["gemma"], name="mine", default_system="Be brief.",
                                                stop_words=("<end_of_turn>", "<eos>"), trim=("assistant",))
    errors = {"user: hi {{content}}\nasistant: x\n": "mine.yaml: unknown template field 'asistant' .*did you mean "
                                                   "'assistant'",
              "replace_eos: yes please\n": "field 'replace_eos' must be true or false",
              "user: '{{query}}'\n": "unknown placeholders \\['query'\\]",
              "thought: <think>\n": "must be a list of two texts",
              "tool_format: hermes\n": "must be one of qwen",
              "trim: [tool]\n": "`trim` names roles",
              "base: qwen4\n": "`base: qwen4` is not a template name",
              "- user\n": "holds a mapping"}
    for text, message in errors.items():
        based.write_text(text)
        with pytest.raises(TemplateError, match=message):
            load_template_file(based)


@cache
def _tokenizer(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZERS / name)


def fresh(name: str):
    """A tokenizer that a test may modify (prepare_tokenizer sets eos and chat_template)."""
    import copy

    return copy.deepcopy(_tokenizer(name))


def template_for(tokenizer, name: str | None, **keys):
    return get_template(load_config({"model_name_or_path": "m", "template": name, **keys}), tokenizer)


def ids_of(pairs) -> list[int]:
    return [i for prompt, reply in pairs for i in prompt + reply]


@needs_tokenizers
def test_template_files_from_the_config():
    jinja = REPO / "examples" / "templates" / "chatml_tutor.jinja"
    tok = fresh("qwen2.5-instruct")
    template = template_for(tok, str(jinja))
    messages = [*SINGLE, {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]
    pairs = template.encode_turns(tok, messages)
    assert ids_of(pairs) == tok.apply_chat_template(to_hf_messages(messages, None), chat_template=jinja.read_text(),
                                                    return_dict=False)
    assert tok.decode(pairs[0][0]).startswith("<|im_start|>system\nYou are a patient tutor.")
    assert [tok.decode(reply) for _, reply in pairs] == ["A1<|im_end|>\n", "A2<|im_end|>\n"]
    template.prepare_tokenizer(tok)
    assert tok.chat_template == jinja.read_text()
    yaml_template = template_for(tok, str(REPO / "examples" / "templates" / "kestrel.yaml"), tool_format="llama3")
    assert yaml_template.name == "kestrel" and yaml_template.tool_format == "llama3"
    with pytest.raises(TemplateError, match="template.jinja: file not found"):
        template_for(tok, "no/such/template.jinja")


@needs_tokenizers
def test_prepare_tokenizer_sets_eos_pad_and_stop_words():
    tok = fresh("qwen2.5-instruct")
    tok.eos_token = "<|endoftext|>"  # a base model's eos
    template_for(tok, "qwen").prepare_tokenizer(tok)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token is not None
    llama = fresh("llama-3.2-instruct")
    template = template_for(llama, "llama3")
    template.prepare_tokenizer(llama)
    assert llama.pad_token == "<|eot_id|>"
    assert llama.convert_tokens_to_ids("<|eom_id|>") in template.stop_token_ids(llama)


@needs_tokenizers
def test_foreign_markers_become_special_tokens():
    # Qwen's tokenizer would split Llama's markup into text pieces: the markers are added as special tokens.
    tok = fresh("qwen2.5-instruct")
    size = len(tok)
    template_for(tok, "llama3")
    for marker in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"):
        assert len(tok.encode(marker, add_special_tokens=False)) == 1, marker
    assert len(tok) > size


@needs_tokenizers
def test_token_spanning_a_turn_border_keeps_exact_ids():
    # Qwen merges "\n\n" into one token: the header's newline and a reply's leading newline become one token.
    tok = _tokenizer("qwen2.5-instruct")
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "\nHello"}]
    for name in ("qwen", None):
        pairs = template_for(tok, name).encode_turns(tok, messages)
        assert ids_of(pairs) == tok.apply_chat_template(to_hf_messages(messages, None), return_dict=False)
        assert tok.decode(pairs[0][1]).endswith("Hello<|im_end|>\n")
    pieces = split_tokens(tok, ["a\n", "\nb"])
    assert sum(pieces, []) == tok("a\n\nb", add_special_tokens=False)["input_ids"]
    # Python tokenizers give no character spans; cutting where prefix ids stop agreeing gives the same pieces.
    assert _split_by_prefixes(tok, ["a\n", "\nb"]) == pieces == [tok.encode("a"), tok.encode("\n\nb")]


#: Text that byte-level tokenizers cut into tokens of uneven byte lengths: multi-byte characters, a base letter and
#: its combining accent (not in NFC: Qwen's normalizer composes them), runs of spaces and newlines, special tokens.
TRICKY_TEXT = ["a", "Z", "7", " ", "  ", "\n", "\n\n", "\t", "!", "é", "e\u0301", "世界", "🙂", "👍🏽", "ß", "Ω", "'s",
               "<|im_end|>", "<|eot_id|>", "<|im_start|>", "</s>", "word", " the"]


@needs_tokenizers
@pytest.mark.parametrize("name, byte_level", [("qwen2.5-instruct", True), ("llama-3.2-instruct", True),
                                              ("smollm2-135m-instruct-from-gguf", True),
                                              ("mistral-7b-instruct-v0.3", False), ("yi-6b-chat", False)])
def test_cutting_by_token_bytes_equals_cutting_by_character_spans(name, byte_level):
    # Byte-level BPE tokenizers are cut at the piece borders from their tokens' lengths in bytes (ids only, no
    # character spans); every cut must be the one the character spans give, borders inside characters, special
    # tokens and merged whitespace included. Others keep the spans.
    tok = _tokenizer(name)
    assert (_byte_sizes(tok) is not None) == byte_level
    rng = random.Random(15)
    texts = []
    for _ in range(400):
        text = "".join(rng.choice(TRICKY_TEXT) for _ in range(rng.randint(0, 30)))
        borders = sorted(rng.randint(0, len(text)) for _ in range(rng.randint(1, 5)))
        texts.append([text[a:b] for a, b in zip([0, *borders], [*borders, len(text)])])
    expected = []
    for pieces in texts:
        encoding = _backend(tok).encode("".join(pieces), add_special_tokens=False)
        expected.append(_cut(encoding.ids, _cuts_by_spans(encoding, pieces)))
    assert split_tokens_batch(tok, texts) == expected
    if byte_level:   # Qwen's texts with a combining accent went the spans' way: its normalizer changes them
        fallback = sum(_cut_by_bytes(_backend(tok).encode("".join(p), add_special_tokens=False).ids, "".join(p), p,
                                     _byte_sizes(tok)) is None for p in texts)
        normalized = sum("e\u0301" not in "".join(p) for p in texts)
        assert fallback == (len(texts) - normalized if name == "qwen2.5-instruct" else 0)


@needs_tokenizers
def test_tokens_added_after_a_first_cut_are_cut_by_their_bytes_too():
    # A template adds its markers to a tokenizer that may have cut texts already: the byte sizes follow.
    tok = fresh("qwen2.5-instruct")
    assert split_tokens_batch(tok, [["a ", "b"]]) == [[tok.encode("a"), tok.encode(" b")]]
    tok.add_special_tokens({"additional_special_tokens": ["<|marker|>"]})
    marker = tok.convert_tokens_to_ids("<|marker|>")
    assert split_tokens_batch(tok, [["a<|marker|>", " b"]]) == [[[*tok.encode("a"), marker], tok.encode(" b")]]
    assert len(_byte_sizes(tok).lengths) > marker


@needs_tokenizers
def test_empty_template_trains_eos():
    tok = _tokenizer("qwen2.5-instruct")
    pairs = template_for(tok, "empty").encode_turns(tok, SINGLE)
    assert tok.decode(pairs[0][0]) == "Q1"
    assert pairs[0][1][-1] == tok.eos_token_id


@needs_tokenizers
def test_config_keys_reach_the_template():
    tok = _tokenizer("qwen2.5-instruct")
    template = template_for(tok, "qwen3", default_system="Be brief.", enable_thinking=False, tool_format="glm4")
    assert (template.default_system, template.enable_thinking, template.tool_format) == ("Be brief.", False, "glm4")
    own = template_for(tok, None, default_system="You are Kestrel.")
    assert tok.decode(own.encode_turns(tok, SINGLE)[0][0]).startswith("<|im_start|>system\nYou are Kestrel.<|im_end|>")


@needs_tokenizers
def test_template_errors():
    qwen = _tokenizer("qwen2.5-instruct")
    with pytest.raises(TemplateError, match="did you mean 'llama3'"):
        template_for(qwen, "llama-3")
    with pytest.raises(TemplateError, match="unknown tool_format 'hermes'"):
        template_for(qwen, "qwen", tool_format="hermes")
    with pytest.raises(TemplateError, match="a Jinja chat template writes tools its own way"):
        template_for(qwen, None, tool_format="qwen")
    bare = fresh("qwen2.5-instruct")
    bare.chat_template = None
    with pytest.raises(TemplateError, match="set `template:`"):
        template_for(bare, None)
    assert template_for(bare, None, stage="pt").jinja is None  # pt needs no chat template
    smol = _tokenizer("smollm2-135m-instruct-from-gguf")
    own = template_for(smol, None)
    assert not own.supports_tools  # SmolLM2's template would silently drop the tool list
    with pytest.raises(TemplateError, match="cannot render tools"):
        own.encode_turns(smol, ONE_CALL, None, TOOLS)
