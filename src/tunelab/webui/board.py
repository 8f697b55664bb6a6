"""The board: one gradio page whose widgets are the config schema's keys, and the job it runs.

    demo = build_board(Path("saves"))     # page.py lays it out; `tunelab webui` launches it (app.py)

`Board` holds the widgets (one per config key, made from `fields.FIELDS`), the texts that change with the language,
and the board's one job. Each tab is a module (`tab_train.py`, `tab_evaluate.py`, `tab_chat.py`, `tab_export.py`,
`tab_runs.py`) with a `build(board)` that lays out its part of the page and wires its buttons.
"""

import threading
from pathlib import Path
from typing import Any

import gradio as gr
import yaml

from tunelab.config import ConfigError
from tunelab.data.registry import read_dataset_info
from tunelab.data.spec import DataError
from tunelab.webui import models
from tunelab.webui.fields import FIELDS, SECTION_TAB, config_from_widgets, keys_named, validate
from tunelab.webui.jobs import Job, JobStatus, start_job
from tunelab.webui.locales import key_text, text

#: How often the page reads the running job's files, in seconds.
REFRESH_SECONDS = 2.0
CSS = """
.tl-invalid { border: 2px solid #d33 !important; border-radius: 8px; }
.tl-invalid .info, .tl-invalid span[data-testid="block-info"] + div { color: #d33 !important; }
#tl-progress .bar { height: 14px; background: #e5e7eb; border-radius: 7px; overflow: hidden; }
#tl-progress .bar > div { height: 100%; background: #f97316; }
.tl-preview mark { background: #bbf7d0; }
.tl-preview pre { white-space: pre-wrap; }
.tl-plot svg { overflow: visible; }
.tl-plot { padding-bottom: 48px !important; }
"""


class Board:
    """The page's shared parts: widgets by config key, translated texts, and the one job at a time."""

    def __init__(self, saves: Path) -> None:
        self.saves = Path(saves)
        self.widgets: dict[str, Any] = {}
        self.more_keys: Any = None
        self.lang: Any = None
        #: (component, text id, attribute): what the language switch relabels.
        self.translated: list[tuple[Any, str, str]] = []
        self.job: Job | None = None
        self.job_kind = ""
        self.job_lock = threading.Lock()
        #: The Chat tab's model, loaded in this process (the only tab that loads torch here).
        self.engine: Any = None
        self.shown_errors: set[str] = set()
        #: (function, inputs, outputs) run when a page opens, and wiring run once the whole page is laid out.
        self.loaders: list[tuple[Any, list[Any], list[Any]]] = []
        self.after_layout: list[Any] = []
        self._attach_running_job()

    # -- widgets -------------------------------------------------------------------------------------------------

    def t(self, component: Any, text_id: str, attribute: str = "label") -> Any:
        """Register a component whose `attribute` shows text `text_id` in the current language."""
        self.translated.append((component, text_id, attribute))
        return component

    def widget(self, key: str, **overrides: Any) -> Any:
        """The widget of one config key, made from its schema declaration."""
        spec = FIELDS[key]
        label, info = key_text(key, spec.help, "en")
        common = dict(label=label, info=info, elem_id=f"tl-{key}", value=spec.to_widget(spec.default))
        if spec.widget == "dropdown":
            choices = [spec.unset if c is None else str(c) for c in spec.choices]
            component = gr.Dropdown(choices=choices, **{**common, **overrides})
        elif spec.widget in ("combo", "multiselect"):
            choices = list(models.FIXED_CHOICES.get(key, ()))
            component = gr.Dropdown(allow_custom_value=True, multiselect=spec.widget == "multiselect",
                                    **{"choices": choices, **common, **overrides})
        elif spec.widget == "checkbox":
            component = gr.Checkbox(**{**common, **overrides})
        elif spec.widget == "number":
            # No minimum/maximum here: the schema's range check gives the message, as it does for a YAML file.
            component = gr.Number(precision=0 if spec.integer else None, **{**common, **overrides})
        else:
            component = gr.Textbox(lines=1, **{**common, **overrides})
        self.widgets[key] = component
        return component

    def section(self, name: str, keys_per_row: int = 4, open: bool = False) -> None:
        """An accordion with every key of a section that has no widget yet, in rows."""
        keys = [key for key, spec in FIELDS.items() if spec.section == name and key not in self.widgets]
        with self.t(gr.Accordion(text(f"sec_{name}", "en"), open=open, elem_id=f"tl-sec-{name}"), f"sec_{name}"):
            for start in range(0, len(keys), keys_per_row):
                with gr.Row():
                    for key in keys[start:start + keys_per_row]:
                        self.widget(key)

    def curve_plot(self, text_id: str, elem_id: str, height: int = 300) -> Any:
        """A line plot of `runs.curves` tables (step, value, series), empty until a run logs.

        Gradio 6 fixes a plot's colour legend when the plot is drawn and later only swaps its data, so a series
        unknown at first draw is never shown. The plot is therefore drawn with the two series a run has (no points),
        and the Runs tab hides and re-shows its plot when the picked runs change."""
        from tunelab.webui.runs import SERIES, curve_frame

        placeholder = curve_frame([(0, float("nan"), series) for series in SERIES])
        plot = gr.LinePlot(placeholder, x="step", y="value", color="series", label=text(text_id, "en"),
                           elem_id=elem_id, elem_classes="tl-plot", height=height)
        return self.t(plot, text_id)

    @property
    def inputs(self) -> list[Any]:
        """Every config widget, then the `more keys` box: what a handler needs to build a config."""
        return [*self.widgets.values(), self.more_keys]

    def config_of(self, args: tuple) -> dict[str, Any]:
        """The config dict of the handler arguments given by `inputs`; ConfigError when a value is unreadable."""
        *values, more = args
        try:
            extra = yaml.safe_load(more or "") or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"line {mark.line + 1}" if mark else "YAML"
            raise ConfigError(f"more keys: {where}: invalid YAML: {getattr(err, 'problem', err)}") from None
        if not isinstance(extra, dict):
            raise ConfigError("more keys: expected `key: value` lines")
        return config_from_widgets(dict(zip(self.widgets, values)), extra)

    def checked(self, args: tuple, **job_keys: Any) -> tuple[dict[str, Any] | None, str, list[Any]]:
        """(config, error message, widget updates): the config with `job_keys` set (None removes a key), checked as
        `tunelab` checks a YAML file; on error the widgets it names are marked with the message and config is None."""
        try:
            config = {**self.config_of(args), **job_keys}
            config = {key: value for key, value in config.items() if value is not None}
            validate(config)
            return config, "", self.mark_errors({})
        except ConfigError as err:
            named = keys_named(str(err)) or (["dataset"] if isinstance(err, DataError) else [])
            return None, str(err), self.mark_errors({key: str(err) for key in named})

    def mark_errors(self, errors: dict[str, str]) -> list[Any]:
        """Updates for every widget: the ones in `errors` show their message, earlier marks are cleared."""
        updates = []
        for key in self.widgets:
            if key in errors:
                updates.append(gr.update(elem_classes=["tl-invalid"], info=f"⚠ {errors[key]}"))
            elif key in self.shown_errors:
                updates.append(gr.update(elem_classes=[], info=key_text(key, FIELDS[key].help, "en")[1]))
            else:
                updates.append(gr.update())
        self.shown_errors = set(errors)
        return updates

    # -- the job -------------------------------------------------------------------------------------------------

    def refuse_if_busy(self) -> str | None:
        if self.job is not None and self.job.is_running():
            return (f"a {self.job_kind} job is running in {self.job.folder}: wait for it or abort it "
                    f"(one job at a time per board)")
        return None

    def start(self, kind: str, folder: Path, args: list[str]) -> str | None:
        """Start a job unless one runs; returns a refusal message, or None when it started."""
        with self.job_lock:
            refusal = self.refuse_if_busy()
            if refusal:
                return refusal
            self.job = start_job(folder, args, kind=kind)
            self.job_kind = kind
        return None

    def status_of(self, *kinds: str) -> JobStatus | None:
        """The status of the board's job when it is of one of these kinds (each tab watches its own)."""
        if self.job is None or self.job_kind not in kinds:
            return None
        return self.job.status()

    def _attach_running_job(self) -> None:
        """A board started while a job of an earlier board still runs shows that job."""
        from tunelab.webui.runs import find_runs

        for run in find_runs(self.saves):
            job = Job(run.folder)
            if run.status == "running":
                self.job, self.job_kind = job, job.record.get("kind", "train")
                return

    # -- lists the page fills in ---------------------------------------------------------------------------------

    def dataset_choices(self, dataset_dir: str) -> tuple[list[str], str]:
        """Dataset names in dataset_dir/dataset_info.json, and the error to show when it cannot be read."""
        try:
            return sorted(read_dataset_info(dataset_dir or "data")[1]), ""
        except ConfigError as err:
            return [], f"⚠ {err}"


def status_markdown(status: JobStatus | None, lang: str) -> str:
    if status is None:
        return text("no_job", lang)
    line = f"**{status.state}**"
    if status.exit_code not in (None, 0):
        line += f" (exit code {status.exit_code})"
    if status.step is not None and status.total:
        line += f" · step {status.step}/{status.total}"
    line += f" · elapsed {_clock(status.elapsed)}"
    if status.state == "running" and status.step:
        line += f" · remaining {_clock(status.elapsed / status.step * (status.total - status.step))}"
    if status.state == "failed":
        errors = [ln for ln in status.log_tail.splitlines() if "error" in ln.lower() or "Error" in ln][-6:]
        if errors:
            line += "\n\n```\n" + "\n".join(errors) + "\n```"
    return line


def progress_html(status: JobStatus | None) -> str:
    if status is None:
        return '<div class="bar"><div style="width:0%"></div></div>'
    step, total = status.step or 0, status.total or 0
    if status.state == "finished" and total:
        step = total
    share = 100 * step / total if total else (100 if status.state == "finished" else 0)
    return (f'<div class="bar"><div style="width:{share:.1f}%"></div></div>'
            f'<span class="count">{step}/{total or "?"} ({share:.0f}%)</span>')


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def sections_of(tab: str) -> list[str]:
    """The sections a tab lays out, in page order."""
    return [section for section, owner in SECTION_TAB.items() if owner == tab]
