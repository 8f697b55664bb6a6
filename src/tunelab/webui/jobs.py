"""Jobs the board starts: the same `tunelab` commands a user would type, run as child processes that do not depend on
the page.

    job = start_job(folder, ["train", "saves/m/lora/run1/run_config.yaml"])
    job.status()      # running / finished / failed / aborted, with the exit code
    job.abort()       # SIGTERM to the whole process tree, SIGKILL to what is left after a few seconds

A job's folder holds its command line and state (`run_state.json`) and its output (`run.log`: stdout and stderr of
the child, written by the child itself, never through a pipe that the page would have to drain). The child runs in
a session of its own and writes its exit code to the state folder itself, so closing the browser, or even stopping
the board, neither slows nor stops it, and a board started later reads its outcome from the files.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tunelab.training.output_dir import RUN_EXIT_CODE as EXIT_CODE
from tunelab.training.output_dir import RUN_LOG, RUN_STATE

#: Seconds between SIGTERM and SIGKILL when a job is aborted.
ABORT_GRACE = 5.0

#: The training progress bar (tqdm, no description) and the ppo/grpo loop's own progress line.
_TQDM = re.compile(r"^\s*\d+%\|[^|]*\|\s*(\d+)/(\d+) \[")
_ROLLOUT = re.compile(r"\[tunelab\] step (\d+)/(\d+)")


@dataclass
class JobStatus:
    state: str                 # running, finished, failed, aborted
    exit_code: int | None
    step: int | None
    total: int | None
    elapsed: float
    log_tail: str


class Job:
    """A `tunelab` command running (or run) in the background, known by its folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    @property
    def record(self) -> dict:
        return json.loads((self.folder / RUN_STATE).read_text(encoding="utf-8"))

    @property
    def log_path(self) -> Path:
        return self.folder / RUN_LOG

    def _update(self, **changes: object) -> None:
        record = {**self.record, **changes}
        (self.folder / RUN_STATE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")

    def is_running(self) -> bool:
        record = self.record
        if (self.folder / EXIT_CODE).exists() or record.get("aborted"):
            return False
        try:
            import psutil

            process = psutil.Process(record["pid"])
            # A recycled pid belongs to another process: the one we started has our start time.
            return process.create_time() <= record["started"] + 1 and process.status() != psutil.STATUS_ZOMBIE
        except (ImportError, OSError, LookupError):
            return False

    def exit_code(self) -> int | None:
        path = self.folder / EXIT_CODE
        text = path.read_text().strip() if path.exists() else ""
        return int(text) if text.lstrip("-").isdigit() else None

    def status(self) -> JobStatus:
        record = self.record
        running = self.is_running()
        code = self.exit_code()
        if running:
            state = "running"
        elif record.get("aborted"):
            state = "aborted"
        else:
            state = "finished" if code == 0 else "failed"
        ended = record.get("ended") or (time.time() if running else _mtime(self.log_path, record["started"]))
        tail = read_tail(self.log_path)
        step, total = progress_of(tail)
        return JobStatus(state, code, step, total, max(0.0, ended - record["started"]), last_lines(tail, 40))

    def abort(self) -> None:
        """Stop the job's whole process tree (torchrun workers included) and mark it aborted."""
        import psutil

        try:
            root = psutil.Process(self.record["pid"])
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            tree = []
        for process in tree:
            try:
                process.send_signal(signal.SIGTERM)
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(tree, timeout=ABORT_GRACE)
        for process in alive:
            try:
                process.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=ABORT_GRACE)
        self._update(aborted=True, ended=time.time())
        with open(self.log_path, "a", encoding="utf-8") as log:
            log.write("\n[tunelab webui] aborted\n")


def start_job(folder: Path, args: list[str], kind: str = "train", env: dict[str, str] | None = None) -> Job:
    """Run `tunelab <args>` in the background with its output in folder/run.log; folder/run_state.json records it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / EXIT_CODE).unlink(missing_ok=True)
    command = [sys.executable, "-m", "tunelab", *args]
    # The child's shell records the exit code itself, so the outcome survives the board that started it.
    wrapper = ["/bin/sh", "-c", '"$@"; echo $? > "$TUNELAB_EXIT_FILE"', "tunelab-job", *command]
    child_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1", "TUNELAB_EXIT_FILE": str(folder / EXIT_CODE)}
    with open(folder / RUN_LOG, "a", encoding="utf-8") as log:
        log.write(f"$ tunelab {' '.join(args)}\n")
        log.flush()
        process = subprocess.Popen(wrapper, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=child_env, start_new_session=True)
    record = {"kind": kind, "command": ["tunelab", *args], "pid": process.pid, "started": time.time(), "ended": None,
              "aborted": False}
    (folder / RUN_STATE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    # Reap the child when it ends, so it does not linger as a zombie of the board.
    import threading

    threading.Thread(target=process.wait, daemon=True).start()
    return Job(folder)


def read_tail(path: Path, size: int = 65536) -> str:
    if not path.exists():
        return ""
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - size))
        return f.read().decode("utf-8", errors="replace")


def last_lines(text: str, n: int) -> str:
    """The last n lines as a terminal would show them: a progress bar's carriage returns keep its latest state."""
    lines = [line.rsplit("\r", 1)[-1] if "\r" in line.rstrip("\r") else line.rstrip("\r")
             for line in text.split("\n")]
    return "\n".join([line for line in lines if line.strip()][-n:])


def progress_of(text: str) -> tuple[int | None, int | None]:
    """(step, total) of the latest training progress in a log: the trainer's bar with the most steps (evaluation and
    tokenization bars are shorter or carry a description), or the rollout loop's `step n/N` line."""
    best: tuple[int, int] | None = None
    for piece in re.split(r"[\r\n]", text):
        match = _TQDM.match(piece) or _ROLLOUT.search(piece)
        if match:
            step, total = int(match.group(1)), int(match.group(2))
            if best is None or total >= best[1]:
                best = (step, total)
    return best if best is not None else (None, None)


def _mtime(path: Path, fallback: float) -> float:
    return path.stat().st_mtime if path.exists() else fallback
