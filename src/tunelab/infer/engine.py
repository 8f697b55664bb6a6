"""The inference engine: the one interface the terminal chat, the API, the web chat and `ChatModel` talk to.

    engine = build_engine(config)      # infer/backends.py: infer_backend huggingface (default) or vllm
    [reply] = engine.chat([{"role": "user", "content": "Who are you?"}], temperature=0.2)
    for delta in engine.stream(messages, tools=tools):
        print(delta.text, end="")      # the last delta carries the finished Reply (tool calls, token counts)
    engine.score(["a conversation as text"])   # reward models (`stage: rm`)
    engine.chat([{"role": "user", "content": "What is this?"}], images=["cat.jpg"])   # vision-language models

A backend implements `_generate` and `_stream` on token ids and `score`; everything a front end relies on is here,
written once: messages in LLaMA-Factory's and OpenAI's shapes, the prompt rendered by the same template as training,
images and videos placed and expanded as in training (infer/media.py), request settings checked by name, stop
strings, and tool calls read out of the reply with the template's tool format
(while streaming, text that may open a tool call is held back until it is known not to be one).
"""

import asyncio
import json
import threading
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, fields
from typing import Any

from tunelab.config import Config
from tunelab.config.schema import GenerationOptions
from tunelab.data.formats import canonical_tool_calls
from tunelab.data.template import ToolFormat
from tunelab.data.validation import Invalid
from tunelab.infer.media import MediaRequestError, media_tokens, place_media, read_content


class RequestError(ValueError):
    """A request the engine cannot serve as asked (bad messages, unknown setting, too long); a front end's 4xx."""


@dataclass
class Prompt:
    """What a backend generates from: the prompt's token ids and, for a vision-language model, the other inputs of
    its forward pass (pixel values, grids, mm_token_type_ids) for one copy of the prompt."""

    ids: list[int]
    media_inputs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Reply:
    text: str                       # the reply, tool-call markup removed when calls were read out of it
    finish_reason: str              # "stop", "length" (max_new_tokens reached) or "tool_calls"
    prompt_tokens: int
    completion_tokens: int
    tool_calls: list[dict] = field(default_factory=list)   # {"name", "arguments": JSON text}


@dataclass
class Delta:
    """A piece of a streamed reply; the last one has `reply` set (its text is the whole visible reply)."""

    text: str
    reply: Reply | None = None


#: Settings a request may give on top of the config's generation keys.
REQUEST_ONLY_SETTINGS = ("stop", "presence_penalty", "frequency_penalty")
SETTINGS = tuple(f.name for f in fields(GenerationOptions)) + REQUEST_ONLY_SETTINGS

#: Role names accepted in messages -> the data layer's roles (LLaMA-Factory's ChatModel names them observation and
#: function; OpenAI's API says tool and an assistant message with `tool_calls`).
ROLES = {"user": "user", "assistant": "assistant", "tool": "tool", "observation": "tool", "tool_call": "tool_call",
         "function": "tool_call"}


def normalize_messages(messages: list[dict], system: str | None) -> tuple[str | None, list[dict], list, list]:
    """(system prompt, messages in the data layer's roles, images, videos); a leading system message becomes the
    system prompt, and content given as a list of parts becomes text with an <image> / <video> placeholder where each
    file goes (infer/media.py).

    An assistant message with OpenAI `tool_calls` becomes a tool_call turn, its calls written as training data writes
    them (`data.formats.canonical_tool_calls`).
    """
    if not isinstance(messages, list) or not messages:
        raise RequestError("`messages` must be a non-empty list")
    out: list[dict] = []
    images: list = []
    videos: list = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise RequestError(f"messages[{i}] must be an object with a `role`")
        role, content = message["role"], message.get("content")
        if role == "system":
            if i != 0:
                raise RequestError(f"messages[{i}]: a system message may only come first")
            system = content
            continue
        if role == "assistant" and message.get("tool_calls"):
            role, content = "tool_call", message["tool_calls"]
        if role not in ROLES:
            raise RequestError(f"messages[{i}]: unknown role {role!r}; expected system, user, assistant or tool")
        if ROLES[role] == "tool_call":
            try:
                content = canonical_tool_calls(content)
            except Invalid as err:
                raise RequestError(f"messages[{i}]: {err}") from None
        elif isinstance(content, list) and role == "user":
            try:
                content, message_images, message_videos = read_content(content, f"messages[{i}]")
            except MediaRequestError as err:
                raise RequestError(str(err)) from None
            images += message_images
            videos += message_videos
        elif not isinstance(content, str):
            raise RequestError(f"messages[{i}] ({role}): `content` must be a string"
                               + (" or, in a user message, a list of parts" if role == "user" else ""))
        out.append({"role": ROLES[role], "content": content})
    if not out:
        raise RequestError("`messages` holds no user message")
    if out[-1]["role"] not in ("user", "tool"):
        raise RequestError(f"the last message must be from the user or a tool result, not {out[-1]['role']}")
    if system is not None and not isinstance(system, str):
        raise RequestError("the system message's `content` must be a string")
    return system, out, images, videos


def _checked_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """Request settings with the types and ranges of their config keys (OpenAI's for the request-only ones)."""
    from tunelab.config.load import coerce_key

    checked = {}
    for key, value in settings.items():
        if key == "stop":
            stop = [value] if isinstance(value, str) else value
            if not isinstance(stop, list) or not all(isinstance(word, str) for word in stop):
                raise RequestError("`stop` must be a string or a list of strings")
            checked[key] = stop
        elif key in ("presence_penalty", "frequency_penalty"):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not -2 <= value <= 2:
                raise RequestError(f"`{key}` must be a number from -2 to 2, got {value!r}")
            checked[key] = float(value)
        else:
            try:
                checked[key] = coerce_key(key, value)
            except ValueError as err:
                raise RequestError(f"`{key}`: {err}") from None
    return checked


class ReplyText:
    """Assembles generated text into what a client sees: cut at the first stop string, tool calls read out.

    `feed` returns the text that can be shown now. A tail that may be the start of a stop string or of a tool call
    is held back until it is known; once a tool call opens, the rest is held for `finish` to parse.
    """

    def __init__(self, stop: list[str], tool_format: ToolFormat | None) -> None:
        self.stop = [word for word in stop if word]
        self.tool_format = tool_format
        opening = tool_format.call_opening.split() if tool_format else []
        self.call_marker = opening[0] if opening else None
        self.text, self.shown, self.stopped = "", 0, False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.text += piece
        for word in self.stop:
            if word in self.text:
                self.text, self.stopped = self.text[:self.text.index(word)], True
        end = len(self.text)
        if self.tool_format is not None:
            if self.call_marker is None:
                end = 0  # a format whose calls open with the function name (glm4): only the whole reply tells
            elif self.call_marker in self.text[self.shown:]:
                end = self.text.index(self.call_marker, self.shown)
        if not self.stopped:
            end = min(end, len(self.text) - self._partial_tail())
        visible, self.shown = self.text[self.shown:max(end, self.shown)], max(end, self.shown)
        return visible

    def _partial_tail(self) -> int:
        """Length of the longest end of the text that could begin a stop string or the tool-call marker."""
        words = self.stop + ([self.call_marker] if self.call_marker else [])
        return max((n for word in words for n in range(1, len(word)) if self.text.endswith(word[:n])), default=0)

    def finish(self) -> tuple[str, list[dict]]:
        """(the reply text, its tool calls)."""
        if self.tool_format is None:
            return self.text, []
        return self.tool_format.parse_calls(self.text)


class Engine(ABC):
    """A loaded model ready to chat (or score, for a reward model), whatever the backend."""

    def __init__(self, config: Config, tokenizer: Any, template: Any) -> None:
        self.config, self.tokenizer, self.template = config, tokenizer, template
        self.is_reward_model = config.stage == "rm"
        self.max_context: int | None = None   # the backend sets the model's longest prompt + reply
        from tunelab.data.media import load_media_processor

        self.media = load_media_processor(config, tokenizer)   # None for a text-only model
        # One generation at a time per engine: concurrent callers queue here (the API bounds the queue).
        self.lock = threading.Lock()

    # --- what front ends call ---

    def chat(self, messages: list[dict], system: str | None = None, tools: list[dict] | None = None, n: int = 1,
             images: list | None = None, videos: list | None = None, **settings: Any) -> list[Reply]:
        """`n` replies to the conversation. `settings`: generation keys (temperature, max_new_tokens, ...) and
        `stop`, `presence_penalty`, `frequency_penalty` for this request only. `images` (paths or PIL images) and
        `videos` (paths), for a vision-language model, go where the messages' placeholders are (infer/media.py);
        image and video parts inside the messages do the same."""
        prompt, tool_format, settings = self._prepare(messages, system, tools, images, videos, settings)
        replies = []
        with self.lock:
            generated = self._generate(prompt, n, settings)
        for text, tokens, hit_limit in generated:
            assembled = ReplyText(self._stop_words(settings), tool_format)
            assembled.feed(text)
            replies.append(self._reply(assembled, len(prompt.ids), tokens, hit_limit))
        return replies

    def stream(self, messages: list[dict], system: str | None = None, tools: list[dict] | None = None,
               images: list | None = None, videos: list | None = None, **settings: Any) -> Iterator[Delta]:
        """One reply as it is generated; the last Delta carries the finished Reply."""
        prompt, tool_format, settings = self._prepare(messages, system, tools, images, videos, settings)
        if settings.get("num_beams", self.config.num_beams) > 1:
            raise RequestError("beam search (num_beams > 1) cannot stream: its best reply is known only at the end")
        assembled = ReplyText(self._stop_words(settings), tool_format)
        with self.lock:
            pieces = self._stream(prompt, settings)
            try:
                for piece in pieces:
                    if isinstance(piece, str):
                        visible = assembled.feed(piece)
                        if visible:
                            yield Delta(visible)
                    else:
                        tokens, hit_limit = piece
                        yield Delta("", self._reply(assembled, len(prompt.ids), tokens, hit_limit))
            finally:
                pieces.close()

    def score(self, texts: list[str]) -> list[float]:
        """Reward scores of whole conversations rendered as text (reward models only)."""
        raise RequestError("this model is not a reward model (`stage: rm`): it cannot score texts")

    async def achat(self, *args: Any, **kwargs: Any) -> list[Reply]:
        return await asyncio.to_thread(self.chat, *args, **kwargs)

    async def ascore(self, texts: list[str]) -> list[float]:
        return await asyncio.to_thread(self.score, texts)

    async def astream(self, *args: Any, **kwargs: Any) -> AsyncIterator[Delta]:
        """`stream` on a worker thread, so an event loop keeps serving other clients meanwhile."""
        pieces = self.stream(*args, **kwargs)
        done, step = object(), None
        try:
            while True:
                # Shielded: a cancelled caller must not leave the generator mid-`next` on its thread, where it could
                # not be closed (and would keep the engine's lock until garbage collection).
                step = asyncio.ensure_future(asyncio.to_thread(next, pieces, done))
                delta = await asyncio.shield(step)
                if delta is done:
                    break
                yield delta
        finally:
            if step is not None and not step.done():
                await asyncio.wait([step])
            await asyncio.to_thread(pieces.close)

    # --- what a backend implements ---

    @abstractmethod
    def _generate(self, prompt: Prompt, n: int, settings: dict[str, Any]) -> list[tuple[str, int, bool]]:
        """n completions of the prompt: (text, generated token count, stopped by max_new_tokens)."""

    @abstractmethod
    def _stream(self, prompt: Prompt, settings: dict[str, Any]) -> Iterator[str | tuple[int, bool]]:
        """Text pieces as generated, then (generated token count, stopped by max_new_tokens). Closing the iterator
        early stops the generation."""

    # --- shared steps ---

    def _prepare(self, messages: list[dict], system: str | None, tools: list[dict] | None, images: list | None,
                 videos: list | None, settings: dict[str, Any]) -> tuple[Prompt, ToolFormat | None, dict[str, Any]]:
        if self.is_reward_model:
            raise RequestError("this model is a reward model (`stage: rm`): it scores conversations and cannot chat")
        unknown = sorted(set(settings) - set(SETTINGS))
        if unknown:
            raise RequestError(f"unknown generation setting(s) {', '.join(unknown)}; known are {', '.join(SETTINGS)}")
        settings = _checked_settings({key: value for key, value in settings.items() if value is not None})
        system, messages, part_images, part_videos = normalize_messages(messages, system)
        images, videos = [*part_images, *(images or [])], [*part_videos, *(videos or [])]
        messages, media_inputs = self._place_media(messages, images, videos)
        if tools and not self.template.supports_tools:
            raise RequestError(f"the chat template {self.template.name!r} cannot show tools to the model: set "
                               f"`tool_format` in the config (or a template whose format has tools)")
        from tunelab.data import TemplateError

        try:
            ids = self.template.encode_prompt(self.tokenizer, messages, system,
                                              json.dumps(tools, ensure_ascii=False) if tools else None)
        except TemplateError as err:
            raise RequestError(str(err)) from None
        max_new = settings.get("max_new_tokens", self.config.max_new_tokens)
        if self.max_context is not None and len(ids) + max_new > self.max_context:
            raise RequestError(f"the prompt ({len(ids)} tokens) plus max_new_tokens ({max_new}) exceeds the "
                               f"model's context of {self.max_context} tokens")
        tool_format = self.template.tools if tools else None
        return Prompt(ids, media_inputs(ids)), tool_format, settings

    def _place_media(self, messages: list[dict], images: list, videos: list) -> tuple[list[dict], Any]:
        """The messages with every image and video expanded to its vision block, and a function giving the model
        inputs of the prompt's ids (nothing for a text-only model; mm_token_type_ids at least for a vision one)."""
        if self.media is None:
            if images or videos:
                from tunelab.data.media.loading import not_a_vision_model

                raise RequestError(f"the request has {'images' if images else 'videos'}, but "
                                   f"{not_a_vision_model(self.config)}")
            return messages, lambda ids: {}
        try:
            messages = place_media(messages, images, videos)
            image_tokens, video_tokens = media_tokens(self.media, images, videos)
        except MediaRequestError as err:
            raise RequestError(str(err)) from None
        messages = self.media.expand(messages, image_tokens, video_tokens)

        def media_inputs(ids: list[int]) -> dict[str, Any]:
            import torch

            return self.media.batch_inputs([{"images": images, "videos": videos}], torch.tensor([ids]))

        return messages, media_inputs

    def _stop_words(self, settings: dict[str, Any]) -> list[str]:
        """The request's stop strings and the template's (an end of turn shows as text when special tokens are kept,
        or when it is not one token)."""
        return [*settings.get("stop", []), *self.template.stop_words]

    def _reply(self, assembled: ReplyText, prompt_tokens: int, tokens: int, hit_limit: bool) -> Reply:
        text, calls = assembled.finish()
        reason = "tool_calls" if calls else "length" if hit_limit and not assembled.stopped else "stop"
        return Reply(text=text, finish_reason=reason, prompt_tokens=prompt_tokens, completion_tokens=tokens,
                     tool_calls=calls)
