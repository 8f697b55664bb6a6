"""Parity: tunelab's chat templates against the real tokenizers' own chat templates, token for token.

    .venv/bin/python -m pytest tests/data/test_template_parity.py -q

The reference is always `tokenizer.apply_chat_template` with a template we did not write: the tokenizer's own (from
../shared/tokenizers, see SOURCES.md) or a vendor template quoted below. For each conversation, our `encode_turns`
pieces concatenated must equal the reference ids, and the reply pieces (the trained tokens) must decode to exactly
the reply and its end-of-turn markup, nothing of the prompt. What parity means per family:

* qwen2.5-instruct, `qwen`: equal, tools, parallel calls and consecutive tool results included.
* qwen3, `qwen3`: equal with thinking on and off. With thinking off the empty think block is prompt and a reply's
  reasoning is dropped (its generation prompt closes the block), so the reference is the generation prompt plus
  the answer.
* qwen2-vl-instruct and qwen2.5-vl-instruct, `qwen2_vl`: equal on text conversations (their templates have no tools).
* llama-3.2-instruct, `llama3`: LLaMA-Factory's llama3 has no date header, so it is compared with Meta's Llama-3
  template (quoted below). With tools it has the header, and is compared with the own template with the tools in
  the system message, the date fixed, and tool results given as JSON objects (given text, the own template quotes
  them).
* mistral-7b-instruct-v0.3, `mistral`: the own template drops the system prompt from a finished conversation and needs
  call ids our data lacks: compared without a system prompt, and on single turns with a system prompt or tools
  (generation prompt plus reply).
* phi-3.5-mini-instruct, `phi`: the own template ends a finished conversation with an extra eos, which is dropped.
* smollm2-135m-instruct-from-gguf, `smollm2`: equal (the default system prompt is the model's own).
* yi-6b-chat, `yi`: equal (needs `sentencepiece`; skipped without it).

baichuan2-13b-chat, chatglm3-6b and glm-4-9b-chat cannot be loaded here (their tokenizers need the models' remote
code, which ../shared does not hold) and only ChatGLM3's has a chat template, a text approximation of what its
remote code tokenizes; their rows (`baichuan2`, `chatglm3`, `glm4`) follow LLaMA-Factory's formats and are checked in
test_templates.py against their Jinja twins.

Every named template of a family here is also compared on hard inputs (`FAMILIES`, `HARD`): whitespace around
messages (Meta's Llama 3 template trims every message and Mistral v0.3's trims replies, so `llama3` and `mistral` set
`trim`; the others keep it), no, empty and blank system prompts, Chinese and emoji, and five turns, both as trained
(our ids) and as served (our saved Jinja), against the official template. Named templates that deliberately differ
are in `DIFFERENT`, folders not compared in `NOT_COMPARED`, each with its reason. An empty system prompt is no system
prompt (`to_hf_messages` drops it, as a sample's empty system column means none); a client that sends an explicit
empty system message to the saved template gets no system block, where most official templates write an empty one.

The tokenizer-own path (no `template:`) is checked on every tokenizer with a chat template: exact everywhere; on
templates that rewrite earlier turns (Qwen3 drops past reasoning, Phi-3.5 adds eos to a finished conversation) a
multi-turn sample trains its last reply, whose prompt is then exactly its generation prompt.
"""

import copy
import json
from functools import cache

import pytest

from tunelab.config import load_config
from tunelab.data.template import TEMPLATES, TemplateError, get_template, to_hf_messages
from helpers import SHARED

TOKENIZERS = SHARED / "tokenizers"
pytestmark = pytest.mark.skipif(not TOKENIZERS.is_dir(), reason="../shared/tokenizers is not present")

# Meta-Llama-3-8B-Instruct's chat_template (tokenizer_config.json), verbatim.
LLAMA3_META_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA_TOOL_KWARGS = {"tools_in_user_message": False, "date_string": "26 Jul 2024"}

SINGLE = [{"role": "user", "content": "What is the capital of France?"},
          {"role": "assistant", "content": "The capital of France is Paris."}]
MULTI = SINGLE + [{"role": "user", "content": "And of Japan? 请用中文回答。"},
                  {"role": "assistant", "content": "日本的首都是东京。"},
                  {"role": "user", "content": "Thanks!"},
                  {"role": "assistant", "content": "You're welcome."}]
SYSTEM = "You are a concise geography tutor."
CONVERSATIONS = [(SINGLE, None), (SINGLE, SYSTEM), (MULTI, None), (MULTI, SYSTEM)]
REASONED = [{"role": "user", "content": "1+1?"},
            {"role": "assistant", "content": "<think>\nOne plus one.\n</think>\n\n2"},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "<think>Two plus two.</think>4"}]
TOOLS = json.dumps([{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}])
OSLO = '{"temp_c": -3, "sky": "snow"}'
TOOL_CHAT = [{"role": "user", "content": "Weather in Oslo?"},
             {"role": "tool_call", "content": json.dumps([{"name": "get_weather", "arguments": {"city": "Oslo"}}])},
             {"role": "tool", "content": OSLO},
             {"role": "assistant", "content": "It is -3 °C and snowing in Oslo."}]
TWO_CALLS = [{"role": "user", "content": "Weather in Oslo and Rome?"},
             {"role": "tool_call", "content": json.dumps([{"name": "get_weather", "arguments": {"city": "Oslo"}},
                                                          {"name": "get_weather", "arguments": {"city": "Rome"}}])},
             {"role": "tool", "content": OSLO},
             {"role": "tool", "content": '{"temp_c": 14, "sky": "clear"}'},
             {"role": "assistant", "content": "Oslo: -3 °C. Rome: 14 °C."}]
QWEN_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'


@cache
def tokenizer(name: str):
    from transformers import AutoTokenizer

    if name == "yi-6b-chat":
        pytest.importorskip("sentencepiece", reason="Yi's tokenizer.model needs sentencepiece")
    return AutoTokenizer.from_pretrained(TOKENIZERS / name)


def template_for(tok, name: str | None, **keys):
    return get_template(load_config({"model_name_or_path": "m", "template": name, **keys}), tok)


def reference(tok, messages, system=None, tools=None, generation=False, **kwargs) -> list[int]:
    """The reference ids: `apply_chat_template` on the conversation as transformers takes it."""
    return tok.apply_chat_template(to_hf_messages(messages, system), tools=json.loads(tools) if tools else None,
                                   add_generation_prompt=generation, return_dict=False, **kwargs)


def flat(pairs) -> list[int]:
    return [i for prompt, reply in pairs for i in prompt + reply]


def check(tok, template, messages, system=None, tools=None, expected=None, replies=None, **kwargs):
    """Our ids equal the reference (`expected`, default: the own template on the conversation), and the reply pieces
    decode to `replies` (the trained text of each reply, in order)."""
    pairs = template.encode_turns(tok, messages, system, tools)
    assert flat(pairs) == (expected if expected is not None else reference(tok, messages, system, tools, **kwargs))
    if replies is not None:
        assert [tok.decode(reply) for _, reply in pairs] == replies
    return pairs


def replies_of(messages, end: str) -> list[str]:
    return [m["content"] + end for m in messages if m["role"] == "assistant"]


# --- Qwen2.5 ---

@pytest.mark.parametrize(("messages", "system"), CONVERSATIONS)
def test_qwen_equals_qwen25(messages, system):
    tok = tokenizer("qwen2.5-instruct")
    check(tok, template_for(tok, "qwen"), messages, system, replies=replies_of(messages, "<|im_end|>\n"))


@pytest.mark.parametrize("system", [None, SYSTEM])
def test_qwen_tools_equal_qwen25(system):
    tok = tokenizer("qwen2.5-instruct")
    template = template_for(tok, "qwen")
    check(tok, template, TOOL_CHAT, system, TOOLS,
          replies=[QWEN_CALL + "<|im_end|>\n", TOOL_CHAT[-1]["content"] + "<|im_end|>\n"])
    # Two parallel calls, then both results in one user turn (consecutive tool messages), as Qwen writes them.
    pairs = check(tok, template, TWO_CALLS, system, TOOLS)
    assert tok.decode(pairs[1][0]).count("<|im_start|>user") == 1


# --- Qwen3: thinking on and off ---

@pytest.mark.parametrize(("messages", "system"), [*CONVERSATIONS, (REASONED, None), (REASONED, SYSTEM)])
def test_qwen3_thinking_equals_qwen3(messages, system):
    tok = tokenizer("qwen3")
    *history, last = [m for m in messages if m["role"] == "assistant"]
    # Earlier replies lose their reasoning; the last one always shows its block (empty when it has none).
    expected_replies = [m["content"].split("</think>")[-1].lstrip("\n") + "<|im_end|>\n" for m in history]
    reasoning = "Two plus two." if last["content"].startswith("<think>") else ""
    answer = last["content"].split("</think>")[-1]
    expected_replies.append(f"<think>\n{reasoning}\n</think>\n\n{answer}<|im_end|>\n")
    check(tok, template_for(tok, "qwen3"), messages, system, replies=expected_replies)


@pytest.mark.parametrize(("messages", "system"), [(SINGLE, None), (MULTI, SYSTEM), (REASONED, None)])
def test_qwen3_without_thinking_equals_qwen3_generation_prompt(messages, system):
    tok = tokenizer("qwen3")
    template = template_for(tok, "qwen3", enable_thinking=False)
    prompt = reference(tok, messages[:-1], system, generation=True, enable_thinking=False)
    answer = messages[-1]["content"].split("</think>")[-1]
    reply = tok.encode(answer + "<|im_end|>\n", add_special_tokens=False)
    pairs = check(tok, template, messages, system, expected=prompt + reply)
    assert tok.decode(pairs[-1][0]).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # prompt, not trained
    assert tok.decode(pairs[-1][1]) == answer + "<|im_end|>\n"
    if messages is not REASONED:  # without reasoning to drop, the finished conversation is the own template's too
        assert flat(pairs) == reference(tok, messages, system, enable_thinking=False)


@pytest.mark.parametrize("system", [None, SYSTEM])
def test_qwen3_tools_equal_qwen3(system):
    tok = tokenizer("qwen3")
    template = template_for(tok, "qwen3")
    check(tok, template, TOOL_CHAT, system, TOOLS,
          replies=[QWEN_CALL + "<|im_end|>\n", "<think>\n\n</think>\n\n" + TOOL_CHAT[-1]["content"] + "<|im_end|>\n"])
    check(tok, template, TWO_CALLS, system, TOOLS)
    # A conversation ending in a call: the call is the last reply, so it opens with the (empty) think block.
    check(tok, template, TOOL_CHAT[:2], system, TOOLS, replies=["<think>\n\n</think>\n\n" + QWEN_CALL + "<|im_end|>\n"])


def test_qwen3_saved_template_serves_like_qwen3():
    """What an engine sends at serving time, reasoning given apart from the answer included, renders as Qwen3's own."""
    tok = tokenizer("qwen3")
    ours = template_for(tok, "qwen3").jinja
    served = [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2", "reasoning_content": "Add."},
              {"role": "user", "content": "2+2?"}]
    for thinking in (True, False):
        for messages, generation in ((served, True), (served[:2], False)):
            kwargs = {"tokenize": False, "add_generation_prompt": generation, "enable_thinking": thinking}
            if thinking or generation:  # with thinking off tunelab drops a finished reply's reasoning on purpose
                assert tok.apply_chat_template(messages, chat_template=ours, **kwargs) == \
                    tok.apply_chat_template(messages, **kwargs)


def test_qwen3_nothink_is_qwen_without_default_system():
    # With a system prompt given, Qwen2.5's own template is Qwen3's minus the think blocks: qwen3_nothink's format.
    tok = tokenizer("qwen2.5-instruct")
    template = template_for(tok, "qwen3_nothink")
    check(tok, template, MULTI, SYSTEM, replies=replies_of(MULTI, "<|im_end|>\n"))
    check(tok, template, TWO_CALLS, SYSTEM, TOOLS)
    assert tok.decode(template.encode_turns(tok, SINGLE)[0][0]).startswith("<|im_start|>user\n")


# --- Qwen2-VL, Qwen2.5-VL ---

@pytest.mark.parametrize("name", ["qwen2-vl-instruct", "qwen2.5-vl-instruct"])
@pytest.mark.parametrize(("messages", "system"), CONVERSATIONS)
def test_qwen2_vl_equals_qwen_vl(name, messages, system):
    tok = tokenizer(name)
    check(tok, template_for(tok, "qwen2_vl"), messages, system, replies=replies_of(messages, "<|im_end|>\n"))


# --- Llama 3 ---

@pytest.mark.parametrize(("messages", "system"), CONVERSATIONS)
def test_llama3_equals_meta_llama3(messages, system):
    tok = tokenizer("llama-3.2-instruct")
    pairs = check(tok, template_for(tok, "llama3"), messages, system, chat_template=LLAMA3_META_TEMPLATE,
                  replies=replies_of(messages, "<|eot_id|>"))
    assert pairs[0][0][0] == tok.bos_token_id


@pytest.mark.parametrize("system", [None, SYSTEM])
def test_llama3_tools_equal_llama32(system):
    tok = tokenizer("llama-3.2-instruct")
    as_objects = [{**m, "content": json.loads(m["content"])} if m["role"] == "tool" else m for m in TOOL_CHAT]
    expected = tok.apply_chat_template(to_hf_messages(as_objects, system), tools=json.loads(TOOLS),
                                       return_dict=False, **LLAMA_TOOL_KWARGS)
    call = '{"name": "get_weather", "parameters": {"city": "Oslo"}}<|eot_id|>'
    check(tok, template_for(tok, "llama3"), TOOL_CHAT, system, TOOLS, expected=expected,
          replies=[call, TOOL_CHAT[-1]["content"] + "<|eot_id|>"])


# --- Mistral v0.3 ---

@pytest.mark.parametrize("messages", [SINGLE, MULTI])
def test_mistral_equals_mistral_v03(messages):
    tok = tokenizer("mistral-7b-instruct-v0.3")
    pairs = check(tok, template_for(tok, "mistral"), messages, replies=replies_of(messages, "</s>"))
    # The reply's leading space is its first token's "▁" (SentencePiece's decode drops it at the start of a text).
    assert all(tok.convert_ids_to_tokens(reply[0]).startswith("▁") for _, reply in pairs)


@pytest.mark.parametrize(("system", "tools"), [(SYSTEM, None), (None, TOOLS), (SYSTEM, TOOLS)])
def test_mistral_single_turn_prompt_equals_mistral_v03(system, tools):
    tok = tokenizer("mistral-7b-instruct-v0.3")
    prompt = reference(tok, SINGLE[:1], system, tools, generation=True)
    reply = tok.encode(" " + SINGLE[1]["content"] + "</s>", add_special_tokens=False)
    check(tok, template_for(tok, "mistral"), SINGLE, system, tools, expected=prompt + reply)


# --- Phi-3.5, SmolLM2, Yi ---

@pytest.mark.parametrize(("messages", "system"), CONVERSATIONS)
def test_phi_equals_phi35(messages, system):
    tok = tokenizer("phi-3.5-mini-instruct")
    own = reference(tok, messages, system)
    assert own[-1] == tok.eos_token_id  # the own template's end of a finished conversation, not a turn's
    check(tok, template_for(tok, "phi"), messages, system, expected=own[:-1])


@pytest.mark.parametrize(("messages", "system"), CONVERSATIONS)
def test_smollm2_equals_smollm2(messages, system):
    tok = tokenizer("smollm2-135m-instruct-from-gguf")
    check(tok, template_for(tok, "smollm2"), messages, system, replies=replies_of(messages, "<|im_end|>\n"))
    if system:
        check(tok, template_for(tok, "chatml"), messages, system)


@pytest.mark.parametrize(("messages", "system"), CONVERSATIONS)
def test_yi_equals_yi(messages, system):
    tok = tokenizer("yi-6b-chat")
    check(tok, template_for(tok, "yi"), messages, system)


# --- every family on hard inputs: whitespace, empty and blank system prompts, unicode, many turns ---

#: surrounding whitespace (Meta's and Mistral's templates `| trim` it, the others keep it), Chinese and emoji (a ZWJ
#: sequence and a skin-tone modifier), and five turns
HARD = [{"role": "user", "content": "  Hello there! \n"},
        {"role": "assistant", "content": " Hi, how can I help?\t\n"},
        {"role": "user", "content": "\n请把这句话翻译成英文：我喜欢猫。 "},
        {"role": "assistant", "content": "I like cats. 🐱"},
        {"role": "user", "content": "👨‍👩‍👧 and 👋🏽 — what are these?"},
        {"role": "assistant", "content": "\n\nA family emoji and a waving hand (medium skin tone).  "},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "  "},
        {"role": "user", "content": " Bye "},
        {"role": "assistant", "content": "再见！👋\n"}]
#: no system prompt, an empty one (a sample's empty system column: no system prompt, so the default one if any), a
#: blank one (kept as a system message, whose block the trimming templates leave empty) and one with spaces around it
HARD_SYSTEMS = [None, "", "  \n", " You are terse; answer in one line. \n"]

#: (named template, its family's folder in ../shared/tokenizers, the reference Jinja: None for the tokenizer's own,
#: the system prompts compared, whether the reference ends a finished conversation with an extra eos)
FAMILIES = [
    ("qwen", "qwen2.5-instruct", None, HARD_SYSTEMS, False),
    ("qwen3", "qwen3", None, HARD_SYSTEMS, False),
    ("qwen2_vl", "qwen2-vl-instruct", None, HARD_SYSTEMS, False),
    ("qwen2_vl", "qwen2.5-vl-instruct", None, HARD_SYSTEMS, False),
    # Llama 3.2's own template always writes a system block with "Cutting Knowledge Date" and today's date (a date
    # that changes the tokens from day to day); the llama3 row is Llama 3's format, so Meta's Llama 3 template is the
    # reference. It trims every message.
    ("llama3", "llama-3.2-instruct", LLAMA3_META_TEMPLATE, HARD_SYSTEMS, False),
    # Mistral v0.3's own template writes the system prompt into the *last* user message, so a finished conversation
    # has none and every turn's prompt moves it: no single training text can equal it with a system prompt (compared
    # on single turns in test_mistral_single_turn_prompt_equals_mistral_v03). It trims replies only.
    ("mistral", "mistral-7b-instruct-v0.3", None, [None, ""], False),
    ("phi", "phi-3.5-mini-instruct", None, HARD_SYSTEMS, True),
    ("smollm2", "smollm2-135m-instruct-from-gguf", None, HARD_SYSTEMS, False),
    ("yi", "yi-6b-chat", None, HARD_SYSTEMS, False),
]
#: folders in ../shared/tokenizers whose official template is not compared above, and why
NOT_COMPARED = {
    "baichuan2-13b-chat": "its tokenizer needs the model's remote code, and it ships no chat template",
    "chatglm3-6b": "its tokenizer needs the model's remote code, and its chat template is only a text approximation "
                   "of what that code tokenizes",
    "glm-4-9b-chat": "its tokenizer needs the model's remote code, and it ships no chat template",
}
#: named templates of these families that deliberately differ from the official template, and why
DIFFERENT = {
    "qwen3_nothink": "for Qwen3 models without thinking (Qwen3-2507 Instruct), whose template is not in ../shared; "
                     "Qwen3's hybrid template writes think blocks, and Qwen2.5's adds its default system prompt",
    "chatml": "generic ChatML without a default system prompt: equal to SmolLM2's only when a system prompt is given "
              "(test_smollm2_equals_smollm2)",
}


def test_every_family_is_compared_or_says_why():
    folders = {p.name for p in TOKENIZERS.iterdir() if p.is_dir()}
    assert folders == {folder for _, folder, *_ in FAMILIES} | set(NOT_COMPARED)
    assert set(DIFFERENT) <= set(TEMPLATES) and not set(DIFFERENT) & {name for name, *_ in FAMILIES}


#: Each family with each system prompt its row compares (Mistral's places one where no training text can).
HARD_CASES = [(name, folder, official, extra_eos, system)
              for name, folder, official, systems, extra_eos in FAMILIES for system in systems]


@pytest.mark.parametrize(("name", "folder", "official", "extra_eos", "system"), HARD_CASES,
                         ids=[f"{name}-{folder}-system{HARD_SYSTEMS.index(system)}"
                              for name, folder, _, _, system in HARD_CASES])
def test_named_template_equals_official_on_hard_inputs(name, folder, official, extra_eos, system):
    tok = tokenizer(folder)
    template = template_for(tok, name)
    for turns in (2, 4, len(HARD)):
        messages = HARD[:turns]
        expected = reference(tok, messages, system, chat_template=official)
        if extra_eos:
            assert expected[-1] == tok.eos_token_id
            expected = expected[:-1]
        pairs = check(tok, template, messages, system, expected=expected)
        assert len(pairs) == turns // 2
        # The saved template (what serves the trained model) renders the same, generation prompts included.
        served = reference(tok, messages, system, chat_template=template.jinja)
        assert served == flat(pairs)
        prompt = reference(tok, messages[:-1], system, generation=True, chat_template=template.jinja)
        if name == "phi" and messages[-1]["content"][:1].isspace():
            # Phi-3.5's <|assistant|> strips the whitespace after it (rstrip), so in "<|assistant|>\n Hi" it is one
            # token ending inside the reply, which split_tokens gives to the reply: the ids are still the official
            # ones, but the generation prompt's last token is trained as the reply's first.
            assert pairs[-1][1][0] == prompt[-1] == tok.convert_tokens_to_ids("<|assistant|>")
            prompt = prompt[:-1]
        assert prompt == flat(pairs[:-1]) + pairs[-1][0]
        if name != "yi":  # SentencePiece's decode adds spaces after Yi's special tokens
            trim = "assistant" in template.trim
            for (_, reply), message in zip(pairs, messages[1::2]):
                content = message["content"].strip() if trim else message["content"]
                assert content.strip() in tok.decode(reply)


# --- the tokenizer's own template (no `template:`) ---

OWN = ["qwen2.5-instruct", "qwen3", "qwen2-vl-instruct", "qwen2.5-vl-instruct", "llama-3.2-instruct",
       "mistral-7b-instruct-v0.3", "phi-3.5-mini-instruct", "smollm2-135m-instruct-from-gguf", "yi-6b-chat"]
#: templates that rewrite earlier turns: multi-turn samples train their last reply
REWRITING = {"qwen3", "phi-3.5-mini-instruct"}


@pytest.mark.parametrize("name", OWN)
@pytest.mark.parametrize(("messages", "system"), CONVERSATIONS)
def test_tokenizer_own_template(name, messages, system):
    tok = tokenizer(name)
    template = template_for(tok, None)
    if name.startswith("mistral") and system:
        with pytest.raises(TemplateError, match="renders the last reply's generation prompt differently"):
            template.encode_turns(tok, messages, system)
        return
    pairs = check(tok, template, messages, system)
    if name in REWRITING and messages is MULTI:
        assert len(pairs) == 1
        assert pairs[0][0] == reference(tok, messages[:-1], system, generation=True)
    else:
        assert len(pairs) == len(replies_of(messages, ""))
    if name != "yi-6b-chat":  # SentencePiece's decode adds spaces after special tokens
        assert tok.decode(pairs[-1][1]).startswith(("<think>\n\n</think>\n\n" if name == "qwen3" else "")
                                                   + messages[-1]["content"])


@pytest.mark.parametrize("name", ["qwen2.5-instruct", "qwen3", "llama-3.2-instruct"])
def test_tokenizer_own_template_with_tools(name):
    tok = tokenizer(name)
    template = template_for(tok, None)
    assert template.supports_tools
    pairs = check(tok, template, TOOL_CHAT, None, TOOLS)
    if name in REWRITING:  # Qwen3 shows the empty think block before a call only while the call is the last turn
        assert len(pairs) == 1 and pairs[0][0] == reference(tok, TOOL_CHAT[:-1], None, TOOLS, generation=True)
    else:
        assert tok.decode(pairs[0][1]).startswith(QWEN_CALL if name.startswith("qwen") else '{"name": "get_weather"')


def test_tokenizer_own_template_with_thinking_off():
    tok = tokenizer("qwen3")
    template = template_for(tok, None, enable_thinking=False)
    pairs = check(tok, template, SINGLE, enable_thinking=False)
    assert tok.decode(pairs[0][1]) == SINGLE[1]["content"] + "<|im_end|>\n"
    with pytest.raises(TemplateError, match="enable_thinking is false"):
        template.encode_turns(tok, REASONED[:2])


# --- train/serve parity: the saved tokenizer renders what training encoded ---

PREPARED = [("qwen2.5-instruct", "qwen"), ("qwen3", "qwen3"), ("qwen2-vl-instruct", "qwen2_vl"),
            ("llama-3.2-instruct", "llama3"), ("mistral-7b-instruct-v0.3", "mistral"), ("phi-3.5-mini-instruct", "phi"),
            ("smollm2-135m-instruct-from-gguf", "smollm2"), ("qwen2.5-instruct", None), ("qwen3", None)]


@pytest.mark.parametrize("thinking", [True, False])
@pytest.mark.parametrize(("name", "template_name"), PREPARED)
def test_prepared_tokenizer_renders_as_training_encoded(name, template_name, thinking):
    tok = copy.deepcopy(tokenizer(name))
    template = template_for(tok, template_name, default_system="Be brief.", enable_thinking=thinking)
    template.prepare_tokenizer(tok)
    cases = [(SINGLE, None, None), (MULTI, SYSTEM, None)]
    if template.supports_tools:
        cases.append((TOOL_CHAT, None, TOOLS))
    if template.supports_tools and name.startswith("qwen"):  # Llama 3 and GLM-4 write one call per reply
        cases.append((TWO_CALLS, SYSTEM, TOOLS))
    for messages, system, tools in cases:
        pairs = template.encode_turns(tok, messages, system, tools)
        # No chat_template and no enable_thinking passed: what a serving engine renders from the saved tokenizer.
        assert flat(pairs) == reference(tok, messages, system, tools)
        prompt = reference(tok, messages[:-1], system, tools, generation=True)
        assert prompt == flat(pairs[:-1]) + pairs[-1][0]


def test_saved_tokenizer_keeps_thinking_off(tmp_path):
    from transformers import AutoTokenizer

    for template_name in ("qwen3", None):
        tok = copy.deepcopy(tokenizer("qwen3"))
        template_for(tok, template_name, enable_thinking=False).prepare_tokenizer(tok)
        tok.save_pretrained(tmp_path / str(template_name))
        served = AutoTokenizer.from_pretrained(tmp_path / str(template_name))
        text = served.apply_chat_template(to_hf_messages(SINGLE[:1], None), add_generation_prompt=True, tokenize=False)
        assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
        thinking = served.apply_chat_template(to_hf_messages(SINGLE[:1], None), add_generation_prompt=True,
                                              tokenize=False, enable_thinking=True)
        assert thinking.endswith("<|im_start|>assistant\n")
