"""The FastAPI app of `tunelab api`: OpenAI's chat completions (plain and streamed), the model list, LLaMA-Factory's
reward-model scores, and a health check, on one engine.

    GET  /v1/models                 the one served model
    POST /v1/chat/completions       see protocol.py for the parameters
    POST /v1/score/evaluation       {"model", "messages": [text, ...]} -> {"scores": [...]} (reward models)
    GET  /health                    200 while serving, with the queue's state (no API key needed)

The engine runs one request at a time. Requests that arrive meanwhile wait their turn in arrival order; when
`max_waiting` are already waiting, one more is refused with 429 and Retry-After, so an overload is answered, never a
crash. Every error has OpenAI's shape and status: 400 a bad request (validation errors name the field, e.g.
`messages.0.role`), 401 a missing or wrong API key, 404 an unknown model, 408 a body not received in time, 413 a body
too large (limits.py), 429 a full queue, 500 a failure of ours.
"""

import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException

from tunelab.api.limits import BodyLimits, check_unicode
from tunelab.api.protocol import (APIError, ChatCompletionRequest, ChunkWriter, ScoreRequest, calls_of,
                                  completion_body, engine_messages, engine_tools, error_body, generation_settings,
                                  new_id, tool_calls_body)
from tunelab.infer.engine import Engine, RequestError

logger = logging.getLogger(__name__)
_warned: set[str] = set()
_GONE = object()


@dataclass(frozen=True)
class ApiSettings:
    model_name: str                 # the `model` clients must name
    api_key: str | None = None      # when set, clients must send `Authorization: Bearer <api_key>`
    max_waiting: int = 16           # requests that may wait for the engine; one more gets 429
    media_dir: Path | None = None   # the folder whose files file:// image and video URLs may name
    max_body_bytes: int = 8 * 2**20  # a larger request body gets 413 (images come base64-encoded in the body)
    body_timeout: float = 30.0      # seconds a request body may take to arrive whole; then 408


class EngineQueue:
    """Turns on the engine, one at a time, in arrival order (asyncio.Lock wakes its waiters first in, first out).

    Waiting here rather than on the engine's own lock keeps waiting requests off the worker threads, which are few.
    """

    def __init__(self, max_waiting: int) -> None:
        self.max_waiting, self.waiting = max_waiting, 0
        self._lock = asyncio.Lock()

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    @asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        if self._lock.locked() and self.waiting >= self.max_waiting:
            raise APIError(429, f"the server is busy: {self.waiting} requests are already waiting for the model; "
                                f"retry shortly", type="requests", code="rate_limit_exceeded",
                           headers={"Retry-After": "1"})
        self.waiting += 1
        try:
            await self._lock.acquire()
        finally:
            self.waiting -= 1
        try:
            yield
        finally:
            self._lock.release()


class ChatService:
    """What the routes do, on one engine behind one queue."""

    def __init__(self, engine: Engine, settings: ApiSettings) -> None:
        self.engine, self.settings = engine, settings
        self.queue = EngineQueue(settings.max_waiting)
        self.created = int(time.time())

    def check_model(self, model: str) -> None:
        if model != self.settings.model_name:
            raise APIError(404, f"The model {model!r} does not exist: this server serves "
                                f"{self.settings.model_name!r}", param="model", code="model_not_found")

    async def chat(self, request: Request, body: ChatCompletionRequest) -> Response:
        self.check_model(body.model)
        messages = engine_messages(body.messages, self.engine.media is not None, self.settings.media_dir)
        tools, settings = engine_tools(body), generation_settings(body)
        self._check_length(body, settings)
        self._warn_unenforced(body)
        if body.stream:
            events = self._events(request, body, messages, tools, settings)
            # Errors before the first token (a request the engine refuses, a full queue) are plain HTTP errors.
            if await anext(events, _GONE) is _GONE:
                return Response(status_code=499)
            return EventSourceResponse(events)
        async with self.queue.turn():
            if await request.is_disconnected():   # gave up while waiting: generate nothing for nobody
                return Response(status_code=499)
            replies = await self.engine.achat(messages, tools=tools, n=body.n, **settings)
        return JSONResponse(completion_body(body.model, replies, body.parallel_tool_calls))

    async def _events(self, request: Request, body: ChatCompletionRequest, messages: list[dict],
                      tools: list[dict] | None, settings: dict[str, Any]) -> AsyncIterator[str | None]:
        """None once the first piece of the reply is in hand, then the `data:` payloads (nothing at all when the
        client left while waiting). The choices of n > 1 stream one after another."""
        writer, prompt_tokens, completion_tokens = ChunkWriter(body.model, body.include_usage), 0, 0
        started = False
        async with self.queue.turn():
            if await request.is_disconnected():
                return
            for index in range(body.n):
                try:
                    async with aclosing(self.engine.astream(messages, tools=tools, **settings)) as deltas:
                        delta = await anext(deltas)
                        if not started:
                            started = True
                            yield None
                        yield writer.choice(index, {"role": "assistant", "content": ""})
                        shown = ""
                        while True:
                            if delta.text:
                                shown += delta.text
                                yield writer.choice(index, {"content": delta.text})
                            if delta.reply is not None:
                                break
                            delta = await anext(deltas)
                except Exception as err:
                    if not started:
                        raise
                    # The response has started: the error goes to the client as a last event, as OpenAI's do.
                    logger.exception("streamed completion failed")
                    yield json.dumps(error_body(f"internal error: {type(err).__name__}: {err}", "server_error"))
                    return
                reply, calls = delta.reply, calls_of(delta.reply, body.parallel_tool_calls)
                # Text held back as a possible tool call that turned out not to be one arrives with the reply.
                if not calls and reply.text.startswith(shown) and len(reply.text) > len(shown):
                    yield writer.choice(index, {"content": reply.text[len(shown):]})
                if calls:
                    yield writer.choice(index, {"tool_calls": [{"index": k, **call} for k, call
                                                               in enumerate(tool_calls_body(calls))]})
                yield writer.choice(index, {}, reply.finish_reason)
                prompt_tokens, completion_tokens = reply.prompt_tokens, completion_tokens + reply.completion_tokens
        if body.include_usage:
            yield writer.usage(prompt_tokens, completion_tokens)
        yield "[DONE]"

    async def score(self, body: ScoreRequest) -> dict[str, Any]:
        self.check_model(body.model)
        if not self.engine.is_reward_model:
            raise APIError(400, "this model is not a reward model: serve an rm stage's output with `stage: rm` to "
                                "score texts", param="model")
        if body.max_length is not None:
            raise APIError(400, f"`max_length` per request is not supported: texts are cut at the config's "
                                f"cutoff_len ({self.engine.config.cutoff_len} tokens)", param="max_length")
        async with self.queue.turn():
            scores = await self.engine.ascore(body.messages)
        return {"id": new_id("scoreval"), "object": "score.evaluation", "model": body.model, "scores": scores}

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self.model_card()]}

    def model_card(self) -> dict[str, Any]:
        return {"id": self.settings.model_name, "object": "model", "created": self.created, "owned_by": "tunelab"}

    def _check_length(self, body: ChatCompletionRequest, settings: dict[str, Any]) -> None:
        """Refuse a reply limit the context cannot hold before queueing (the engine checks prompt + limit)."""
        limit, context = settings.get("max_new_tokens"), self.engine.max_context
        if limit is not None and context is not None and limit >= context:
            param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
            raise APIError(400, f"`{param}` is {limit}, but the model's context holds {context} tokens in all "
                                f"(prompt and reply)", param=param)

    @staticmethod
    def _warn_unenforced(body: ChatCompletionRequest) -> None:
        unenforced = []
        if body.tool_choice and body.tool_choice not in ("none", "auto"):
            unenforced.append("tool_choice 'required' or a named function is not enforced: the model sees the tools "
                              "(only the named one) and may still answer in text")
        if any(tool.function.strict for tool in body.tools or []):
            unenforced.append("strict function schemas are not enforced: arguments are what the model writes")
        for message in unenforced:
            if message not in _warned:
                _warned.add(message)
                logger.warning(message)


def create_app(engine: Engine, settings: ApiSettings) -> FastAPI:
    """The app serving `engine` under `settings.model_name`."""
    service = ChatService(engine, settings)
    app = FastAPI(title="tunelab API", summary="OpenAI-compatible chat completions")
    _add_error_handlers(app)
    app.add_middleware(BodyLimits, max_bytes=settings.max_body_bytes, timeout=settings.body_timeout)

    async def check_key(request: Request) -> None:
        if settings.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), settings.api_key):
            raise APIError(401, "Incorrect or missing API key: send `Authorization: Bearer <API_KEY>`",
                           code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])

    @v1.get("/models")
    async def list_models() -> dict[str, Any]:
        return service.models()

    @v1.get("/models/{model:path}")
    async def get_model(model: str) -> dict[str, Any]:
        service.check_model(model)
        return service.model_card()

    @v1.post("/chat/completions")
    async def chat_completions(request: Request, body: ChatCompletionRequest) -> Response:
        check_unicode(await request.json())
        return await service.chat(request, body)

    @v1.post("/score/evaluation")
    async def score_evaluation(request: Request, body: ScoreRequest) -> dict[str, Any]:
        check_unicode(await request.json())
        return await service.score(body)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": settings.model_name, "busy": service.queue.busy,
                "waiting": service.queue.waiting}

    app.include_router(v1)
    app.state.service = service
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, err: RequestError) -> JSONResponse:
        return JSONResponse(error_body(str(err), "invalid_request_error"), status_code=400)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        problems = [(_param(problem), _message(problem)) for problem in err.errors()]
        message = "; ".join(f"{param}: {text}" if param else text for param, text in problems)
        return JSONResponse(error_body(message, "invalid_request_error", problems[0][0] or None), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(err.detail), "invalid_request_error"), status_code=err.status_code,
                            headers=err.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception) -> JSONResponse:
        logger.exception("request to %s failed", request.url.path)
        return JSONResponse(error_body(f"internal error: {type(err).__name__}: {err}", "server_error"),
                            status_code=500)


def _param(problem: dict) -> str:
    """`messages.0.role` for pydantic's ('body', 'messages', 0, 'role'); nothing for a body that is not JSON."""
    if problem["type"] == "json_invalid":
        return ""
    loc = problem["loc"]
    return ".".join(str(part) for part in (loc[1:] if loc[:1] == ("body",) else loc))


def _message(problem: dict) -> str:
    if problem["loc"] == ("body",) and problem["type"] in ("missing", "model_attributes_type"):
        # empty, not an object, or not sent as JSON (FastAPI then validates the bytes)
        return "the body must be a JSON object, sent with Content-Type: application/json"
    if problem["type"] == "extra_forbidden":
        return "unsupported parameter (tunelab does not implement it)"
    if problem["type"] == "value_error":
        return str(problem["ctx"]["error"])
    if problem["type"] == "json_invalid":
        return f"the body is not valid JSON ({problem['ctx']['error']})"
    return problem["msg"]
