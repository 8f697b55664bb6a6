"""What `tunelab api` refuses about a request body before any route sees it, or before any work is done for it.

    app.add_middleware(BodyLimits, max_bytes=8 * 2**20, timeout=30)    # 413 and 408, connection closed
    check_unicode(await request.json())                                # 400 naming the string at fault

- A body over `max_bytes` gets 413: at once when its Content-Length says so (nothing of it is read, and no
  `100 Continue` goes out), else as soon as the bytes counted (a chunked body) pass the limit.
- A body not received whole within `timeout` seconds of its headers gets 408: a client that sends slowly or stops
  half-way holds a connection for that long and never the model, which a request waits for only once its body is in
  (FastAPI reads and validates the whole body before the route runs).
- Both answers close the connection, so the rest of the body is never read.

Recent FastAPI versions have a `max_body_size` of their own; this middleware counts the bytes itself because the
deadline needs the same wrapper around `receive`, and tunelab supports FastAPI from 0.110.
"""

import asyncio
from typing import Any

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tunelab.api.protocol import APIError, error_body

_CLOSE = {"Connection": "close"}


class BodyLimits:
    """ASGI middleware: 413 for a body over `max_bytes`, 408 for one not complete `timeout` seconds after the
    request's headers (the messages name API_MAX_BODY_MB and API_BODY_TIMEOUT, which set them in `tunelab api`)."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout: float) -> None:
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            response = JSONResponse(error_body(self._too_large(), "invalid_request_error"), 413, headers=_CLOSE)
            await response(scope, receive, send)
            return
        await self.app(scope, self._guarded(receive), send)

    def _too_large(self) -> str:
        limit = f"{self.max_bytes // 2**20} MiB" if self.max_bytes % 2**20 == 0 else f"{self.max_bytes} bytes"
        return f"the request body is larger than this server's limit of {limit} (API_MAX_BODY_MB)"

    def _guarded(self, receive: Receive) -> Receive:
        deadline = asyncio.get_running_loop().time() + self.timeout
        received, complete = 0, False

        async def guarded_receive() -> Message:
            nonlocal received, complete
            if complete:   # what follows the body is a disconnect, which a stream may await for as long as it runs
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise HTTPException(408, f"the request body did not arrive whole within {self.timeout:g} s "
                                         f"(API_BODY_TIMEOUT)", headers=_CLOSE) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, self._too_large(), headers=_CLOSE)
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        return guarded_receive


def check_unicode(body: Any) -> None:
    """Refuse a string holding a lone UTF-16 surrogate ("\\ud800"), which JSON's grammar allows and nothing after the
    parser takes (tokenizers and UTF-8 encoders raise); APIError names where it is. Iterative, as a body may nest
    as deep as the JSON parser goes."""
    pending: list[tuple[str, Any]] = [("", body)]
    while pending:
        path, value = pending.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                child = f"{path}.{key}" if path else key
                _check_text(child, key)
                pending.append((child, item))
        elif isinstance(value, list):
            pending.extend((f"{path}.{index}" if path else str(index), item) for index, item in enumerate(value))
        elif isinstance(value, str):
            _check_text(path, value)


def _check_text(path: str, text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        shown = path.encode("utf-8", "backslashreplace").decode("utf-8")   # the message must encode too
        raise APIError(400, f"{shown or 'the body'}: the text holds a lone UTF-16 surrogate "
                            f"({ascii(text[err.start])}) at character {err.start}, which is not a character; "
                            f"send valid Unicode", param=shown or None) from None
