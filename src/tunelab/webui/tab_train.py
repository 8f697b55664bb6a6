"""The Train tab: stage, datasets and every training key; preview the data or the command; save and load a YAML;
Start, Resume and Abort a run, and watch it (progress, loss curves, log, results) from its own files."""

import html
import shlex
from pathlib import Path
from typing import Any

import gradio as gr
import yaml

from tunelab.config import ConfigError
from tunelab.config.load import read_config_file
from tunelab.config.stages import STAGE_SPECS
from tunelab.training.output_dir import RUN_CONFIG, last_checkpoint, run_finished
from tunelab.webui import models
from tunelab.webui.board import REFRESH_SECONDS, Board, progress_html, sections_of, status_markdown
from tunelab.webui.fields import TRAIN_HEAD_KEYS, widgets_from_config
from tunelab.webui.locales import text
from tunelab.webui.runs import curves, read_config, read_results


def build(board: Board) -> None:
    with gr.Row():
        board.widget("stage", scale=1)
        dataset_dir = board.widget("dataset_dir", scale=1)
        dataset = board.widget("dataset", scale=3)
    dataset_error = gr.Markdown(elem_id="tl-dataset-error")
    head = [key for key in TRAIN_HEAD_KEYS if key not in board.widgets and key != "output_dir"]
    for start in range(0, len(head), 6):
        with gr.Row():
            for key in head[start:start + 6]:
                board.widget(key)
    output_dir = board.widget("output_dir")
    for section in sections_of("train"):
        if section != "head":
            board.section(section, open=section == "lora")
    board.more_keys = board.t(gr.Textbox(label=text("more_keys", "en"), lines=2, elem_id="tl-more-keys",
                                         placeholder="weight_decay: 0.01"), "more_keys")
    with gr.Row():
        preview_data = board.t(gr.Button(text("preview_data", "en"), elem_id="tl-preview-data"), "preview_data",
                               "value")
        preview_command = board.t(gr.Button(text("preview_command", "en"), elem_id="tl-preview-command"),
                                  "preview_command", "value")
        config_path = board.t(gr.Textbox(label=text("config_path", "en"), elem_id="tl-config-path", scale=2),
                              "config_path")
        save = board.t(gr.Button(text("save", "en"), elem_id="tl-save"), "save", "value")
        load = board.t(gr.Button(text("load", "en"), elem_id="tl-load"), "load", "value")
    preview = gr.HTML(elem_id="tl-preview", elem_classes=["tl-preview"])
    with gr.Row():
        start = board.t(gr.Button(text("start", "en"), variant="primary", elem_id="tl-start"), "start", "value")
        resume = board.t(gr.Button(text("resume", "en"), elem_id="tl-resume"), "resume", "value")
        abort = board.t(gr.Button(text("abort", "en"), variant="stop", elem_id="tl-abort"), "abort", "value")
    message = gr.Markdown(elem_id="tl-message")
    status = gr.Markdown(elem_id="tl-status")
    progress = gr.HTML(progress_html(None), elem_id="tl-progress")
    with gr.Row():
        loss_plot = board.curve_plot("loss_plot", "tl-loss-plot")
        metric_plot = board.curve_plot("metric_plot", "tl-metric-plot")
    results = board.t(gr.JSON(label=text("results", "en"), elem_id="tl-results"), "results")
    log = board.t(gr.Textbox(label=text("log", "en"), lines=12, max_lines=12, autoscroll=True, elem_id="tl-log"),
                  "log")

    def wire() -> None:
        """Run once every tab is laid out, so `board.inputs` holds every config widget."""
        marks = list(board.widgets.values())

        def on_dataset_dir(folder: str) -> tuple[Any, str]:
            choices, error = board.dataset_choices(folder)
            return gr.update(choices=choices), error

        dataset_dir.change(on_dataset_dir, dataset_dir, [dataset, dataset_error])
        board.loaders.append((on_dataset_dir, [dataset_dir], [dataset, dataset_error]))

        def new_output_dir(model: str, method: str) -> str:
            return models.new_run_folder(board.saves, model, method)

        method_inputs = [board.widgets["model_name_or_path"], board.widgets["finetuning_type"]]
        for widget in method_inputs:
            widget.input(new_output_dir, method_inputs, output_dir)

        def on_open(model: str, method: str) -> list[Any]:
            """A page opened while the board has a run shows that run's settings; otherwise a fresh output_dir."""
            if board.job is not None and board.job_kind == "train":
                return form_of(board, read_config(board.job.folder))
            return [gr.update() if key != "output_dir" else new_output_dir(model, method) for key in board.widgets] \
                + [gr.update()]

        board.loaders.insert(0, (on_open, method_inputs, board.inputs))

        def on_start(*args: Any) -> list[Any]:
            config, error, updates = board.checked(args, do_train=True)
            if config is None:
                return [f"⚠ {error}", *updates]
            refusal = board.refuse_if_busy()
            if refusal:
                return [f"⚠ {refusal}", *updates]
            folder = Path(config["output_dir"])
            if folder.is_dir() and any(folder.iterdir()) and not config.get("overwrite_output_dir"):
                return [f"⚠ `output_dir` {folder} already holds files: press Resume to continue its run, choose "
                        f"another `output_dir`, or set `overwrite_output_dir`", *updates]
            folder.mkdir(parents=True, exist_ok=True)
            write_yaml(folder / RUN_CONFIG, config)
            refusal = board.start("train", folder, ["train", str(folder / RUN_CONFIG)])
            return [f"⚠ {refusal}" if refusal else f"started: `tunelab train {folder / RUN_CONFIG}`", *updates]

        def on_resume(*args: Any) -> str:
            try:
                folder = Path(board.config_of(args).get("output_dir") or "")
            except ConfigError as err:
                return f"⚠ {err}"
            if not (folder / RUN_CONFIG).exists():
                return f"⚠ `output_dir` {folder} holds no run started from the board ({RUN_CONFIG})"
            if run_finished(folder):
                return f"⚠ the run in {folder} has finished; there is nothing to resume"
            checkpoint = last_checkpoint(folder)
            refusal = board.start("train", folder, ["train", str(folder / RUN_CONFIG)])
            if refusal:
                return f"⚠ {refusal}"
            # Without a complete checkpoint `tunelab train` starts the run over by itself.
            return f"resuming from {checkpoint.name}" if checkpoint else "no checkpoint was saved yet: starting over"

        def on_abort() -> str:
            if board.job is None or not board.job.is_running():
                return "no job is running"
            board.job.abort()
            return f"aborted the {board.job_kind} job in {board.job.folder}"

        def on_preview_data(*args: Any) -> list[Any]:
            config, error, updates = board.checked(args)
            if config is None:
                return [f"<p>⚠ {html.escape(error)}</p>", *updates]
            return [render_preview(config), *updates]

        def on_preview_command(*args: Any) -> str:
            try:
                config = {**board.config_of(args), "do_train": True}
            except ConfigError as err:
                return f"<p>⚠ {html.escape(str(err))}</p>"
            listing = yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
            return (f"<pre>{html.escape(listing)}</pre><p>The same run from the command line:</p>"
                    f"<pre>{html.escape(command_line(config))}</pre>")

        def on_save(path: str, *args: Any) -> str:
            if not path:
                return "⚠ name the .yaml file to save to"
            target = Path(path)
            if target.exists():
                return f"⚠ {target} exists; choose another name (the board never overwrites a file)"
            try:
                config = {**board.config_of(args), "do_train": True}
            except ConfigError as err:
                return f"⚠ {err}"
            target.parent.mkdir(parents=True, exist_ok=True)
            write_yaml(target, config)
            return f"saved {target}: run it with `tunelab train {target}`"

        def on_load(path: str) -> list[Any]:
            try:
                config = read_config_file(Path(path))
            except ConfigError as err:
                return [f"⚠ {err}", *[gr.update() for _ in board.inputs]]
            return [f"loaded {path}", *form_of(board, config)]

        def on_tick(lang: str) -> list[Any]:
            job_status = board.status_of("train")
            if job_status is None:
                return [status_markdown(None, lang), progress_html(None), gr.update(), gr.update(), gr.update(),
                        gr.update()]
            folder = board.job.folder
            stage = STAGE_SPECS.get(str(read_config(folder).get("stage", "sft")))
            metric = stage.metric if stage else None
            return [status_markdown(job_status, lang), progress_html(job_status),
                    curves({folder.name: folder}, "loss"),
                    curves({folder.name: folder}, metric) if metric else gr.update(),
                    read_results(folder) or None, job_status.log_tail]

        start.click(on_start, board.inputs, [message, *marks])
        resume.click(on_resume, board.inputs, message)
        abort.click(on_abort, None, message)
        preview_data.click(on_preview_data, board.inputs, [preview, *marks])
        preview_command.click(on_preview_command, board.inputs, preview)
        save.click(on_save, [config_path, *board.inputs], message)
        load.click(on_load, config_path, [message, *board.inputs])
        monitor = [status, progress, loss_plot, metric_plot, results, log]
        gr.Timer(REFRESH_SECONDS).tick(on_tick, board.lang, monitor)
        board.loaders.append((on_tick, [board.lang], monitor))


    board.after_layout.append(wire)

def form_of(board: Board, config: dict[str, Any]) -> list[Any]:
    """Values for `board.inputs` showing a config: every widget, and the keys without one under `more keys`."""
    values, rest = widgets_from_config(config)
    more = yaml.safe_dump(rest, sort_keys=False, allow_unicode=True) if rest else ""
    return [*(values[key] for key in board.widgets), more]


def write_yaml(path: Path, config: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")


def command_line(config: dict[str, Any]) -> str:
    """`tunelab train --key value ...`: the config as command-line arguments, one key per line."""
    parts = ["tunelab train"]
    for key, value in config.items():
        if isinstance(value, list):
            value = ",".join(str(v) for v in value)
        elif isinstance(value, bool):
            value = str(value).lower()
        elif isinstance(value, dict):
            value = yaml.safe_dump(value, default_flow_style=True).strip()
        parts.append(f"--{key} {shlex.quote(str(value))}")
    return " \\\n    ".join(parts)


def render_preview(config: dict[str, Any]) -> str:
    """`tunelab data preview` as HTML: the trained tokens marked, then the statistics per dataset."""
    from tunelab.config import load_config
    from tunelab.data import prepare_template, preview
    from tunelab.model import load_tokenizer

    try:
        checked = load_config(config)
        tokenizer = load_tokenizer(checked)
        shown = preview(checked, tokenizer, prepare_template(checked, tokenizer), 3, color=False)
    except ConfigError as err:
        return f"<p>⚠ {html.escape(str(err))}</p>"
    marked = html.escape(shown).replace("⟦", "<mark>").replace("⟧", "</mark>")
    return f"<pre>{marked}</pre>"
