"""The inference engine and the front ends on it (terminal chat, ChatModel, web chat) on a tiny random model.

Golden replies come from plain transformers: the tokenizer's saved chat template and `model.generate`, never from
the engine itself.
"""

import asyncio
import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import tunelab
from tunelab.config import ConfigError, load_config
from tunelab.data.template import TOOL_FORMATS
from tunelab.infer.backends import build_engine
from tunelab.infer.engine import ReplyText, RequestError
from helpers import REPO

QUESTION = [{"role": "user", "content": "Who are you?"}]
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                                 "parameters": {"type": "object",
                                                                "properties": {"city": {"type": "string"}}}}}


def engine_config(model_dir: Path, **overrides) -> dict:
    return {"model_name_or_path": str(model_dir), "template": "qwen", "do_sample": False, "max_new_tokens": 16,
            **overrides}


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return build_engine(load_config(engine_config(tiny_model_dir)))


def plain_greedy(model_dir: Path, chat_template: str, messages: list[dict], max_new_tokens: int,
                 tools: list | None = None) -> tuple[list[int], str]:
    """Prompt ids and greedy reply from plain transformers, with the chat template the engine's tokenizer would save."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    prompt = tokenizer.apply_chat_template(messages, tools=tools, chat_template=chat_template,
                                           add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"), pad_token_id=0)
    return list(prompt), tokenizer.decode(out[0, len(prompt):], skip_special_tokens=True)


def test_greedy_reply_equals_plain_transformers(engine, tiny_model_dir):
    messages = [{"role": "system", "content": "Be brief."}, *QUESTION]
    [reply] = engine.chat(messages)
    prompt, expected = plain_greedy(tiny_model_dir, engine.template.jinja, messages, 16)
    assert reply.text == expected and reply.text
    assert reply.prompt_tokens == len(prompt)
    # A random model does not stop on its own within 16 tokens.
    assert (reply.finish_reason, reply.completion_tokens) == ("length", 16)


def test_stream_pieces_add_up_to_the_reply(engine):
    deltas = list(engine.stream(QUESTION))
    final = deltas[-1].reply
    assert final is not None and all(d.reply is None for d in deltas[:-1])
    assert "".join(d.text for d in deltas) == final.text == engine.chat(QUESTION)[0].text
    assert len(deltas) > 3  # it streams, rather than handing over the reply in one piece


def test_async_variants_and_chat_model(engine, tiny_model_dir):
    model = tunelab.ChatModel(engine_config(tiny_model_dir))
    [reply] = model.chat(QUESTION)
    assert reply.text == "".join(model.stream_chat(QUESTION)) == engine.chat(QUESTION)[0].text

    async def both():
        [async_reply] = await model.achat(QUESTION)
        pieces = [piece async for piece in model.astream_chat(QUESTION)]
        return async_reply.text, "".join(pieces)

    assert asyncio.run(both()) == (reply.text, reply.text)
    assert len(model.chat(QUESTION, n=3)) == 3


def test_stop_strings_cut_the_reply_and_end_generation(engine):
    full = engine.chat(QUESTION, max_new_tokens=16)[0].text
    # Two letters of a plain word (transformers matches stop strings on token text, whole bytes only).
    stop = re.search(r" ([a-z]{2})", full).group(1)
    [reply] = engine.chat(QUESTION, max_new_tokens=16, stop=[stop])
    assert reply.text == full[:full.index(stop)]
    assert reply.finish_reason == "stop" and reply.completion_tokens < 16
    streamed = "".join(d.text for d in engine.stream(QUESTION, max_new_tokens=16, stop=stop))
    assert streamed == reply.text


def test_requests_it_cannot_serve_are_refused_by_name(engine):
    cases = {
        "unknown generation setting": dict(temprature=0.5),
        "`temperature`: got 'hot'": dict(temperature="hot"),
        "`max_new_tokens`: got 0": dict(max_new_tokens=0),
        "exceeds the model's context of 1024": dict(max_new_tokens=10_000),
        "`presence_penalty` must be a number from -2 to 2": dict(presence_penalty=3),
        "`stop` must be a string or a list": dict(stop=[1]),
    }
    for message, settings in cases.items():
        with pytest.raises(RequestError, match=message):
            engine.chat(QUESTION, **settings)
    conversations = {
        "non-empty list": [],
        "last message must be from the user": [*QUESTION, {"role": "assistant", "content": "hi"}],
        "system message may only come first": [*QUESTION, {"role": "system", "content": "x"}],
        "unknown role 'bot'": [{"role": "bot", "content": "x"}],
        "does not follow a user or tool message": [{"role": "assistant", "content": "a"}, *QUESTION],
        "`content` must be a string": [{"role": "user", "content": 3}],
    }
    for message, messages in conversations.items():
        with pytest.raises(RequestError, match=message):
            engine.chat(messages)
    with pytest.raises(RequestError, match="beam search"):
        next(engine.stream(QUESTION, num_beams=2))
    assert engine.chat(QUESTION, num_beams=2, max_new_tokens=4)[0].completion_tokens == 4


def test_tools_and_parallel_tool_results_render_as_the_saved_template_does(engine, tiny_model_dir):
    calls = [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
             {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]
    messages = [{"role": "user", "content": "Weather in Oslo and Rome?"},
                {"role": "assistant", "content": "", "tool_calls": calls},
                {"role": "tool", "content": "rain"}, {"role": "tool", "content": "sun"}]
    [reply] = engine.chat(messages, tools=[WEATHER_TOOL], max_new_tokens=8)
    prompt, expected = plain_greedy(tiny_model_dir, engine.template.jinja, messages, 8, tools=[WEATHER_TOOL])
    assert reply.prompt_tokens == len(prompt) and reply.text == expected
    # Both results sit in one user turn, as Qwen's template writes parallel results.
    text = engine.tokenizer.decode(prompt)
    assert text.count("<tool_response>") == 2 and text.count("<|im_start|>user") == 2


def test_a_template_without_tools_refuses_them(tiny_model_dir):
    plain = build_engine(load_config(engine_config(tiny_model_dir, template="chatml")))
    with pytest.raises(RequestError, match="cannot show tools"):
        plain.chat(QUESTION, tools=[WEATHER_TOOL])


@pytest.mark.parametrize("name", sorted(TOOL_FORMATS))
def test_streamed_text_holds_back_a_tool_call_and_reads_it(name):
    fmt = TOOL_FORMATS[name]
    calls = [{"name": "get_weather", "arguments": {"city": "Oslo"}}, {"name": "get_time", "arguments": {}}]
    calls = calls if fmt.parallel_calls else calls[:1]
    lead = "" if name == "glm4" else "Let me look that up. "
    text = lead + fmt.calls_text(calls)
    assembled = ReplyText([], fmt)
    shown = "".join(assembled.feed(char) for char in text)
    content, parsed = assembled.finish()
    assert shown == content.rstrip(" ") or shown == lead
    assert content == lead.strip()
    assert parsed == [{"name": c["name"], "arguments": json.dumps(c["arguments"])} for c in calls]


def test_streamed_text_holds_back_a_partial_stop_string():
    assembled = ReplyText(["END"], None)
    assert assembled.feed("one E") == "one "
    assert assembled.feed("N") == ""
    assert assembled.feed("X two") == "ENX two"
    assert assembled.feed(" END three") == " "
    assert assembled.feed(" more") == ""
    assert assembled.finish() == ("one ENX two ", []) and assembled.stopped


def test_adapter_folder_supplies_the_trained_template(tiny_model_dir, tmp_path):
    """Without `template`, a LoRA run's saved tokenizer (with the template it trained with) is used."""
    tunelab.train({"model_name_or_path": str(tiny_model_dir), "stage": "sft", "do_train": True,
                   "finetuning_type": "lora", "dataset": "identity", "dataset_dir": str(REPO / "data"),
                   "template": "qwen", "default_system": "You are Kestrel.", "cutoff_len": 64,
                   "output_dir": str(tmp_path / "lora"), "max_steps": 2, "per_device_train_batch_size": 2,
                   "learning_rate": 1e-2, "save_strategy": "no", "report_to": "none"})
    served = build_engine(load_config({"model_name_or_path": str(tiny_model_dir), "do_sample": False,
                                       "adapter_name_or_path": str(tmp_path / "lora"), "max_new_tokens": 4}))
    [reply] = served.chat(QUESTION)
    assert "You are Kestrel." in served.tokenizer.decode(
        served.template.encode_prompt(served.tokenizer, QUESTION))
    assert served.template.tools is TOOL_FORMATS["qwen"]  # read from the saved template by probing it
    assert reply.completion_tokens == 4


def test_terminal_chat_streams_keeps_history_and_understands_clear_and_exit(tiny_model_dir, tmp_path):
    config = tmp_path / "chat.yaml"
    config.write_text(json.dumps(engine_config(tiny_model_dir, max_new_tokens=6)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, "-m", "tunelab", "chat", str(config)],
                          input="hello\nhello\nclear\nhello\nexit\n", capture_output=True, text=True, env=env,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    replies = [line.split("Assistant: ", 1)[1] for line in done.stdout.splitlines() if "Assistant: " in line]
    engine = build_engine(load_config(engine_config(tiny_model_dir, max_new_tokens=6)))
    first = engine.chat([{"role": "user", "content": "hello"}])[0].text
    second = engine.chat([{"role": "user", "content": "hello"}, {"role": "assistant", "content": first},
                          {"role": "user", "content": "hello"}])[0].text
    assert replies == [first, second, first]  # the second turn saw the first; after `clear` it starts over
    assert "History cleared." in done.stdout


def test_webchat_page_answers_through_its_api(engine):
    pytest.importorskip("gradio")
    from gradio_client import Client

    from tunelab.webui.chat import build_chat_page

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    page = build_chat_page(engine)
    page.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        reply = Client(f"http://127.0.0.1:{port}/", verbose=False).predict(
            "Who are you?", "", 16, 0.5, 0.5, api_name="/chat")
    finally:
        page.close()
    assert reply == engine.chat(QUESTION)[0].text


def test_vllm_backend_without_vllm_says_so(tiny_model_dir):
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    with pytest.raises(ConfigError, match=r"`infer_backend: vllm` needs the `vllm` package, which is not installed"):
        build_engine(load_config(engine_config(tiny_model_dir, infer_backend="vllm")))


@pytest.mark.parametrize("family, tool_format", [("qwen2.5-instruct", "qwen"), ("qwen3", "qwen"),
                                                 ("llama-3.2-instruct", "llama3")])
def test_a_tokenizers_own_template_tells_its_tool_format(family, tool_format):
    """Calls are read back in the format the model's own chat template writes them (found by rendering one)."""
    folder = REPO.parent / "shared" / "tokenizers" / family
    if not folder.is_dir():
        pytest.skip("../shared/tokenizers is not here")
    from tunelab.data import TokenizerTemplate

    template = TokenizerTemplate(AutoTokenizer.from_pretrained(folder))
    assert template.supports_tools and template.tools is TOOL_FORMATS[tool_format]


def test_cancelling_a_stream_frees_the_engine(engine):
    """A client that hangs up mid-stream cancels the async iterator: the generation stops and the engine is free."""

    async def consume() -> None:
        async for _ in engine.astream(QUESTION, max_new_tokens=900):
            pass

    async def cancel_after(delay: float) -> BaseException:
        task = asyncio.create_task(consume())
        await asyncio.sleep(delay)
        task.cancel()
        try:
            await task
        except BaseException as err:  # noqa: BLE001 - the kind of exception is what is checked
            return err
        raise AssertionError("900 tokens cannot be generated this fast")

    for delay in (0.01, 0.05, 0.1, 0.15, 0.2):
        assert isinstance(asyncio.run(cancel_after(delay)), asyncio.CancelledError)
        assert engine.lock.acquire(blocking=False), "the cancelled generation still holds the engine"
        engine.lock.release()
