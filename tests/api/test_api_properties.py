"""Property tests of `tunelab api` (issue 16): whatever body a client sends, the answer is a 2xx or a 4xx with an
OpenAI-shaped error whose message says what is wrong, never a 5xx. `hypothesis` generates the bodies (JSON of any
shape, bytes, a valid request with one field spoiled, numbers of every size and sign, conversations of any roles) and
sends them in process to the real app serving a real tiny model; a fixed seed and a budget of examples keep them
reproducible and under a minute.

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests/api/test_api_properties.py -q --hypothesis-show-statistics
"""

import base64
import copy
import io
import json
import math
import re

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from PIL import Image  # noqa: E402

from tunelab.api.app import ApiSettings, create_app  # noqa: E402
from tunelab.api.media import MediaURLError, media_from_url  # noqa: E402

CONTEXT = 1024   # the tiny model's context (max_position_embeddings)


def budget(examples: int) -> settings:
    return settings(max_examples=examples, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
VALID = {"model": "tiny",
         "messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": [{"type": "text", "text": "Weather in Oslo?"}]},
                      {"role": "assistant", "tool_calls": [CALL]},
                      {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
                      {"role": "user", "content": "Thanks", "name": "ann"}],
         "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                                     "parameters": {"type": "object",
                                                                    "properties": {"city": {"type": "string"}}}}}],
         "tool_choice": "auto", "max_tokens": 3, "temperature": 0, "top_p": 1, "stop": ["\n\n"], "n": 1,
         "stream": False, "stream_options": {"include_usage": True}, "presence_penalty": 0, "user": "u"}

# Text of any characters, lone UTF-16 surrogates among them (JSON can carry them as "\ud800"; hypothesis's text()
# leaves them out).
TEXT = st.text(max_size=12) | st.lists(st.characters() | st.sampled_from("\ud800\udfff"), min_size=1,
                                       max_size=4).map("".join)
NUMBERS = st.integers() | st.floats() | st.sampled_from([0, -1, 2**63, 10**400, -(10**30), 1e308, 0.5])
JSON = st.recursive(st.none() | st.booleans() | NUMBERS | TEXT,
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                    max_leaves=8)


@pytest.fixture(scope="module")
def client(engine):
    assert engine.max_context == CONTEXT
    with TestClient(create_app(engine, ApiSettings(model_name="tiny")), raise_server_exceptions=False) as running:
        yield running


def post(client: TestClient, body: bytes | object, route: str = "/v1/chat/completions") -> tuple[int, dict]:
    """Status and JSON of a POST; a body that is not bytes goes as JSON text, NaN and Infinity included (Python's
    parser takes them, so clients can send them)."""
    content = body if isinstance(body, bytes) else json.dumps(body, allow_nan=True).encode()
    response = client.post(route, content=content, headers={"Content-Type": "application/json"})
    event(f"HTTP {response.status_code}")   # the mix of answers, in --hypothesis-show-statistics
    return response.status_code, response.json() if not response.text.startswith("data:") else {}


def refused(status: int, answer: dict) -> dict:
    """The error of a 4xx answer, checked for OpenAI's shape; fails on a 5xx or another status."""
    assert 400 <= status < 500, (status, answer)
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)
    assert error["message"].strip(), answer
    return error


@budget(500)
@given(body=JSON | st.binary(max_size=64), route=st.sampled_from(["/v1/chat/completions", "/v1/score/evaluation"]))
def test_a_body_of_any_shape_gets_a_4xx_saying_why(client, body, route):
    refused(*post(client, body, route))


def paths(value: object, prefix: tuple = ()) -> list[tuple]:
    """Every place in a JSON value: the keys and indices leading to it."""
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, item in value.items():
            found += paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += paths(item, (*prefix, index))
    return found


PLACES = paths(VALID)


def spoiled(place: tuple, value: object, stream: bool) -> dict:
    """VALID, streamed or not, with the value at `place` replaced by `value` (deleted when `value` is ...)."""
    body = copy.deepcopy({**VALID, "stream": stream})
    parent = body
    for step in place[:-1]:
        parent = parent[step]
    if value is ...:
        del parent[place[-1]]
    else:
        parent[place[-1]] = value
    return body


@pytest.mark.parametrize("stream", [False, True])
def test_the_request_spoiled_below_is_served_whole(client, stream):
    response = client.post("/v1/chat/completions", json={**VALID, "stream": stream})
    assert response.status_code == 200, response.text


@budget(500)
@given(place=st.sampled_from(PLACES), value=JSON | st.just(...), stream=st.booleans())
def test_a_valid_request_with_one_field_spoiled_is_served_or_refused_by_name(client, place, value, stream):
    status, answer = post(client, spoiled(place, value, stream))
    if status == 200:
        return
    error = refused(status, answer)
    assert names(error, place[0]) or f"context of {CONTEXT} tokens" in error["message"], (place, value, error)


def names(error: dict, field: str) -> bool:
    """Whether an error points at a top-level field: by `param`, or in its message (the engine's messages, which
    have no `param`, say "message 2" or "messages[2]")."""
    param = error["param"] or ""
    return (param == field or param.startswith(f"{field}.") or re.search(rf"\b{field}\b", error["message"]) is not None
            or field == "messages" and re.search(r"\bmessage \d", error["message"]) is not None)


# The documented range of each numeric parameter, as (type check, range check).
RANGES = {"n": (int, lambda x: 1 <= x <= 16), "max_tokens": (int, lambda x: x >= 1),
          "max_completion_tokens": (int, lambda x: x >= 1), "temperature": (float, lambda x: 0 <= x <= 2),
          "top_p": (float, lambda x: 0 < x <= 1), "presence_penalty": (float, lambda x: -2 <= x <= 2),
          "frequency_penalty": (float, lambda x: -2 <= x <= 2)}


def expected_refusal(name: str, value: object) -> bool:
    """Whether OpenAI's documented ranges refuse `value` for `name`: strictly typed (an integer for a count; an
    integer or a float for a real number; never a boolean) and within range (NaN is within none)."""
    kind, in_range = RANGES[name]
    if isinstance(value, bool) or not isinstance(value, int if kind is int else (int, float)):
        return True
    return isinstance(value, float) and math.isnan(value) or not in_range(value)


@budget(300)
@given(name=st.sampled_from(sorted(RANGES)),
       value=NUMBERS | st.integers(-3, 20) | st.floats(-3, 3) | st.booleans() | st.sampled_from(["1", [1]]))
def test_numbers_outside_their_range_are_refused_by_name(client, name, value):
    engine = client.app.state.service.engine
    prompt = len(engine.template.encode_prompt(engine.tokenizer, [{"role": "user", "content": "Hi"}], "Be brief."))
    question = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    status, answer = post(client, {"model": "tiny", "messages": question, name: value})
    if expected_refusal(name, value):
        assert refused(status, answer)["param"] == name, (name, value, answer)
    elif name in ("max_tokens", "max_completion_tokens") and value >= CONTEXT:
        assert refused(status, answer)["param"] == name and f"holds {CONTEXT} tokens" in answer["error"]["message"]
    elif name in ("max_tokens", "max_completion_tokens") and prompt + value > CONTEXT:
        assert "exceeds the model's context" in refused(status, answer)["message"], (value, answer)
    else:
        assert status == 200, (name, value, answer)


# Mostly the roles and shapes a conversation has, so that some are served and the rest fail in varied places.
PART = st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]), "text": TEXT,
                              "image_url": st.fixed_dictionaries({"url": TEXT})})
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "assistant", "tool"] * 3 + ["robot", ""]),
     "content": TEXT | TEXT | TEXT | st.lists(PART, max_size=2) | JSON},
    optional={"tool_calls": st.just([CALL]) | JSON, "tool_call_id": st.just("call_1") | TEXT, "name": TEXT})


@budget(400)
@given(messages=st.lists(MESSAGE, max_size=4), last=st.just([{"role": "user", "content": "Hi"}]) | st.just([]),
       stream=st.booleans())
def test_conversations_of_any_roles_are_served_or_refused(client, messages, last, stream):
    body = {"model": "tiny", "messages": messages + last, "max_tokens": 2, "stream": stream}
    status, answer = post(client, body)
    if status != 200:
        refused(status, answer)


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), "red").save(buffer, "PNG")
    return buffer.getvalue()


@budget(500)
@given(payload=st.binary(max_size=64) | st.builds(lambda cut, flip: bytes(
           byte ^ (1 if i == flip else 0) for i, byte in enumerate(png(3, 2)[:cut])),
           st.integers(0, 80), st.integers(0, 80)),
       header=st.sampled_from(["data:image/png;base64,", "data:image/jpeg;base64,", "data:text/plain;base64,",
                               "data:image/png,", "data:", "file:///etc/passwd#", "https://example.com/a.png?"]),
       encode=st.booleans())
def test_any_image_url_is_decoded_or_refused_with_a_reason(payload, header, encode):
    """Damaged, truncated and foreign images, wrong headers and non-base64 payloads: an image or MediaURLError (which
    the API turns into 400 naming the part), never another exception."""
    url = header + (base64.b64encode(payload).decode() if encode else payload.decode("latin-1"))
    try:
        image = media_from_url(url, "image", None)
    except MediaURLError as err:
        event("refused")
        assert str(err)
    else:
        event("decoded")
        assert image.size[0] * image.size[1] > 0
