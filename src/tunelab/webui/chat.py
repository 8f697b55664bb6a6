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


def _text_of(content: Any) -> str:
    """gradio hands back earlier turns' content as a string or as a list of parts ({"type": "text", ...})."""
    if isinstance(content, str):
        return content
    parts = content if isinstance(content, list) else [content]
    return "".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in parts)


def build_chat_page(engine: Engine) -> Any:
    """The page (a gradio ChatInterface); its API endpoint `/chat` takes (message, system, max_new_tokens,
    temperature, top_p) and streams the reply."""
    import gradio as gr

    config = engine.config

    def respond(message: str, history: list[dict], system: str, max_new_tokens: int, temperature: float,
                top_p: float) -> Iterator[str]:
        messages = [{"role": turn["role"], "content": _text_of(turn["content"])} for turn in history]
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
                            description=f"{sampling}; template {engine.template.name}", api_name="chat",
                            analytics_enabled=False)


def run_webchat(config: Config) -> None:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    if importlib.util.find_spec("gradio") is None:
        raise ConfigError("`tunelab webchat` needs gradio: pip install 'tunelab[webui]'")
    page = build_chat_page(build_engine(config))
    page.queue().launch(server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        server_port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
