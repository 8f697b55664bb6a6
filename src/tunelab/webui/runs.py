"""Runs as the board sees them: folders under the output root, read from the files a run writes.

Everything here reads files only (`trainer_log.jsonl`, `run_state.json`, `all_results.json`, checkpoints), so a
run is shown the same whether this board started it, another board did, or a user typed `tunelab train`.
"""

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tunelab.training.output_dir import FINISHED_MARKER, RUN_CONFIG, RUN_STATE, TRAINER_LOG, last_checkpoint
from tunelab.webui.fields import FIELDS
from tunelab.webui.jobs import Job

RESULTS = "all_results.json"
#: How deep under the output root runs are looked for (saves/<model>/<method>/<run>).
SEARCH_DEPTH = 4


@dataclass
class RunSummary:
    folder: Path
    stage: str
    method: str
    status: str
    step: int
    total: int
    loss: float | None
    modified: float

    def row(self, root: Path) -> list[Any]:
        where = str(self.folder.relative_to(root)) if self.folder.is_relative_to(root) else str(self.folder)
        loss = "" if self.loss is None else f"{self.loss:.4f}"
        steps = f"{self.step}/{self.total}" if self.total else ""
        return [where, self.stage, self.method, self.status, steps, loss,
                time.strftime("%Y-%m-%d %H:%M", time.localtime(self.modified))]


def read_records(folder: Path) -> list[dict[str, Any]]:
    path = Path(folder) / TRAINER_LOG
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line being written right now
    return records


def read_config(folder: Path) -> dict[str, Any]:
    path = Path(folder) / RUN_CONFIG
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {} if path.exists() else {}
    except yaml.YAMLError:
        return {}


def read_results(folder: Path) -> dict[str, Any]:
    path = Path(folder) / RESULTS
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    except json.JSONDecodeError:
        return {}


def run_status(folder: Path) -> str:
    """running, finished, failed, aborted, or unfinished (checkpoints left by a run that did not end)."""
    folder = Path(folder)
    if (folder / RUN_STATE).exists():
        state = Job(folder).status().state
        if state != "failed" or not (folder / FINISHED_MARKER).exists():
            return state
    if (folder / FINISHED_MARKER).exists():
        return "finished"
    return "unfinished" if last_checkpoint(folder) is not None else "failed"


def summarize(folder: Path) -> RunSummary:
    records = read_records(folder)
    config = read_config(folder)
    last = records[-1] if records else {}
    losses = [r["loss"] for r in records if isinstance(r.get("loss"), (int, float))]
    newest = max((p.stat().st_mtime for p in folder.iterdir()), default=folder.stat().st_mtime)
    # A training run that left a key out used its default; exports and predictions have no stage.
    trained = bool(records)
    stage, method = (config.get(key, FIELDS[key].default if trained else "") for key in ("stage", "finetuning_type"))
    return RunSummary(folder, str(stage), str(method),
                      run_status(folder), int(last.get("current_steps", 0)), int(last.get("total_steps", 0)),
                      losses[-1] if losses else None, newest)


def find_runs(root: Path) -> list[RunSummary]:
    """Every run folder under root (one holding trainer_log.jsonl or run_state.json), newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    folders = set()
    for depth in range(1, SEARCH_DEPTH + 1):
        pattern = "/".join(["*"] * depth)
        for marker in (TRAINER_LOG, RUN_STATE):
            folders.update(path.parent for path in root.glob(f"{pattern}/{marker}"))
    return sorted((summarize(folder) for folder in folders), key=lambda run: run.modified, reverse=True)


#: The two series of a curve: the training value and the evaluation one (`eval_` + key).
SERIES = ("train", "eval")


def curves(folders: dict[str, Path], key: str) -> "Any":
    """A long table (step, value, series) of `key` and `eval_key` of each run, for one line plot; series is
    `train`/`eval`, prefixed with `run: ` when there are several runs."""
    rows = []
    for name, folder in folders.items():
        for record in read_records(folder):
            for series, field in zip(SERIES, (key, f"eval_{key}")):
                value = record.get(field)
                if isinstance(value, (int, float)):
                    rows.append((record.get("current_steps", 0), float(value),
                                 f"{name}: {series}" if len(folders) > 1 else series))
    return curve_frame(rows)


def curve_frame(rows: list[tuple[int, float, str]]) -> "Any":
    import pandas as pd

    # Typed columns even when empty: the plot reads its axes' kinds from them (object columns draw as categories).
    steps, values, series = zip(*rows) if rows else ((), (), ())
    return pd.DataFrame({"step": pd.Series(steps, dtype="int64"), "value": pd.Series(values, dtype="float64"),
                         "series": pd.Series(series, dtype="str")})
