"""No lost work when a run dies at any moment: a run killed (SIGKILL) over and over, during its checkpoint saves too,
and resumed each time by running the same command, ends with the weights, losses and log of an uninterrupted run; a
full disk stops a save or an export with one message (exit status 2) and leaves the previous checkpoint and the
user's files as they were.

    .venv/bin/python -m pytest -q tests/training/test_crash_safety.py

The runs are `tunelab.cli.main(["train", CONFIG])` in processes forked from a server that has imported torch,
transformers and tunelab once (multiprocessing's forkserver): a fresh `python -m tunelab` spends ~9 s on imports here
before its first step, which 20 kills would multiply; a forked one reaches it in ~3 s. Each run is still a process of
its own, killed by SIGKILL and started afresh.
"""

import json
import logging
import multiprocessing
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import tqdm
import yaml
from safetensors.torch import load_file

from tunelab.config import ConfigError, load_config
from tunelab.training.callbacks import TrainerLogCallback
from tunelab.training.output_dir import prepare_output_dir
from helpers import read_log, run_config

# A kill comes after 1-4 steps (up to 3 saves, or 1-2 logged steps and part of one more, and a fast machine makes a
# few more before the signal lands): 150 steps leave room for 20 kills before the run ends.
STEPS = 150
KILLS = 20
#: The kinds of kill and how often each is drawn: as a new checkpoint folder appears (during a save), a random
#: moment into a training step, a random moment of the start-up (while the run loads and resumes).
KINDS = {"save": 0.45, "step": 0.4, "startup": 0.15}


def _cli(argv: list[str], log: str) -> None:
    """The command line, in a forked process whose output goes to `log`."""
    handle = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(handle, 1)
    os.dup2(handle, 2)
    # tqdm's default lock is a multiprocessing semaphore, which a killed process leaves behind (and Python warns
    # about at exit); a process of its own needs a thread lock only.
    tqdm.tqdm.set_lock(threading.RLock())
    from tunelab.cli import main

    sys.exit(main(argv))


@pytest.fixture(scope="module")
def launcher():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["tunelab.cli", "tunelab.training.stages.sft", "tunelab.model.export"])
    return context


def start(launcher, argv: list[str], log: Path):
    process = launcher.Process(target=_cli, args=(argv, str(log)))
    process.start()
    return process


def tunelab_command(launcher, argv: list[str], log: Path) -> tuple[int, str]:
    """Run `tunelab ARGV` to its end: its exit status and what it wrote."""
    process = start(launcher, argv, log)
    process.join(timeout=300)
    return process.exitcode, log.read_text()


def complete_step(folder: Path) -> int | None:
    """The step of checkpoint `folder` when it is complete (its trainer_state.json whole and of its step)."""
    try:
        step = json.loads((folder / "trainer_state.json").read_text())["global_step"]
    except (OSError, ValueError, KeyError):
        return None
    return step if folder.name == f"checkpoint-{step}" else None


def newest_complete(out: Path) -> int | None:
    steps = [complete_step(folder) for folder in out.glob("checkpoint-*")]
    return max((step for step in steps if step is not None), default=None)


def checkpoint_names(out: Path) -> set[str]:
    return {entry.name for entry in os.scandir(out) if entry.name.startswith("checkpoint-")} if out.exists() else set()


def wait_for(process, ready, timeout: float = 120.0) -> None:
    """Poll `ready()` every 2 ms until it is true or the process has ended."""
    deadline = time.monotonic() + timeout
    while process.is_alive() and time.monotonic() < deadline and not ready():
        time.sleep(0.002)


def log_lines(out: Path) -> int:
    try:
        return (out / "trainer_log.jsonl").read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


@pytest.mark.slow
def test_a_run_killed_twenty_times_ends_as_an_uninterrupted_one(tiny_model_dir, tmp_path, launcher):
    # Padded batches: resumed, they repeat the uninterrupted run exactly. Padding-free ones (the sft default) did
    # so in all but 4 of ~58 tries, which drifted from the first resumed step on, for a reason not found yet (README).
    config = run_config(tiny_model_dir, tmp_path / "run", finetuning_type="full", learning_rate=1e-3,
                        max_steps=STEPS, save_steps=1, logging_steps=1, save_total_limit=3,
                        per_device_train_batch_size=2, cache_dir=str(tmp_path / "cache"), padding_free=False)
    started = time.monotonic()
    reference = tmp_path / "reference"
    (tmp_path / "reference.yaml").write_text(yaml.safe_dump({**config, "output_dir": str(reference)}))
    status, text = tunelab_command(launcher, ["train", str(tmp_path / "reference.yaml")], tmp_path / "reference.log")
    assert status == 0, text[-3000:]
    step_seconds = json.loads((reference / "train_results.json").read_text())["train_runtime"] / STEPS

    out = Path(config["output_dir"])
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    rng = random.Random(16)
    kills, during_save, resumes, sessions, expected = 0, 0, 0, [], None
    while True:   # until the run after the last kill ends
        log = tmp_path / f"session-{len(sessions)}.log"
        kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0] if kills < KILLS else "none"
        process = start(launcher, ["train", str(path)], log)
        before, lines = checkpoint_names(out), log_lines(out)
        if kind == "save":
            # The n-th checkpoint folder this run creates, with n-1 saves completed before it: progress.
            count = rng.randint(1, 3)
            wait_for(process, lambda: len(checkpoint_names(out) - before) >= count)
            time.sleep(rng.uniform(0, 0.008))
        elif kind == "step":
            count = rng.randint(1, 2)
            wait_for(process, lambda: log_lines(out) >= lines + count)
            time.sleep(rng.uniform(0, step_seconds))
        elif kind == "startup":
            time.sleep(rng.uniform(0, 2.5))
        killed = process.is_alive() and kind != "none"
        if killed:
            os.kill(process.pid, signal.SIGKILL)
        process.join(timeout=300)
        text = log.read_text() if log.exists() else ""   # killed before it opened its log
        sessions.append(kind)
        # Each run resumed from the newest checkpoint that was complete when the one before it died (a run killed in
        # its start-up may not have got that far).
        resumed = [line.split("Resuming from ")[1] for line in text.splitlines() if "Resuming from" in line]
        if resumed:
            resumes += 1
            assert resumed[0].startswith(f"{out}/checkpoint-{expected} "), text[-3000:]
        else:
            assert expected is None or kind == "startup", text[-3000:]
        if not killed:
            assert process.exitcode == 0, text[-3000:]
            break
        kills += 1
        assert process.exitcode == -signal.SIGKILL, text[-3000:]
        newest = max((int(name.split("-")[1]) for name in checkpoint_names(out)), default=None)
        during_save += newest is not None and complete_step(out / f"checkpoint-{newest}") is None
        expected = newest_complete(out)
    elapsed = time.monotonic() - started
    print(f"\n{kills} kills ({during_save} during a checkpoint save), {resumes} resumes, {len(sessions)} runs, "
          f"{elapsed:.0f} s in all; a step takes {step_seconds:.2f} s; kills drawn: {Counter(sessions[:-1])}")
    assert kills >= KILLS and during_save >= 5 and resumes >= KILLS // 2

    records = [r for r in read_log(out) if "loss" in r]
    expected_records = [r for r in read_log(reference) if "loss" in r]
    assert [r["current_steps"] for r in records] == list(range(1, STEPS + 1)), "every step logged once, in order"
    assert [r["loss"] for r in records] == pytest.approx([r["loss"] for r in expected_records], rel=1e-6)
    weights, expected_weights = load_file(out / "model.safetensors"), load_file(reference / "model.safetensors")
    assert weights.keys() == expected_weights.keys()
    for name in weights:
        torch.testing.assert_close(weights[name], expected_weights[name], rtol=0, atol=1e-6)
    # save_total_limit kept the last three, complete, and nothing half-written or set aside is left.
    assert sorted(os.listdir(out)) == sorted(os.listdir(reference))
    assert all(complete_step(folder) is not None for folder in out.glob("checkpoint-*"))


# --- which checkpoint a run resumes from ---

def test_the_resume_takes_the_newest_complete_checkpoint_and_says_why_it_skipped_newer_ones(tiny_model_dir, tmp_path,
                                                                                           caplog, monkeypatch):
    # A run in this process (`run.setup_logging`) stops tunelab's messages at its own handler.
    monkeypatch.setattr(logging.getLogger("tunelab"), "propagate", True)
    out = tmp_path / "run"
    for step, state in ((1, '{"global_step": 1}'), (2, '{"global_step": 2}'), (3, None), (4, '{"global_st')):
        (out / f"checkpoint-{step}").mkdir(parents=True)
        if state is not None:
            (out / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    (out / "trainer_log.jsonl").write_text("")
    config = load_config(run_config(tiny_model_dir, out))
    with caplog.at_level(logging.INFO, logger="tunelab"):
        assert prepare_output_dir(config) == str(out / "checkpoint-2")
    assert "Skipping checkpoint-4: incomplete (trainer_state.json is cut short: the run was probably stopped while " \
           "writing it)" in caplog.text
    assert "Skipping checkpoint-3: incomplete (no trainer_state.json: the run was probably stopped while saving it)" \
           in caplog.text
    with pytest.raises(ConfigError, match="`resume_from_checkpoint`: .*checkpoint-3 cannot be resumed from: "
                                          "incomplete"):
        prepare_output_dir(replace(config, resume_from_checkpoint=str(out / "checkpoint-3")))

    # A run stopped while writing train_results.json is not finished: it resumes.
    (out / "train_results.json").write_text('{"epoch": 1.0, "train_lo')
    assert prepare_output_dir(config) == str(out / "checkpoint-2")

    # Stopped before its first checkpoint was complete: its log and a checkpoint cut short are no reason to refuse.
    for step in (1, 2, 4):
        shutil.rmtree(out / f"checkpoint-{step}")
    (out / "train_results.json").unlink()
    with caplog.at_level(logging.INFO, logger="tunelab"):
        assert prepare_output_dir(config) is None
    assert "holds no complete checkpoint yet (its run stopped before the first one was saved): starting over" \
           in caplog.text
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty and holds no checkpoint to resume from"):
        prepare_output_dir(config)


def test_the_log_is_cut_back_to_the_resumed_step_whole(tmp_path):
    log = tmp_path / "trainer_log.jsonl"
    lines = [json.dumps({"current_steps": step, "loss": 1.0 / step}) for step in (1, 2, 3, 4)]
    # Killed while appending the line of step 5, after checkpoint-3 was saved.
    log.write_text("\n".join(lines) + "\n" + '{"current_steps": 5, "lo')
    TrainerLogCallback._drop_lines_after(log, 3)
    assert log.read_text() == "\n".join(lines[:3]) + "\n"
    assert [p.name for p in tmp_path.iterdir()] == ["trainer_log.jsonl"]


# --- a full disk ---

@pytest.fixture
def small_disk(tmp_path):
    """`mount(size)`: a tmpfs of that size at tmp_path/disk (mounted again to resize it); unmounted afterwards."""
    folder = tmp_path / "disk"
    folder.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem (tmpfs) needs root")

    def mount(size: str) -> Path:
        options = f"size={size}" + (",remount" if os.path.ismount(folder) else "")
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True,
                                text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        return folder

    yield mount
    if os.path.ismount(folder):
        subprocess.run(["umount", str(folder)], check=True)


def the_error(text: str) -> str:
    """The one error a failed command printed (on the line of the progress bar it stopped), after checking that it
    printed no traceback."""
    assert "Traceback" not in text and text.count("tunelab: error:") == 1, text[-3000:]
    return "tunelab: error:" + text.split("tunelab: error:")[1].splitlines()[0]


def test_a_full_disk_stops_the_save_and_keeps_the_last_checkpoint(tiny_model_dir, tmp_path, small_disk, launcher):
    disk = small_disk("1536k")
    out = disk / "run"
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run_config(tiny_model_dir, out, finetuning_type="full", learning_rate=1e-3,
                                              max_steps=3, save_steps=1, logging_steps=1,
                                              cache_dir=str(tmp_path / "cache"))))
    # A checkpoint (weights, Adam's two moments) is ~2.1 MiB: the first one does not fit, and with no checkpoint to
    # measure by, that shows while it is written (torch.save's "unexpected pos").
    status, text = tunelab_command(launcher, ["train", str(path)], tmp_path / "first.log")
    assert status == 2
    assert the_error(text).startswith(f"tunelab: error: no space left in {out} for checkpoint-1: it needs about 2.")
    assert "No checkpoint is complete yet" in text
    assert not (out / "checkpoint-1").exists(), "what the failed save wrote is removed"

    # With room for one checkpoint: the run starts over, saves checkpoint-1, and is stopped before writing the
    # second, which needs what the first took.
    small_disk("3m")
    status, text = tunelab_command(launcher, ["train", str(path)], tmp_path / "second.log")
    assert status == 2 and "starting over" in text
    error = the_error(text)
    assert error.startswith(f"tunelab: error: no space left in {out} for checkpoint-2: it needs about 2.")
    assert re.search(r"it needs about 2\.\d MiB, \d+\.\d KiB free\. checkpoint-1, the last complete checkpoint, is "
                     r"intact: free some space and run the same command again to resume from it\.$", error), error
    assert complete_step(out / "checkpoint-1") == 1 and not (out / "checkpoint-2").exists()

    # With room, the same command resumes from checkpoint-1 and finishes.
    small_disk("16m")
    status, text = tunelab_command(launcher, ["train", str(path)], tmp_path / "third.log")
    assert status == 0, text[-3000:]
    assert f"Resuming from {out}/checkpoint-1" in text
    assert [r["current_steps"] for r in read_log(out) if "loss" in r] == [1, 2, 3]


def test_a_full_disk_stops_an_export_and_keeps_the_earlier_one(tiny_model_dir, tmp_path, small_disk, launcher):
    disk = small_disk("1200k")
    out = disk / "merged"
    path = tmp_path / "export.yaml"
    path.write_text(yaml.safe_dump({"model_name_or_path": str(tiny_model_dir), "template": "chatml",
                                    "export_dir": str(out)}))
    status, text = tunelab_command(launcher, ["export", str(path)], tmp_path / "first.log")
    assert status == 0, text[-3000:]
    (out / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    # The earlier export stays until the new one is complete, so there is no room for the second (~690 KiB).
    status, text = tunelab_command(launcher, ["export", str(path)], tmp_path / "second.log")
    assert status == 2
    error = the_error(text)
    assert error.startswith(f"tunelab: error: no space left in {disk} for the export: it needs about 6")
    assert f"{out} was not changed" in error
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in disk.iterdir()) == ["merged"], "no temporary folder is left"
