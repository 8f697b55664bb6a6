"""`tunelab webchat CONFIG`: a chat page for one model in the browser, streamed, with the system prompt and the
main sampling settings at hand.

    tunelab webchat examples/quickstart_chat.yaml     # then open http://127.0.0.1:7860

Binds to 127.0.0.1 unless GRADIO_SERVER_NAME says otherwise (GRADIO_SERVER_PORT picks the port). gradio is the
optional extra `webui`: `pip install 'tunelab[webui]'`.
"""

import importlib.util
import os
from collections.abc import Iterator
from typing import Any

from tunelab.config import Config, ConfigError
from tunelab.infer.backends import build_engine
from tunelab.infer.engine import Engine, RequestError


#: Files uploaded with these endings are videos; every other file is read as an image.
VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".avi", ".mkv", ".m4v")


def media_part(path: str) -> dict:
    """An uploaded file as the engine's image or video part."""
    kind = "video" if path.lower().endswith(VIDEO_SUFFIXES) else "image"
    return {"type": kind, kind: path}


def engine_content(content: Any) -> str | list[dict]:
    """A gradio chat turn's content as the engine takes it: its text, or text, image and video parts.

    gradio gives content as a string, a file ({"path": ...}), or a list of parts ({"type": "text", "text": ...},
    {"type": "file", "file": {"path": ...}}), depending on its version and on how the turn was added."""
    parts = []
    for item in content if isinstance(content, list) else [content]:
        if isinstance(item, str):
            parts.append({"type": "text", "text": item})
        elif isinstance(item, dict) and item.get("type") == "text":
            parts.append({"type": "text", "text": item.get("text", "")})
        else:
            file = item.get("file", item) if isinstance(item, dict) else getattr(item, "file", item)
            path = file.get("path") if isinstance(file, dict) else getattr(file, "path", None)
            if path:
                parts.append(media_part(str(path)))
    if all(part["type"] == "text" for part in parts):
        return "".join(part["text"] for part in parts)
    return parts


def history_messages(history: list[dict]) -> list[dict]:
    """A gradio chat history as the engine's messages. A picture shown as a turn of its own joins the user's next
    turn (the engine, as a chat template, expects user and assistant to alternate)."""
    messages: list[dict] = []
    for turn in history:
        content = engine_content(turn["content"])
        if messages and turn["role"] == "user" and messages[-1]["role"] == "user":
            messages[-1]["content"] = _as_parts(messages[-1]["content"]) + _as_parts(content)
        else:
            messages.append({"role": turn["role"], "content": content})
    return messages


def _as_parts(content: str | list[dict]) -> list[dict]:
    return [{"type": "text", "text": content}] if isinstance(content, str) else content


def build_chat_page(engine: Engine) -> Any:
    """The page (a gradio ChatInterface); its API endpoint `/chat` takes (message, system, max_new_tokens,
    temperature, top_p) and streams the reply. For a vision-language model the message box takes image and video
    files too (the message is then {"text": ..., "files": [...]})."""
    import gradio as gr

    config = engine.config
    multimodal = engine.media is not None

    def respond(message: str | dict, history: list[dict], system: str, max_new_tokens: int, temperature: float,
                top_p: float) -> Iterator[str]:
        messages = history_messages(history)
        if isinstance(message, dict):   # the multimodal box
            files = [file.get("path") if isinstance(file, dict) else file for file in message.get("files", [])]
            message = [*map(media_part, files), {"type": "text", "text": message.get("text", "")}]
        messages.append({"role": "user", "content": message})
        text = ""
        try:
            for delta in engine.stream(messages, system or None, max_new_tokens=int(max_new_tokens),
                                       temperature=temperature, top_p=top_p):
                text += delta.text
                yield text
        except RequestError as err:
            raise gr.Error(str(err)) from None

    settings = [
        gr.Textbox(label="System prompt", value=config.default_system or ""),
        gr.Slider(1, max(config.max_new_tokens, 2048), value=config.max_new_tokens, step=1, label="Max new tokens"),
        gr.Slider(0.01, 2.0, value=config.temperature, step=0.01, label="Temperature"),
        gr.Slider(0.01, 1.0, value=config.top_p, step=0.01, label="Top-p"),
    ]
    sampling = "sampling" if config.do_sample else "greedy decoding (do_sample: false)"
    return gr.ChatInterface(respond, additional_inputs=settings, title=f"tunelab: {config.model_name_or_path}",
                            description=f"{sampling}; template {engine.template.name}"
                                        + ("; attach images or videos with the message" if multimodal else ""),
                            api_name="chat", multimodal=multimodal, analytics_enabled=False)


def run_webchat(config: Config) -> None:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    if importlib.util.find_spec("gradio") is None:
        raise ConfigError("`tunelab webchat` needs gradio: pip install 'tunelab[webui]'")
    page = build_chat_page(build_engine(config))
    page.queue().launch(server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        server_port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
