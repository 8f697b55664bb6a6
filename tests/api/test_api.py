"""`tunelab api` on tiny models: the official `openai` client against a real uvicorn server, streamed tool calls from
a model trained to call tools, OpenAI-shaped errors, the API key, the bounded queue under 32 concurrent clients, and
reward scores.

Expected replies come from the engine's own greedy decoding, which test_infer.py checks against plain transformers.
"""

import asyncio
import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
import httpx  # noqa: E402
import torch  # noqa: E402

import tunelab  # noqa: E402
from tunelab.api.app import EngineQueue  # noqa: E402
from tunelab.api.protocol import APIError  # noqa: E402
from tunelab.config import load_config  # noqa: E402
from tunelab.infer.backends import build_engine  # noqa: E402
from tunelab.infer.hf_engine import OpenAIPenalties  # noqa: E402
from helpers import REPO  # noqa: E402
from live_server import KEY, serve  # noqa: E402

QUESTION = [{"role": "user", "content": "Who are you?"}]
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                                 "parameters": {"type": "object",
                                                                "properties": {"city": {"type": "string"}}}}}
CALLS = [{"name": "get_weather", "arguments": {"city": "Oslo"}}, {"name": "get_weather", "arguments": {"city": "Rome"}}]
TOOL_QUESTION = "Weather in Oslo and Rome?"
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}


@pytest.fixture(scope="module")
def server(engine):
    running = serve(engine)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def tool_server(tiny_model_dir, tmp_path_factory):
    """A tiny model fully fine-tuned on one tool-calling sample (two parallel calls), served: it really calls."""
    folder = tmp_path_factory.mktemp("tool_model")
    sample = {"conversations": [{"from": "human", "value": TOOL_QUESTION},
                                {"from": "function_call", "value": json.dumps(CALLS)}],
              "tools": json.dumps([WEATHER_TOOL])}
    (folder / "calls.json").write_text(json.dumps([sample] * 8))
    tunelab.train({"model_name_or_path": str(tiny_model_dir), "stage": "sft", "do_train": True,
                   "finetuning_type": "full", "dataset": str(folder / "calls.json"), "template": "qwen",
                   "cutoff_len": 1024, "output_dir": str(folder / "model"), "max_steps": 40,
                   "per_device_train_batch_size": 8, "learning_rate": 5e-3, "lr_scheduler_type": "constant",
                   "save_strategy": "no", "report_to": "none", "seed": 0})
    engine = build_engine(load_config({"model_name_or_path": str(folder / "model"), "do_sample": False,
                                       "max_new_tokens": 200}))
    running = serve(engine)
    yield running
    running.stop()


def test_models_and_a_plain_completion(server, engine):
    client = server.client()
    assert [m.id for m in client.models.list().data] == ["tiny"]
    completion = client.chat.completions.create(model="tiny", messages=QUESTION)
    [reply] = engine.chat(QUESTION)
    choice = completion.choices[0]
    assert (choice.message.role, choice.message.content, choice.finish_reason) == ("assistant", reply.text, "length")
    prompt = engine.template.encode_prompt(engine.tokenizer, QUESTION)
    assert completion.usage.prompt_tokens == len(prompt)
    assert completion.usage.completion_tokens == 16
    assert completion.usage.total_tokens == len(prompt) + 16


def test_streaming_n_max_tokens_and_stop(server, engine):
    client = server.client()
    full = engine.chat(QUESTION)[0].text
    chunks = list(client.chat.completions.create(model="tiny", messages=QUESTION, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full and len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 16

    two = client.chat.completions.create(model="tiny", messages=QUESTION, n=2)
    assert [c.index for c in two.choices] == [0, 1] and two.usage.completion_tokens == 32
    short = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=3)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    stop = full.split()[1][:2]
    stopped = client.chat.completions.create(model="tiny", messages=QUESTION, stop=[stop])
    assert stopped.choices[0].message.content == full[:full.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"


def test_raw_stream_ends_with_done(server):
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "tiny", "messages": QUESTION, "stream": True, "max_tokens": 4}) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data:")]
    assert response.status_code == 200 and lines[-1] == "data: [DONE]"
    assert json.loads(lines[0][5:])["choices"][0]["delta"]["role"] == "assistant"


def test_streamed_tool_calls_and_parallel_results(tool_server):
    client = tool_server.client()
    messages = [{"role": "user", "content": TOOL_QUESTION}]
    completion = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER_TOOL])
    message = completion.choices[0].message
    assert completion.choices[0].finish_reason == "tool_calls" and not message.content
    calls = [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls]
    assert calls == [(c["name"], c["arguments"]) for c in CALLS]

    chunks = list(client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER_TOOL],
                                                 stream=True))
    streamed = [call for c in chunks if c.choices for call in (c.choices[0].delta.tool_calls or [])]
    assert [(c.index, c.function.name, json.loads(c.function.arguments)) for c in streamed] == \
        [(i, c["name"], c["arguments"]) for i, c in enumerate(CALLS)]
    assert all(c.id.startswith("call_") for c in streamed)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ""  # no markup leaks
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"

    # Both results go back at once, as two consecutive tool messages, and the model answers.
    results = [{"role": "tool", "tool_call_id": call.id, "content": weather}
               for call, weather in zip(message.tool_calls, ("rain", "sun"))]
    follow_up = client.chat.completions.create(
        model="tiny", messages=[*messages, message.model_dump(exclude_none=True), *results], tools=[WEATHER_TOOL],
        max_tokens=8)
    assert follow_up.usage.prompt_tokens > completion.usage.prompt_tokens
    assert follow_up.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_tool_choice_none_hides_the_tools(tool_server):
    client = tool_server.client()
    with_tools = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": TOOL_QUESTION}],
                                                tools=[WEATHER_TOOL], max_tokens=4)
    without = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": TOOL_QUESTION}],
                                             tools=[WEATHER_TOOL], tool_choice="none", max_tokens=4)
    assert without.usage.prompt_tokens < with_tools.usage.prompt_tokens


def test_penalties_have_their_openai_meaning(server, engine):
    """logit - frequency * count - presence * [count > 0], counted over the reply only."""
    scores = torch.zeros(1, 6)
    prompt_and_reply = torch.tensor([[5, 5, 1, 1, 1, 2]])  # prompt: two 5s; reply: three 1s and one 2
    penalised = OpenAIPenalties(prompt_length=2, presence=0.5, frequency=0.25)(prompt_and_reply, scores)
    assert penalised.tolist() == [[0.0, -1.25, -0.75, 0.0, 0.0, 0.0]]
    client = server.client()
    plain = client.chat.completions.create(model="tiny", messages=QUESTION).choices[0].message.content
    penalised_reply = client.chat.completions.create(model="tiny", messages=QUESTION, frequency_penalty=2.0,
                                                     presence_penalty=2.0).choices[0].message.content
    assert penalised_reply == engine.chat(QUESTION, frequency_penalty=2.0, presence_penalty=2.0)[0].text
    assert penalised_reply != plain  # the random model repeats itself; the penalties change what it writes


@pytest.mark.parametrize("body, status, param", [
    ({"model": "gpt-4", "messages": QUESTION}, 404, "model"),
    ({"model": "tiny", "messages": QUESTION, "temperature": "hot"}, 400, "temperature"),
    ({"model": "tiny", "messages": []}, 400, "messages"),
    ({"model": "tiny", "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role"),
    ({"model": "tiny", "messages": [{"role": "assistant", "content": "hi"}, *QUESTION]}, 400, None),
    ({"model": "tiny", "messages": [*QUESTION, {"role": "assistant", "content": "hi"}]}, 400, None),
    ({"model": "tiny", "messages": QUESTION, "max_tokens": 10 ** 7}, 400, "max_tokens"),
    ({"model": "tiny", "messages": QUESTION, "logit_bias": {"1": 5}}, 400, "logit_bias"),
    ({"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}, 400, "messages.0.content.0"),
    ({"model": "tiny", "messages": "hi"}, 400, "messages"),
    ({"model": "tiny", "messages": [{"role": "user", "content": 3}]}, 400, "messages.0.content"),
    ({"model": "tiny", "messages": QUESTION, "n": 0}, 400, "n"),
    ({"model": "tiny", "messages": QUESTION, "temperature": 2.5}, 400, "temperature"),
    ({"model": "tiny", "messages": QUESTION, "stop": 5}, 400, "stop"),
    ({"model": "tiny", "messages": [*QUESTION, {"role": "system", "content": "late"}, *QUESTION]}, 400, None),
    ({"model": "tiny", "messages": [*QUESTION, {"role": "tool", "tool_call_id": "x", "content": "r"}]}, 400,
     "messages.1.role"),
    ({"model": "tiny", "messages": [*QUESTION, {"role": "assistant", "tool_calls": [CALL]}, *QUESTION]}, 400,
     "messages.2.role"),
    ({"model": "tiny", "messages": [*QUESTION, {"role": "assistant", "tool_calls": [CALL]},
                                    {"role": "tool", "tool_call_id": "call_9", "content": "r"}]}, 400,
     "messages.2.tool_call_id"),
    ({"model": "tiny", "messages": QUESTION, "tool_choice": "auto"}, 400, "tool_choice"),
    ({"model": "tiny", "messages": QUESTION, "tools": [WEATHER_TOOL],
      "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, 400, "tool_choice"),
    # Refused by the engine (prompt + max_tokens beyond the context) before a streamed response starts.
    ({"model": "tiny", "messages": QUESTION, "max_tokens": 1000, "stream": True}, 400, None),
])
def test_bad_requests_get_openai_shaped_4xx(server, body, status, param):
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    error = response.json()["error"]
    assert response.status_code == status, error
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param


def test_a_body_that_is_not_json_and_an_unknown_path(server):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    response = httpx.post(f"{server.url}/v1/chat/completions", content=b"{not json", headers=headers)
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    response = httpx.get(f"{server.url}/v1/nothing", headers=headers)
    assert response.status_code == 404 and set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_the_api_key_is_required(server):
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").models.list()
    response = httpx.get(f"{server.url}/v1/models")
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_32_concurrent_clients_are_served_or_refused_and_the_server_survives(engine):
    running = serve(engine, max_waiting=4)
    try:
        def ask(i: int) -> int:
            response = httpx.post(f"{running.url}/v1/chat/completions", timeout=120,
                                  headers={"Authorization": f"Bearer {KEY}"},
                                  json={"model": "tiny", "messages": QUESTION, "max_tokens": 8,
                                        "stream": i % 2 == 0})
            if response.status_code == 429:
                assert response.json()["error"]["code"] == "rate_limit_exceeded"
                assert response.headers["retry-after"]
            return response.status_code

        with ThreadPoolExecutor(32) as pool:
            statuses = list(pool.map(ask, range(32)))
        assert set(statuses) <= {200, 429} and statuses.count(200) >= 5, statuses
        assert 429 in statuses, "32 clients at once must overflow a queue of 4"
        health = httpx.get(f"{running.url}/health").json()
        assert health["status"] == "ok" and health["waiting"] == 0 and not health["busy"]
        assert running.client().chat.completions.create(model="tiny", messages=QUESTION).choices[0].message.content
    finally:
        running.stop()


def test_the_queue_serves_in_arrival_order_and_refuses_beyond_its_bound():
    async def scenario() -> tuple[list[int], list[int]]:
        queue, release, served, refused = EngineQueue(max_waiting=3), asyncio.Event(), [], []

        async def request(number: int) -> None:
            try:
                async with queue.turn():
                    if number == 0:
                        await release.wait()  # the first holds the engine while the others arrive
                    served.append(number)
            except APIError as err:
                assert err.status == 429 and err.headers == {"Retry-After": "1"}
                refused.append(number)

        tasks = []
        for number in range(6):
            tasks.append(asyncio.create_task(request(number)))
            await asyncio.sleep(0)
        release.set()
        await asyncio.gather(*tasks)
        return served, refused

    assert asyncio.run(scenario()) == ([0, 1, 2, 3], [4, 5])


def test_a_client_hanging_up_mid_stream_stops_its_generation(tiny_model_dir, tmp_path):
    """On a copy of the tiny model with a long context, greedy "hello" runs 8,000 tokens (seconds). Once its client
    hangs up, the next request must not wait for them."""
    folder = Path(shutil.copytree(tiny_model_dir, tmp_path / "long"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 16384}))
    running = serve(build_engine(load_config({"model_name_or_path": str(folder), "template": "qwen",
                                              "do_sample": False})))
    hello = [{"role": "user", "content": "hello"}]
    try:
        body = {"model": "tiny", "messages": hello, "max_tokens": 8000, "stream": True}
        with httpx.stream("POST", f"{running.url}/v1/chat/completions", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {KEY}"}) as response:
            lines = response.iter_lines()
            assert sum(next(lines).startswith("data: ") for _ in range(12)) >= 5
        hung_up = time.monotonic()
        client = running.client()
        assert client.chat.completions.create(model="tiny", messages=hello, max_tokens=2).choices[0].finish_reason \
            == "length"
        waited = time.monotonic() - hung_up
        whole = client.chat.completions.create(model="tiny", messages=hello, max_tokens=8000)
        took = time.monotonic() - hung_up - waited
    finally:
        running.stop()
    assert whole.usage.completion_tokens == 8000, "the check needs a reply that does not end by itself"
    assert waited < took / 3, (waited, took)


def test_reward_model_scores(tiny_model_dir, tmp_path, engine):
    tunelab.train({"model_name_or_path": str(tiny_model_dir), "stage": "rm", "do_train": True,
                   "finetuning_type": "lora", "dataset": "identity_preference", "dataset_dir": str(REPO / "data"),
                   "template": "qwen", "cutoff_len": 128, "output_dir": str(tmp_path / "rm"), "max_steps": 2,
                   "per_device_train_batch_size": 2, "save_strategy": "no", "report_to": "none"})
    scorer = build_engine(load_config({"model_name_or_path": str(tiny_model_dir), "stage": "rm",
                                       "adapter_name_or_path": str(tmp_path / "rm"), "template": "qwen"}))
    running = serve(scorer)
    try:
        texts = ["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n", "a shorter text"]
        response = httpx.post(f"{running.url}/v1/score/evaluation", headers={"Authorization": f"Bearer {KEY}"},
                              json={"model": "tiny", "messages": texts})
        body = response.json()
        assert response.status_code == 200 and body["object"] == "score.evaluation"
        assert body["scores"] == pytest.approx(scorer.score(texts), abs=1e-5)
        assert len(set(body["scores"])) == 2
        refused = httpx.post(f"{running.url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                             json={"model": "tiny", "messages": QUESTION})
        assert refused.status_code == 400 and "reward model" in refused.json()["error"]["message"]
    finally:
        running.stop()
    chat_server = serve(engine)
    try:
        refused = httpx.post(f"{chat_server.url}/v1/score/evaluation", headers={"Authorization": f"Bearer {KEY}"},
                             json={"model": "tiny", "messages": ["x"]})
        assert refused.status_code == 400 and "not a reward model" in refused.json()["error"]["message"]
    finally:
        chat_server.stop()
