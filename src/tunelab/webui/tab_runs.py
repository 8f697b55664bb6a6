"""The Runs tab: every run under the output root with its status, config and curves; pick two or more to overlay
their loss curves."""

from pathlib import Path
from typing import Any

import gradio as gr
import yaml

from tunelab.webui.board import Board
from tunelab.webui.locales import text
from tunelab.webui.runs import curves, find_runs, read_config

COLUMNS = ["run", "stage", "method", "status", "steps", "loss", "modified"]


def build(board: Board) -> None:
    refresh = board.t(gr.Button(text("refresh", "en"), elem_id="tl-runs-refresh"), "refresh", "value")
    table = board.t(gr.Dataframe(headers=COLUMNS, label=text("runs_table", "en"), elem_id="tl-runs-table",
                                 interactive=False), "runs_table")
    picked = board.t(gr.Dropdown(choices=[], multiselect=True, label=text("runs_pick", "en"),
                                 elem_id="tl-runs-pick"), "runs_pick")
    plot = board.curve_plot("loss_plot", "tl-runs-plot", height=320)
    config = board.t(gr.Code(language="yaml", label=text("runs_config", "en"), elem_id="tl-runs-config"),
                     "runs_config")

    def on_refresh() -> tuple[list[list[Any]], Any]:
        runs = find_runs(board.saves)
        rows = [run.row(board.saves) for run in runs]
        return rows or [[""] * len(COLUMNS)], gr.update(choices=[row[0] for row in rows])

    def on_pick(names: list[str]) -> tuple[Any, str]:
        folders = {name: _folder(board.saves, name) for name in names or []}
        shown = yaml.safe_dump(read_config(folders[names[0]]), sort_keys=False, allow_unicode=True) if names else ""
        return gr.update(value=curves(folders, "loss"), visible=True), shown

    refresh.click(on_refresh, None, [table, picked])
    # Hidden first, so that gradio draws the plot anew with the new runs' series (see Board.curve_plot).
    picked.change(lambda: gr.update(visible=False), None, plot).then(on_pick, picked, [plot, config])
    board.loaders.append((on_refresh, [], [table, picked]))


def _folder(root: Path, name: str) -> Path:
    path = Path(name)
    return path if path.is_absolute() else root / path
