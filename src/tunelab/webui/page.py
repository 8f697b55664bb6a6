"""The whole page: the title and language, the top bar, then each tab module's part, wired to the board.

    demo = build_board(Path("saves"))

Tabs are modules handed the `Board`; this is the one module that imports them all, so none of them imports it back.
"""

from pathlib import Path
from typing import Any

import gradio as gr

from tunelab.webui import models, tab_chat, tab_evaluate, tab_export, tab_runs, tab_train
from tunelab.webui.board import Board
from tunelab.webui.fields import FIELDS
from tunelab.webui.locales import LANGUAGES, key_text, text

#: The tabs in page order: their text id and the module that builds them.
TABS = (("train", tab_train), ("evaluate", tab_evaluate), ("chat", tab_chat), ("export", tab_export),
        ("runs", tab_runs))


def build_board(saves: Path) -> gr.Blocks:
    """The whole page."""
    board = Board(saves)
    with gr.Blocks(title="tunelab board", analytics_enabled=False) as demo:
        with gr.Row():
            board.t(gr.Markdown(f"## {text('title', 'en')}"), "title", "value")
            board.lang = gr.Dropdown(choices=[(name, code) for code, name in LANGUAGES.items()], value="en",
                                     label=text("lang", "en"), elem_id="tl-lang", scale=0, min_width=140)
            board.t(board.lang, "lang")
        build_top_bar(board)
        tabs = {}
        for name, module in TABS:
            with gr.Tab(text(f"tab_{name}", "en"), id=name, elem_id=f"tl-tab-{name}") as tabs[name]:
                board.t(tabs[name], f"tab_{name}")
                module.build(board)
        missing = [key for key in FIELDS if key not in board.widgets]
        assert not missing, f"config keys without a place on the board: {missing}"  # see fields.SECTION_TAB
        for wire in board.after_layout:
            wire()
        for function, inputs, outputs in board.loaders:
            demo.load(function, inputs, outputs)
        board.lang.change(lambda lang: relabel(board, lang), board.lang,
                          [*board.widgets.values(), *(c for c, _, _ in board.translated)])
    return demo


def relabel(board: Board, lang: str) -> list[Any]:
    updates = []
    for key in board.widgets:
        label, info = key_text(key, FIELDS[key].help, lang)
        updates.append(gr.update(label=label, info=info))
    for component, text_id, attribute in board.translated:
        value = text(text_id, lang)
        if text_id == "title":
            value = f"## {value}"
        updates.append(gr.update(**{attribute: value}))
    return updates


def build_top_bar(board: Board) -> None:
    """Language is beside the title; here: the model, its adapters, the method, quantization and the template."""
    with board.t(gr.Accordion(text("sec_top", "en"), open=True), "sec_top"):
        with gr.Row():
            model = board.widget("model_name_or_path", value=models.KNOWN_MODELS[0], scale=3)
            adapters = board.widget("adapter_name_or_path", scale=3)
            board.widget("finetuning_type", scale=1)
            board.widget("quantization_bit", scale=1)
            template = board.widget("template", value=models.suggest_template(models.KNOWN_MODELS[0]), scale=1)
            refresh = board.t(gr.Button(text("refresh", "en"), elem_id="tl-refresh", scale=0, min_width=100),
                              "refresh", "value")

    def on_model(model_name: str) -> tuple[Any, Any]:
        return (gr.update(value=models.suggest_template(model_name)),
                gr.update(choices=models.adapters_of(board.saves, model_name), value=[]))

    model.input(on_model, model, [template, adapters])
    refresh.click(lambda m: gr.update(choices=models.adapters_of(board.saves, m)), model, adapters)
