"""The Export tab: merge the top bar's adapters into the model and write it to `export_dir` (`tunelab export`, run
as a job); shows the files written."""

from pathlib import Path
from typing import Any

import gradio as gr

from tunelab.training.output_dir import RUN_CONFIG
from tunelab.webui import models
from tunelab.webui.board import REFRESH_SECONDS, Board, status_markdown
from tunelab.webui.locales import text
from tunelab.webui.runs import read_config
from tunelab.webui.tab_train import write_yaml


def build(board: Board) -> None:
    board.section("export", keys_per_row=4, open=True)
    export = board.t(gr.Button(text("export", "en"), variant="primary", elem_id="tl-export"), "export", "value")
    message = gr.Markdown(elem_id="tl-export-message")
    status = gr.Markdown(elem_id="tl-export-status")
    written = board.t(gr.Dataframe(headers=["file", "MB"], label=text("written", "en"), elem_id="tl-written"),
                      "written")

    def wire() -> None:
        def on_export(*args: Any) -> list[Any]:
            config, error, updates = board.checked(args, dataset=None, eval_dataset=None, val_size=None)
            if config is not None and not config.get("export_dir"):
                config, error = None, "`export_dir` is required: the folder the merged model is written to"
            if config is None:
                return [f"⚠ {error}", *updates]
            values = dict(zip(board.widgets, args))
            job_folder = Path(models.new_run_folder(board.saves, values["model_name_or_path"],
                                                    values["finetuning_type"], kind="export"))
            job_folder.mkdir(parents=True, exist_ok=True)
            write_yaml(job_folder / RUN_CONFIG, config)
            refusal = board.start("export", job_folder, ["export", str(job_folder / RUN_CONFIG)])
            return [f"⚠ {refusal}" if refusal else f"exporting to {config['export_dir']}", *updates]

        def on_tick(lang: str) -> list[Any]:
            job_status = board.status_of("export")
            if job_status is None:
                return [status_markdown(None, lang), gr.update()]
            target = Path(read_config(board.job.folder).get("export_dir", ""))
            files = sorted(p for p in target.rglob("*") if p.is_file()) if target.is_dir() else []
            rows = [[str(p.relative_to(target)), round(p.stat().st_size / 2**20, 2)] for p in files]
            return [status_markdown(job_status, lang), rows or gr.update()]

        export.click(on_export, board.inputs, [message, *board.widgets.values()])
        gr.Timer(REFRESH_SECONDS).tick(on_tick, board.lang, [status, written])
        board.loaders.append((on_tick, [board.lang], [status, written]))

    board.after_layout.append(wire)
