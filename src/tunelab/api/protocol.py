"""OpenAI's chat-completions protocol as `tunelab api` serves it: the request models, their translation into an
engine call, the response bodies and the error shape.

Requests are checked as strictly as OpenAI checks them: a value of the wrong type is refused rather than coerced
("0.7" is not a number), and a parameter tunelab does not implement (`seed`, `logit_bias`, `response_format`, ...)
is refused by name rather than ignored. `null` counts as not given, which is how clients send what they leave unset.

    model                     the served name (API_MODEL_NAME; default: the config's model_name_or_path)
    messages                  an optional system (or developer) message first, then user, assistant and tool
                              messages; an assistant message with `tool_calls` is followed by one tool message per
                              call, matched by `tool_call_id` (several in a row: parallel results)
    content                   a string or a list of parts; text parts are joined with newlines; in user messages
                              to a vision-language model, `image_url` parts (data URLs; file:// under the
                              server's API_MEDIA_DIR) and `video_url` parts (file:// only), see media.py
    max_completion_tokens     the reply's token limit (`max_tokens`, its older name, when it is absent); default:
                              the config's max_new_tokens
    temperature               0 to 2; below 1e-5 decodes greedily; absent: the config's do_sample and temperature
    top_p, stop, n            as OpenAI's; `n` replies also when streaming (the choices stream one after another)
    presence_penalty,         -2 to 2, OpenAI's additive penalties on the logits of tokens the reply already used
    frequency_penalty         (once per used token, and per use); the prompt does not count
    tools, tool_choice        "auto" (default) shows the tools; "none" hides them; "required" and a named function
                              (then only that tool is shown) cannot be enforced: the model may answer in text, and
                              the server log says so once
    parallel_tool_calls       false keeps only a reply's first call
    stream, stream_options    server-sent chunks ending in `data: [DONE]`; `include_usage` adds a usage chunk
    logprobs                  false only;  user, name: accepted and unused
"""

import json
import time
import uuid
from typing import Any, Literal

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tunelab.api.media import MediaURLError, media_from_url
from tunelab.infer.engine import Reply


class APIError(Exception):
    """An HTTP error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _null_is_absent(cls, data: Any) -> Any:
        return {key: value for key, value in data.items() if value is not None} if isinstance(data, dict) else data


class FunctionCall(_Strict):
    name: str
    arguments: str   # JSON text, as OpenAI sends it


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any = None   # a string or a list of parts: checked below, so an error names the part at fault
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @field_validator("content")
    @classmethod
    def _content(cls, value: Any) -> str | list[dict] | None:
        if value is None or isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise ValueError("must be a string or a list of content parts")
        for j, part in enumerate(value):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                continue
            if kind in ("image_url", "video_url") and isinstance(part.get(kind), dict) \
                    and isinstance(part[kind].get("url"), str):
                continue
            raise ValueError(f"part {j} must be {{\"type\": \"text\", \"text\": string}} or "
                             f"{{\"type\": \"image_url\", \"image_url\": {{\"url\": string}}}} (or video_url)")
        return value


class FunctionSpec(_Strict):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionSpec


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(_Strict):
    model: str
    messages: list[Message] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Any = None   # "none", "auto", "required" or {"type": "function", "function": {"name": ...}}
    parallel_tool_calls: bool = True
    n: int = Field(1, ge=1, le=16)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: Any = None   # a string or a list of up to 4
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: Literal[False] = False
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: Any) -> list[str]:
        stop = [value] if isinstance(value, str) else value
        if not isinstance(stop, list) or not all(isinstance(word, str) for word in stop) or len(stop) > 4:
            raise ValueError("must be a string or a list of up to 4 strings")
        return stop

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, value: Any) -> str:
        """The choice as a mode, or the name of the one function to call."""
        if value in ("none", "auto", "required"):
            return value
        function = value.get("function") if isinstance(value, dict) and value.get("type") == "function" else None
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            return "function:" + function["name"]
        raise ValueError('must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}')

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ScoreRequest(_Strict):
    """LLaMA-Factory's reward-model endpoint: whole conversations as texts in, one score each out."""

    model: str
    messages: list[str] = Field(min_length=1)
    max_length: int | None = Field(None, ge=1)


# --- request -> engine call ---

def engine_messages(messages: list[Message], takes_media: bool = False, media_dir: Path | None = None) -> list[dict]:
    """The engine's message dicts; refuses what the engine cannot take and OpenAI would not either (a tool result
    that answers no call, a call left without its result, media outside user messages or from where the server
    reads nothing: media.py), or media for a text-only model (not `takes_media`). `media_dir`: the folder file:// URLs
    may name (API_MEDIA_DIR)."""
    out, pending = [], []   # pending: ids of the last assistant message's calls not answered yet
    for i, message in enumerate(messages):
        if message.role == "tool":
            if not pending:
                raise APIError(400, f"messages.{i}: a tool message must answer a tool call of the assistant "
                                    f"message before it", param=f"messages.{i}.role")
            answered = message.tool_call_id or pending[0]
            if answered not in pending:
                raise APIError(400, f"messages.{i}: tool_call_id {answered!r} answers none of the calls "
                                    f"{pending} of the assistant message before it",
                               param=f"messages.{i}.tool_call_id")
            pending.remove(answered)
        elif pending:
            raise APIError(400, f"messages.{i}: the tool calls {pending} have no tool message with their result",
                           param=f"messages.{i}.role")
        if message.role == "assistant" and message.tool_calls:
            pending = [call.id for call in message.tool_calls]
            out.append({"role": "assistant", "tool_calls": [call.model_dump() for call in message.tool_calls]})
            continue
        if message.content is None:
            raise APIError(400, f"messages.{i}: this {message.role} message needs `content`",
                           param=f"messages.{i}.content")
        role = "system" if message.role == "developer" else message.role
        out.append({"role": role, "content": _content(message.content, i, role, takes_media, media_dir)})
    if pending:
        raise APIError(400, f"the tool calls {pending} of the last message have no tool message with their result",
                       param="messages")
    return out


def _content(content: str | list[dict], i: int, role: str, takes_media: bool,
             media_dir: Path | None) -> str | list[dict]:
    """A string, or the engine's parts: text, and for a user message images and videos read by media.py."""
    if isinstance(content, str):
        return content
    parts: list[dict] = []
    for j, part in enumerate(content):
        if part["type"] == "text":
            parts.append(part)
            continue
        kind = part["type"].removesuffix("_url")
        if not takes_media or role != "user":
            why = "this model takes no images or videos (it is not a vision-language model)" if not takes_media \
                else f"only user messages may hold {kind}s"
            raise APIError(400, f"messages.{i}.content.{j}: {why}", param=f"messages.{i}.content.{j}")
        try:
            parts.append({"type": kind, kind: media_from_url(part[part["type"]]["url"], kind, media_dir)})
        except MediaURLError as err:
            raise APIError(400, f"messages.{i}.content.{j}: {err}", param=f"messages.{i}.content.{j}") from None
    if role != "user":
        return "\n".join(part["text"] for part in parts)
    return parts


def engine_tools(request: ChatCompletionRequest) -> list[dict] | None:
    """The tools the model is shown, as `tool_choice` asks."""
    if request.tool_choice is not None and not request.tools:
        raise APIError(400, "`tool_choice` needs `tools`", param="tool_choice")
    if not request.tools or request.tool_choice == "none":
        return None
    tools = [tool.model_dump(exclude_none=True) for tool in request.tools]
    for tool in tools:
        tool["function"].pop("strict", None)   # an instruction to OpenAI's server, not part of what the model sees
    if request.tool_choice and request.tool_choice.startswith("function:"):
        name = request.tool_choice.removeprefix("function:")
        tools = [tool for tool in tools if tool["function"]["name"] == name]
        if not tools:
            raise APIError(400, f"`tool_choice` names the function {name!r}, which is not in `tools`",
                           param="tool_choice")
    return tools


def generation_settings(request: ChatCompletionRequest) -> dict[str, Any]:
    """The engine settings a request gives; what it leaves out keeps the config's value."""
    settings: dict[str, Any] = {}
    if request.temperature is not None:
        # Sampling at a temperature this close to 0 divides the logits into infinities (vLLM draws the line there too).
        settings["do_sample"] = request.temperature >= 1e-5
        if settings["do_sample"]:
            settings["temperature"] = request.temperature
    if request.top_p is not None:
        settings["top_p"] = request.top_p
    limit = request.max_completion_tokens or request.max_tokens
    if limit is not None:
        settings["max_new_tokens"] = limit
    if request.stop:
        settings["stop"] = request.stop
    for key in ("presence_penalty", "frequency_penalty"):
        if getattr(request, key):
            settings[key] = getattr(request, key)
    return settings


# --- responses ---

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def tool_calls_body(calls: list[dict]) -> list[dict]:
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": call["name"], "arguments": call["arguments"]}} for call in calls]


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def calls_of(reply: Reply, parallel: bool) -> list[dict]:
    return reply.tool_calls if parallel else reply.tool_calls[:1]


def completion_body(model: str, replies: list[Reply], parallel_tool_calls: bool) -> dict[str, Any]:
    choices = []
    for index, reply in enumerate(replies):
        calls = calls_of(reply, parallel_tool_calls)
        message: dict[str, Any] = {"role": "assistant", "content": reply.text if reply.text or not calls else None}
        if calls:
            message["tool_calls"] = tool_calls_body(calls)
        choices.append({"index": index, "message": message, "finish_reason": reply.finish_reason, "logprobs": None})
    return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices,
            "usage": usage_body(replies[0].prompt_tokens, sum(reply.completion_tokens for reply in replies))}


class ChunkWriter:
    """The `data:` payloads of one streamed completion (all chunks share an id and a creation time)."""

    def __init__(self, model: str, include_usage: bool) -> None:
        self.head = {"id": new_id("chatcmpl"), "object": "chat.completion.chunk", "created": int(time.time()),
                     "model": model}
        self.include_usage = include_usage

    def choice(self, index: int, delta: dict[str, Any], finish_reason: str | None = None) -> str:
        chunk = {**self.head, "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason,
                                           "logprobs": None}]}
        if self.include_usage:
            chunk["usage"] = None   # as OpenAI: null on every chunk but the last
        return json.dumps(chunk, ensure_ascii=False)

    def usage(self, prompt_tokens: int, completion_tokens: int) -> str:
        return json.dumps({**self.head, "choices": [], "usage": usage_body(prompt_tokens, completion_tokens)})
