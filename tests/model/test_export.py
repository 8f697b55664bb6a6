"""`tunelab export` on a tiny random model: the merged folder computes what base + adapter computes, carries the
run's tokenizer, template and generation settings, shards, keeps a reward model's head, refuses what it must before
any weights load, and writes an Ollama Modelfile that renders conversations as the saved chat template does.

The references are independent of tunelab: peft's `PeftModel` on the base model for the logits; transformers'
`apply_chat_template` with the template's Jinja for the Modelfile, whose Go template is run by `GoTemplate`, a small
interpreter of Go's text/template written here from Go's documentation (not from the generator).
"""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunelab.config import ConfigError, load_config
from tunelab.data import TEMPLATES, get_template, prepare_template
from tunelab.data.template import modelfile
from tunelab.model.export import MARKER, _export, export_model
from tunelab.model.frozen import load_full_reward_model
from tunelab.model.value_head import last_token_scores
from helpers import REPO

TEXTS = ["Hello! How are you today?", "The sea"]


def export_config(model_dir: Path, adapter: Path | None = None, **keys):
    values = {"model_name_or_path": str(model_dir), "template": "chatml"}
    if adapter is not None:
        values["adapter_name_or_path"] = str(adapter)
    return load_config({**values, **{k: str(v) if isinstance(v, Path) else v for k, v in keys.items()}})


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    """A LoRA adapter on every linear layer with random (non-zero) B matrices, saved with the base's tokenizer."""
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                               init_lora_weights=False))
    out = tmp_path_factory.mktemp("adapter")
    lora.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def exported(tiny_model_dir, adapter_dir, tmp_path_factory):
    config = export_config(tiny_model_dir, adapter_dir, export_dir=tmp_path_factory.mktemp("export") / "merged",
                           default_system="Be brief.", temperature=0.3, top_p=0.8, max_new_tokens=77)
    return export_model(config)


@pytest.fixture(scope="module")
def weightless_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model's config and tokenizer without its weights: an export of it fails once it loads weights, so a
    refusal seen with it came before."""
    out = tmp_path_factory.mktemp("weightless")
    for path in tiny_model_dir.iterdir():
        if path.suffix != ".safetensors":
            shutil.copy(path, out / path.name)
    return out


# --- the merged model ---

def test_the_export_computes_what_base_plus_adapter_computes(tiny_model_dir, adapter_dir, exported):
    tokenizer = AutoTokenizer.from_pretrained(exported)
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    assert batch["attention_mask"][1, 0] == 0, "the export pads on the left"
    merged = AutoModelForCausalLM.from_pretrained(exported)
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        got, want, before = (model(**batch).logits for model in (merged, reference, base))
    attended = batch["attention_mask"].bool()
    torch.testing.assert_close(got[attended], want[attended], atol=1e-5, rtol=1e-5)
    assert (got[attended] - before[attended]).abs().max() > 0.1, "the adapter must change the outputs"

    greedy = {"do_sample": False, "max_new_tokens": 8, "pad_token_id": tokenizer.pad_token_id}
    assert torch.equal(merged.generate(**batch, **greedy), reference.generate(**batch, **greedy))


def test_the_tokenizer_pads_left_and_renders_the_trained_template(tiny_model_dir, adapter_dir, exported):
    tokenizer = AutoTokenizer.from_pretrained(exported)
    assert tokenizer.padding_side == "left"
    assert tokenizer.eos_token == "<|im_end|>"
    config = export_config(tiny_model_dir, adapter_dir, default_system="Be brief.")
    assert tokenizer.chat_template == get_template(config, AutoTokenizer.from_pretrained(adapter_dir)).jinja
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_thinking_off_is_baked_into_the_saved_template(tiny_model_dir, tmp_path):
    config = export_config(tiny_model_dir, export_dir=tmp_path / "out", template="qwen3", enable_thinking=False)
    tokenizer = AutoTokenizer.from_pretrained(export_model(config))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def test_generation_config_and_modelfile_hold_the_config_values_and_the_stop_tokens(exported):
    tokenizer = AutoTokenizer.from_pretrained(exported)
    saved = json.loads((exported / "generation_config.json").read_text())
    assert saved["eos_token_id"] == tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|im_start|>"])
    assert (saved["temperature"], saved["top_p"], saved["max_new_tokens"], saved["do_sample"]) == (0.3, 0.8, 77, True)
    assert saved["pad_token_id"] == tokenizer.pad_token_id
    parsed = read_modelfile((exported / "Modelfile").read_text())
    assert parsed["stop"] == ["<|im_end|>", "<|im_start|>"] and parsed["SYSTEM"] == "Be brief."


def test_small_shards_reload_equal_and_a_new_export_replaces_only_its_own_files(tiny_model_dir, adapter_dir,
                                                                               exported, tmp_path):
    assert (exported / "model.safetensors").is_file(), "export_size: 5 (GB) holds the tiny model in one file"
    out = _export(export_config(tiny_model_dir, adapter_dir, export_dir=tmp_path / "out"), max_shard_size="150KB")
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3 and (out / "model.safetensors.index.json").is_file()
    whole = AutoModelForCausalLM.from_pretrained(exported).state_dict()
    sharded = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert whole.keys() == sharded.keys()
    assert all(torch.equal(whole[name], sharded[name]) for name in whole)

    (out / "notes.txt").write_text("mine")
    export_model(export_config(tiny_model_dir, adapter_dir, export_dir=out))
    assert not any(path.exists() for path in shards) and not (out / "model.safetensors.index.json").exists()
    assert (out / "model.safetensors").is_file() and (out / "notes.txt").read_text() == "mine"
    assert "notes.txt" not in json.loads((out / MARKER).read_text())["files"]


# --- refusals, all before any weights load ---

@pytest.mark.parametrize("keys, message", [
    ({"export_dir": None}, "`export_dir` is required"),
    ({"quantization_bit": 4}, "`quantization_bit`: adapters cannot be merged into a quantized base"),
    ({"export_dir": "the adapter's"}, "is the folder of `adapter_name_or_path`"),
    ({"stage": "rm"}, "`adapter_name_or_path`: `stage: rm` exports a reward model, but .* has no value_head"),
])
def test_refused_before_loading_weights(weightless_model_dir, adapter_dir, tmp_path, keys, message):
    keys = {"export_dir": str(tmp_path / "out"), **keys}
    if keys["export_dir"] == "the adapter's":
        keys["export_dir"] = str(adapter_dir)
    config = export_config(weightless_model_dir, adapter_dir, **keys)
    with pytest.raises(ConfigError, match=message):
        export_model(config)
    assert not (tmp_path / "out").exists()


def test_a_folder_of_other_files_is_never_written_to(weightless_model_dir, adapter_dir, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("mine")
    with pytest.raises(ConfigError, match="`export_dir` .* is not empty and holds no earlier tunelab export"):
        export_model(export_config(weightless_model_dir, adapter_dir, export_dir=tmp_path / "out"))
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mine.txt"]
    assert (tmp_path / "out" / "mine.txt").read_text() == "mine"


def test_the_weightless_model_does_fail_once_weights_load(weightless_model_dir, adapter_dir, tmp_path):
    """The control for the refusals above: a valid config gets as far as loading the weights."""
    with pytest.raises(ConfigError, match="cannot load the model"):
        export_model(export_config(weightless_model_dir, adapter_dir, export_dir=tmp_path / "out"))


# --- reward models and the hub ---

def test_a_reward_model_export_keeps_the_head_and_scores_as_trained(tiny_model_dir, adapter_dir, tmp_path):
    rm_adapter = Path(shutil.copytree(adapter_dir, tmp_path / "rm"))
    generator = torch.Generator().manual_seed(3)
    head = {"v_head.summary.weight": torch.randn(1, 64, generator=generator),
            "v_head.summary.bias": torch.randn(1, generator=generator)}
    save_file(head, str(rm_adapter / "value_head.safetensors"))
    out = export_model(export_config(tiny_model_dir, rm_adapter, export_dir=tmp_path / "out", stage="rm"))
    saved = load_file(out / "value_head.safetensors")
    assert all(torch.equal(saved[name], head[name]) for name in head)

    tokenizer = AutoTokenizer.from_pretrained(out)
    scorer = load_full_reward_model(load_config({
        "model_name_or_path": str(out), "stage": "ppo", "template": "chatml", "reward_model": str(out),
        "reward_model_type": "full"}), tokenizer)
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), rm_adapter)
    with torch.no_grad():
        scores = last_token_scores(scorer(**batch).values, batch["attention_mask"])
        # The last position holds each row's last token under left padding.
        hidden = reference(**batch, output_hidden_states=True).hidden_states[-1][:, -1]
    torch.testing.assert_close(scores, hidden @ head["v_head.summary.weight"][0] + head["v_head.summary.bias"],
                               atol=1e-5, rtol=1e-5)


def test_a_push_without_a_hub_says_the_local_export_is_complete(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="`export_hub_model_id`: cannot push to someone/tiny") as error:
        export_model(export_config(tiny_model_dir, export_dir=out, export_hub_model_id="someone/tiny"))
    assert f"The local export at {out} is complete" in str(error.value)
    assert json.loads((out / MARKER).read_text())["files"]
    AutoModelForCausalLM.from_pretrained(out)


# --- the Ollama Modelfile ---

class GoTemplate:
    """The part of Go's text/template that Modelfile templates use: text; `{{ pipeline }}`; `if` / `else if` /
    `else` / `end`; `range $i, $x := pipeline`; `$x := pipeline` and `$x = pipeline`; the functions eq, ne, and, or,
    not, len and slice; `.Field`, `$.Field`, `$x`, "strings" and parentheses. Variables live until the `end` of the
    block that declared them; assignment changes the nearest declared one."""

    _TOKEN = re.compile(r'\s*("(?:[^"\\]|\\.)*"|\(|\)|:=|=|,|[$.\w]+)')

    def __init__(self, text: str) -> None:
        items = self._lex(text)
        self.tree, at = self._parse(items, 0)
        assert at == len(items), "an `end` or `else` without its block"

    def _lex(self, text: str) -> list[tuple[str, object]]:
        items, at = [], 0
        while at < len(text):
            start = text.find("{{", at)
            if start < 0:
                items.append(("text", text[at:]))
                break
            items.append(("text", text[at:start]))
            tokens, at = [], start + 2
            while True:
                if text.startswith("}}", at) or text.startswith(" }}", at):
                    at = text.index("}}", at) + 2
                    break
                match = self._TOKEN.match(text, at)
                assert match, f"cannot read the action at {text[start:start + 40]!r}"
                tokens.append(match.group(1))
                at = match.end()
            items.append(("action", tokens))
        return [item for item in items if item != ("text", "")]

    def _parse(self, items, at, stop=("end",)):
        nodes = []
        while at < len(items):
            kind, value = items[at]
            if kind == "text":
                nodes.append(("text", value))
                at += 1
                continue
            word = value[0]
            if word in stop or word == "else":
                return nodes, at
            if word == "if":
                branches, otherwise = [], []
                condition = value[1:]
                while True:
                    body, at = self._parse(items, at + 1)
                    branches.append((condition, body))
                    tokens = items[at][1]
                    if tokens[0] == "end":
                        break
                    if tokens[1:2] == ["if"]:
                        condition = tokens[2:]
                        continue
                    otherwise, at = self._parse(items, at + 1)
                    break
                nodes.append(("if", branches, otherwise))
                at += 1
            elif word == "range":
                names = [t for t in value[1:value.index(":=")] if t != ","]
                body, at = self._parse(items, at + 1)
                nodes.append(("range", names, value[value.index(":=") + 1:], body))
                at += 1
            elif len(value) > 1 and value[1] in (":=", "="):
                nodes.append(("set", value[0], value[1], value[2:]))
                at += 1
            else:
                nodes.append(("print", value))
                at += 1
        return nodes, at

    def render(self, data: dict) -> str:
        out: list[str] = []
        self._run(self.tree, [{"$": data}], data, out)
        return "".join(out)

    def _run(self, nodes, scopes, dot, out):
        for node in nodes:
            if node[0] == "text":
                out.append(node[1])
            elif node[0] == "print":
                out.append(str(self._eval(node[1], scopes, dot)))
            elif node[0] == "set":
                _, name, op, tokens = node
                value = self._eval(tokens, scopes, dot)
                target = scopes[-1] if op == ":=" else next(s for s in reversed(scopes) if name in s)
                target[name] = value
            elif node[0] == "if":
                _, branches, otherwise = node
                body = next((b for c, b in branches if self._true(self._eval(c, scopes, dot))), otherwise)
                self._run(body, [*scopes, {}], dot, out)
            elif node[0] == "range":
                _, names, tokens, body = node
                for index, item in enumerate(self._eval(tokens, scopes, dot)):
                    self._run(body, [*scopes, dict(zip(names, (index, item)))], item, out)

    @staticmethod
    def _true(value) -> bool:
        return value not in (None, False, 0, "") and not (isinstance(value, (list, dict)) and not value)

    def _eval(self, tokens, scopes, dot):
        value, rest = self._command(list(tokens), scopes, dot)
        assert not rest, f"unread tokens {rest}"
        return value

    def _command(self, tokens, scopes, dot):
        functions = {"eq": lambda a, *b: a in b, "ne": lambda a, b: a != b, "not": lambda a: not self._true(a),
                     "and": lambda *a: next((x for x in a if not self._true(x)), a[-1]),
                     "or": lambda *a: next((x for x in a if self._true(x)), a[-1]),
                     "len": len, "slice": lambda x, start, *end: x[start:end[0] if end else None]}
        if tokens[0] in functions:
            name, args = tokens.pop(0), []
            while tokens and tokens[0] != ")":
                args.append(self._operand(tokens, scopes, dot))
            return functions[name](*args), tokens
        return self._operand(tokens, scopes, dot), tokens

    def _operand(self, tokens, scopes, dot):
        token = tokens.pop(0)
        if token == "(":
            value, rest = self._command(tokens, scopes, dot)
            assert rest.pop(0) == ")"
            return value
        if token.startswith('"'):
            return json.loads(token)  # the Go escapes the generator writes are JSON's
        if token.isdigit():
            return int(token)
        base, *fields = token.split(".")
        value = dot if base == "" else next(s[base] for s in reversed(scopes) if base in s)
        for name in (f for f in fields if f):
            value = value[name]
        return value


def read_modelfile(text: str) -> dict:
    """The commands of a Modelfile as Ollama's parser reads them: `# comments`, then a command and its argument,
    bare, "quoted" or \"\"\"triple-quoted\"\"\" (which may span lines)."""
    parsed: dict = {"TEMPLATE": None, "SYSTEM": None, "stop": []}
    at = 0
    while at < len(text):
        line_end = text.find("\n", at) if "\n" in text[at:] else len(text)
        line = text[at:line_end]
        if not line.strip() or line.startswith("#"):
            at = line_end + 1
            continue
        command, _, rest = line.partition(" ")
        start = at + len(command) + 1
        if command == "PARAMETER":
            name, _, rest = rest.partition(" ")
            start += len(name) + 1
        if text.startswith('"""', start):
            end = text.index('"""', start + 3)
            argument, at = text[start + 3:end], end + 4
        elif text.startswith('"', start):
            end = text.index('"', start + 1)
            argument, at = text[start + 1:end], end + 2
        else:
            argument, at = text[start:line_end], line_end + 1
        if command == "PARAMETER":
            parsed.setdefault(name, []).append(argument)
        else:
            parsed[command] = argument
    return parsed


def ollama_prompt(parsed: dict, messages: list[dict]) -> str:
    """What Ollama's chat endpoint renders: the Modelfile's SYSTEM becomes a system message when the request has
    none; the system messages are joined into `.System` and also stay in `.Messages`."""
    if parsed["SYSTEM"] and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": parsed["SYSTEM"]}, *messages]
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    data = {"System": system, "Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]}
    return GoTemplate(parsed["TEMPLATE"]).render(data)


USER = {"role": "user", "content": "What is the capital of France?"}
REPLY = {"role": "assistant", "content": "Paris."}
SYSTEM = {"role": "system", "content": "You answer in one word."}
LATER = {"role": "user", "content": "And of Japan? 请用中文回答。"}
TOOL = {"role": "tool", "content": '{"temp_c": -3}'}
PREFILL = {"role": "assistant", "content": "The capital is"}
CHATS = [[USER], [SYSTEM, USER], [USER, REPLY, LATER], [SYSTEM, USER, REPLY, LATER], [USER, REPLY, TOOL],
         [USER, PREFILL], [SYSTEM, USER, REPLY, LATER, PREFILL]]


def go_and_jinja(tokenizer, name: str, chat: list[dict], **keys) -> tuple[str, str]:
    """(Ollama's prompt from the Modelfile, apply_chat_template's with the template's Jinja) for one conversation."""
    template = get_template(load_config({"model_name_or_path": "m", "template": name, **keys}), tokenizer)
    prefill = chat[-1]["role"] == "assistant"
    # A tokenizer without BOS (the tiny one) leaves `bos_token` undefined in Jinja; training writes it as "".
    expected = tokenizer.apply_chat_template(chat, chat_template=template.jinja, tokenize=False,
                                             add_generation_prompt=not prefill, continue_final_message=prefill,
                                             bos_token=tokenizer.bos_token or "")
    return ollama_prompt(read_modelfile(modelfile(template, tokenizer)), chat), expected


VARIANTS = [pytest.param(name, {}, id=name) for name in TEMPLATES] + [
    pytest.param(name, {"enable_thinking": False}, id=f"{name}-thinking-off")
    for name, template in TEMPLATES.items() if template.thought] + [
    pytest.param(name, {"default_system": 'Say "hi" first.\nThen help.'}, id=f"{name}-quoted-system")
    for name in ("chatml", "llama2", "gemma")]


@pytest.mark.parametrize("name, keys", VARIANTS)
def test_the_modelfile_renders_every_conversation_as_the_saved_template(tiny_model_dir, name, keys):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for chat in CHATS:
        got, expected = go_and_jinja(tokenizer, name, chat, **keys)
        assert got == expected, chat


@pytest.mark.parametrize("name", [n for n, t in TEMPLATES.items() if "{{bos_token}}" in t.prefix + t.user])
def test_the_runtime_bos_is_not_doubled(tiny_model_dir, name):
    """With a tokenizer that starts every text with BOS (Ollama's runtime then does too), the tokens Ollama feeds
    equal the tokens training saw: the template's first BOS is left to the runtime."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.bos_token = "<|begin_of_text|>"
    tokenizer.add_bos_token = True
    for chat in CHATS:
        got, expected = go_and_jinja(tokenizer, name, chat)
        assert got.count("<|begin_of_text|>") == expected.count("<|begin_of_text|>") - 1
        assert tokenizer(got)["input_ids"] == tokenizer(expected, add_special_tokens=False)["input_ids"], chat


def test_the_modelfile_stops_at_the_template_stop_words_and_eos(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    template = prepare_template(load_config({"model_name_or_path": "m", "template": "llama3",
                                             "default_system": "Be brief."}), tokenizer)
    parsed = read_modelfile(modelfile(template, tokenizer))
    assert parsed["FROM"] == "."
    assert parsed["SYSTEM"] == "Be brief."
    # llama3 makes <|eot_id|> the eos; <|eom_id|> (a tool call's end) is a stop word too.
    assert parsed["stop"] == ["<|eot_id|>", "<|eom_id|>"]


def test_a_jinja_template_gets_stop_words_and_a_note_instead_of_a_template(tiny_model_dir, caplog):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    template = get_template(load_config({"model_name_or_path": "m", "default_system": "Be brief."}), tokenizer)
    text = modelfile(template, tokenizer)
    parsed = read_modelfile(text)
    assert parsed["TEMPLATE"] is None and parsed["SYSTEM"] == "Be brief." and parsed["stop"] == ["<|im_end|>"]
    assert "chat_template.jinja" in text and "cannot be translated" in caplog.text


def test_a_plain_text_model_gets_no_template_and_stops_at_eos(tiny_model_dir):
    """stage pt: no chat template, so Ollama's default (the prompt as is) applies."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    parsed = read_modelfile(modelfile(None, tokenizer))
    assert (parsed["FROM"], parsed["TEMPLATE"], parsed["SYSTEM"], parsed["stop"]) == (".", None, None, ["<|im_end|>"])


def test_the_example_config_exports_the_quickstart_adapter():
    config = load_config(REPO / "examples" / "quickstart_export.yaml")
    quickstart = load_config(REPO / "examples" / "quickstart.yaml")
    assert config.adapter_name_or_path == [quickstart.output_dir]
    assert (config.model_name_or_path, config.template) == (quickstart.model_name_or_path, quickstart.template)
    assert config.export_dir == "saves/smollm2-135m/lora/quickstart-merged"
