"""The Chat tab: load the top bar's model with its adapters in this process, and chat with it (streamed), with a
system prompt, tools and the generation settings of the seed guide's 生成/推理配置 panel."""

import gc
import inspect
import json
from collections.abc import Iterator
from typing import Any

import gradio as gr

from tunelab.config import ConfigError, load_config
from tunelab.config.schema import GenerationOptions
from tunelab.webui.board import Board
from tunelab.webui.chat import history_messages
from tunelab.webui.fields import FIELDS
from tunelab.webui.locales import text

#: gradio 5 needs `type="messages"` for role/content history; gradio 6 knows no other kind and dropped the argument.
MESSAGES_FORMAT = {"type": "messages"} if "type" in inspect.signature(gr.Chatbot).parameters else {}
GENERATION_KEYS = tuple(f.name for f in GenerationOptions.__dataclass_fields__.values())


def build(board: Board) -> None:
    with gr.Row():
        load = board.t(gr.Button(text("load_model", "en"), variant="primary", elem_id="tl-load-model"),
                       "load_model", "value")
        unload = board.t(gr.Button(text("unload_model", "en"), elem_id="tl-unload-model"), "unload_model", "value")
    info = gr.Markdown(elem_id="tl-chat-info")
    with gr.Row():
        with gr.Column(scale=3):
            chatbot = gr.Chatbot(elem_id="tl-chatbot", height=420, **MESSAGES_FORMAT)
            with gr.Row():
                message = board.t(gr.Textbox(label=text("message", "en"), elem_id="tl-message-box", lines=2,
                                             scale=3), "message")
                image = board.t(gr.Image(label=text("image", "en"), type="filepath", sources=["upload"], height=120,
                                         elem_id="tl-chat-image", scale=1), "image")
            with gr.Row():
                send = board.t(gr.Button(text("send", "en"), variant="primary", elem_id="tl-send"), "send", "value")
                clear = board.t(gr.Button(text("clear_history", "en"), elem_id="tl-clear"), "clear_history", "value")
        with gr.Column(scale=2):
            system = board.t(gr.Textbox(label=text("system_prompt", "en"), lines=2, elem_id="tl-system"),
                             "system_prompt")
            tools = board.t(gr.Textbox(label=text("tools", "en"), lines=3, elem_id="tl-tools",
                                       placeholder='[{"type": "function", "function": {"name": "...", ...}}]'),
                            "tools")
            board.section("generation", keys_per_row=2, open=True)

    def wire() -> None:
        def on_load(*args: Any) -> str:
            try:
                config = load_config({**board.config_of(args), "do_train": False})
                from tunelab.infer.backends import build_engine

                board.engine = None
                gc.collect()
                board.engine = build_engine(config)
            except ConfigError as err:
                return f"⚠ {err}"
            adapters = ", ".join(config.adapter_name_or_path or []) or "none"
            return (f"loaded {config.model_name_or_path} · adapters: {adapters} · "
                    f"template: {board.engine.template.name}")

        def on_unload() -> str:
            board.engine = None
            gc.collect()
            return "model unloaded"

        def on_send(query: str, image_path: str | None, history: list[dict], system_prompt: str, tools_json: str,
                    *generation: Any) -> Iterator[tuple[list[dict], str, None]]:
            if board.engine is None:
                raise gr.Error("load a model first (Load model)")
            try:
                tool_list = json.loads(tools_json) if tools_json.strip() else None
            except json.JSONDecodeError as err:
                raise gr.Error(f"tools: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
            try:
                settings = {key: FIELDS[key].from_widget(value) for key, value in zip(GENERATION_KEYS, generation)}
            except ValueError as err:
                raise gr.Error(str(err)) from None
            messages = history_messages(history)
            if image_path:
                messages.append({"role": "user", "content": [{"type": "image", "image": image_path},
                                                             {"type": "text", "text": query}]})
                # The chat shows the picture as a turn of its own, then the text.
                shown = [*history, {"role": "user", "content": {"path": image_path}},
                         {"role": "user", "content": query}, {"role": "assistant", "content": ""}]
            else:
                messages.append({"role": "user", "content": query})
                shown = [*history, {"role": "user", "content": query}, {"role": "assistant", "content": ""}]
            from tunelab.infer.engine import RequestError

            try:
                for delta in board.engine.stream(messages, system_prompt or None, tool_list,
                                                 **{k: v for k, v in settings.items() if v is not None}):
                    shown[-1]["content"] += delta.text
                    if delta.reply is not None and delta.reply.tool_calls:
                        shown[-1]["content"] += "\n" + json.dumps(delta.reply.tool_calls, ensure_ascii=False)
                    yield shown, "", None
            except RequestError as err:
                raise gr.Error(str(err)) from None

        generation = [board.widgets[key] for key in GENERATION_KEYS]
        load.click(on_load, board.inputs, info)
        unload.click(on_unload, None, info)
        for trigger in (send.click, message.submit):
            trigger(on_send, [message, image, chatbot, system, tools, *generation], [chatbot, message, image])
        clear.click(lambda: ([], "", None), None, [chatbot, message, image])

    board.after_layout.append(wire)
