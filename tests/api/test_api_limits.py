"""`tunelab api`'s limits (issue 16): over raw sockets against a real uvicorn server, a body over the size limit gets
413 whether its Content-Length declares it or its chunks add up to it, and a body that stalls or trickles gets 408 and
a closed connection while other clients are served; in process, a request the model's context cannot hold gets 400
before any generation; an image of more pixels than PIL's bomb limit is refused undecoded; and the limits come from
API_MAX_BODY_MB and API_BODY_TIMEOUT.

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests/api/test_api_limits.py -q
"""

import base64
import json
import socket
import struct
import threading
import time
import zlib

import pytest

pytest.importorskip("fastapi")
import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from tunelab.api.app import ApiSettings, create_app  # noqa: E402
from tunelab.api.media import MediaURLError, media_from_url  # noqa: E402
from tunelab.api.server import api_settings  # noqa: E402
from tunelab.config import ConfigError, load_config  # noqa: E402
from live_server import KEY, serve  # noqa: E402

LIMIT = 4096      # bytes: a small limit, so that bodies over it are quick to send
TIMEOUT = 3.0     # seconds for a whole body
QUESTION = [{"role": "user", "content": "Who are you?"}]


@pytest.fixture(scope="module")
def server(engine):
    running = serve(engine, max_body_bytes=LIMIT, body_timeout=TIMEOUT)
    yield running
    running.stop()


def connect(server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT + 10)


def head(length: int | None = None, *extra: str) -> bytes:
    """A POST to the chat route, up to the end of its headers: with a Content-Length, or chunked without one."""
    lines = ["POST /v1/chat/completions HTTP/1.1", "Host: 127.0.0.1", f"Authorization: Bearer {KEY}",
             "Content-Type: application/json",
             f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def response_until_closed(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of the one response the server sends before it closes the connection (recv times out,
    failing the test, if it keeps the connection open)."""
    data = b""
    while received := sock.recv(65536):
        data += received
    header, _, body = data.partition(b"\r\n\r\n")
    status_line, *fields = header.decode().split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (field.partition(":") for field in fields)}
    return int(status_line.split()[1]), headers, body


def body_of_size(size: int) -> bytes:
    """A valid chat request padded with spaces to exactly `size` bytes."""
    body = json.dumps({"model": "tiny", "messages": QUESTION, "max_tokens": 2}).encode()
    return body + b" " * (size - len(body))


def assert_error(status: int, headers: dict[str, str], body: bytes, expected: int, *words: str) -> None:
    assert status == expected, body
    assert headers["connection"] == "close"
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert all(word in error["message"] for word in words), error["message"]


def test_a_body_at_the_limit_is_served_and_a_declared_larger_one_refused_unread(server):
    at_limit = httpx.post(f"{server.url}/v1/chat/completions", content=body_of_size(LIMIT),
                          headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert at_limit.status_code == 200, at_limit.text
    with connect(server) as sock:
        # Only the headers go out: the answer must come without the body, and without a `100 Continue` asking for it.
        sock.sendall(head(LIMIT + 1, "Expect: 100-continue"))
        status, headers, body = response_until_closed(sock)
    assert_error(status, headers, body, 413, f"limit of {LIMIT} bytes", "API_MAX_BODY_MB")


def test_a_chunked_body_is_counted_and_refused_past_the_limit(server):
    with connect(server) as sock:
        sock.sendall(head(None, "Connection: close") + chunk(body_of_size(LIMIT)) + b"0\r\n\r\n")
        status, _, body = response_until_closed(sock)
    assert status == 200, body
    with connect(server) as sock:
        sock.sendall(head())
        for _ in range(LIMIT // 1024):
            sock.sendall(chunk(b" " * 1024))
        sock.sendall(chunk(b" "))   # one byte over; the body never ends, so only the count can refuse it
        status, headers, body = response_until_closed(sock)
    assert_error(status, headers, body, 413, "API_MAX_BODY_MB")


def stall_declared(sock: socket.socket) -> None:
    sock.sendall(head(100) + b'{"model": ')


def stall_chunked(sock: socket.socket) -> None:
    sock.sendall(head() + chunk(b'{"model": '))


def trickle(sock: socket.socket) -> None:
    """One byte every 0.2 s: each arrives well within the timeout, the whole body never does. (The bytes stop
    shortly before the deadline: one arriving after the server closed the socket would reset the connection.)"""
    sock.sendall(head(200))

    def send() -> None:
        for _ in range(int((TIMEOUT - 0.5) / 0.2)):
            sock.sendall(b" ")
            time.sleep(0.2)

    threading.Thread(target=send, daemon=True).start()


@pytest.mark.parametrize("stall", [stall_declared, stall_chunked, trickle])
def test_a_body_that_stalls_gets_408_and_does_not_hold_the_model(server, stall):
    with connect(server) as sock:
        started = time.monotonic()
        stall(sock)
        # Meanwhile another client is served by the model, well before the stalled body's deadline.
        reply = server.client().chat.completions.create(model="tiny", messages=QUESTION, max_tokens=2)
        served = time.monotonic() - started
        assert reply.choices[0].finish_reason == "length" and served < TIMEOUT, served
        sock.setblocking(False)
        with pytest.raises(BlockingIOError):   # no answer yet to the stalled client
            sock.recv(1)
        sock.setblocking(True)
        sock.settimeout(TIMEOUT + 10)
        status, headers, body = response_until_closed(sock)
        waited = time.monotonic() - started
    assert_error(status, headers, body, 408, f"{TIMEOUT:g} s", "API_BODY_TIMEOUT")
    assert TIMEOUT <= waited < TIMEOUT + 2, waited


@pytest.fixture
def client(engine, monkeypatch):
    """The app in process, with generation made to fail: a request refused "before any generation" must not reach
    it (it would get 500)."""
    def no_generation(*args, **kwargs):
        raise AssertionError("generation ran")

    monkeypatch.setattr(engine, "_generate", no_generation)
    monkeypatch.setattr(engine, "_stream", no_generation)
    return TestClient(create_app(engine, ApiSettings(model_name="tiny")), raise_server_exceptions=False)


@pytest.mark.parametrize("stream", [False, True])
def test_more_tokens_than_the_context_get_400_naming_the_numbers(client, engine, stream):
    context = engine.max_context
    prompt = len(engine.template.encode_prompt(engine.tokenizer, QUESTION))
    long_question = [{"role": "user", "content": "hello " * context}]
    long_prompt = len(engine.template.encode_prompt(engine.tokenizer, long_question))
    assert long_prompt > context and prompt < context - 1
    cases = [({"max_tokens": context}, "max_tokens", [f"`max_tokens` is {context}", f"holds {context} tokens"]),
             ({"max_completion_tokens": 10 ** 30}, "max_completion_tokens", [f"is {10 ** 30}"]),
             ({"max_tokens": context - prompt + 1}, None,
              [f"prompt ({prompt} tokens)", f"max_new_tokens ({context - prompt + 1})", f"context of {context}"]),
             ({"messages": long_question}, None, [f"prompt ({long_prompt} tokens)", "max_new_tokens (16)"])]
    for extra, param, words in cases:
        response = client.post("/v1/chat/completions",
                               json={"model": "tiny", "messages": QUESTION, "stream": stream, **extra})
        error = response.json()["error"]
        assert response.status_code == 400 and error["param"] == param, (extra, error)
        assert all(word in error["message"] for word in words), error["message"]


def test_an_image_past_pils_bomb_limit_is_refused_before_it_is_decoded():
    """A PNG whose header declares 10,000 x 9,000 pixels (90 MB to decode) in a 70-byte file."""
    def png_chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 10_000, 9_000, 8, 0, 0, 0, 0))
           + png_chunk(b"IDAT", zlib.compress(b"")) + png_chunk(b"IEND", b""))
    with pytest.warns(Warning, match="decompression bomb"), pytest.raises(MediaURLError, match="10000 x 9000 pixels"):
        media_from_url("data:image/png;base64," + base64.b64encode(png).decode(), "image", None)


def test_the_limits_come_from_the_environment(tiny_model_dir, monkeypatch):
    config = load_config({"model_name_or_path": str(tiny_model_dir)})
    defaults = api_settings(config)
    assert (defaults.max_body_bytes, defaults.body_timeout) == (8 * 2**20, 30)
    monkeypatch.setenv("API_MAX_BODY_MB", "2")
    monkeypatch.setenv("API_BODY_TIMEOUT", "5")
    settings = api_settings(config)
    assert (settings.max_body_bytes, settings.body_timeout) == (2 * 2**20, 5)
    for name, value in (("API_MAX_BODY_MB", "0"), ("API_BODY_TIMEOUT", "soon")):
        with monkeypatch.context() as patch, pytest.raises(ConfigError, match=name):
            patch.setenv(name, value)
            api_settings(config)
