"""How fast `tunelab webui` shows its page, and how much memory the board process holds, idle and while a run trains.

    .venv/bin/python benchmarks/webui.py [--runs 3] [--steps 60]

Each run starts `python -m tunelab webui` on a free port and opens it in headless chromium (Debian's, through
Playwright, as the browser tests do). It times, from the command's start:
- `answers`: the first HTTP answer of the server;
- `page`: the page built in the browser with the board's first data in it (the Start button shown and the status
  line filled in by the page's load event).
Then, with the page open, it samples the board process's resident memory (not its children's) for 10 s idle, and
while a LoRA run of a tiny random model (built here) trains from the page: the run's YAML is loaded with Load and
started with Start, as a user would. It prints the median over runs. Run it on a quiet machine: a second busy
process on 2 cores distorts every timing.

    .venv/bin/python benchmarks/webui.py --llamafactory /path/to/venv/bin/llamafactory-cli

also times LLaMA-Factory's board (`llamafactory-cli webui`) the same way, its page counted as shown when its Start
button is, and samples its idle memory (process and children), then prints the ratios.
"""

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import yaml
from playwright.sync_api import sync_playwright

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_answer(url: str, seconds: float = 120) -> None:
    import urllib.error
    import urllib.request

    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(url)


class MemorySampler:
    """Samples a process's resident memory (with its children's when asked) every 0.2 s in a thread, until
    stopped."""

    def __init__(self, pid: int, children: bool = False) -> None:
        self.process = psutil.Process(pid)
        self.children = children
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            processes = [self.process, *(self.process.children(recursive=True) if self.children else [])]
            self.samples.append(sum(p.memory_info().rss for p in processes))
            time.sleep(0.2)

    def stop(self) -> list[int]:
        self._stop.set()
        self._thread.join()
        return self.samples


def one_run(browser, workdir: Path, config_path: Path) -> dict[str, float]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "TUNELAB_SAVES_DIR": str(workdir / "saves")}
    started = time.perf_counter()
    board = subprocess.Popen([sys.executable, "-m", "tunelab", "webui"], cwd=workdir, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_answer(url)
        answers = time.perf_counter() - started
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url)
        page.wait_for_selector("#tl-start", timeout=120_000)
        page.wait_for_function("document.querySelector('#tl-status').innerText.trim().length > 0", timeout=120_000)
        shown = time.perf_counter() - started

        idle = MemorySampler(board.pid)
        time.sleep(10)
        idle_rss = idle.stop()

        page.locator("#tl-config-path textarea").fill(str(config_path))
        page.click("#tl-load")
        page.wait_for_function("document.querySelector('#tl-message').innerText.includes('loaded')")
        page.click("#tl-start")
        busy = MemorySampler(board.pid)
        page.wait_for_function("['finished', 'failed'].some(w => document.querySelector('#tl-status').innerText"
                               ".includes(w))", timeout=600_000)
        busy_rss = busy.stop()
        status = page.locator("#tl-status").inner_text()
        page.close()
        if "finished" not in status:
            raise RuntimeError(f"the run did not finish: {status}")
        mib = 1 << 20
        return {"answers_s": answers, "page_s": shown, "idle_rss_mib": statistics.median(idle_rss) / mib,
                "run_rss_mib": max(busy_rss) / mib}
    finally:
        board.terminate()
        board.wait(10)


def llamafactory_run(browser, workdir: Path, cli: str) -> dict[str, float]:
    """LLaMA-Factory's board, started and opened the same way: time to answer, to its Start button, idle memory."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "GRADIO_SERVER_NAME": "127.0.0.1",
           "GRADIO_ANALYTICS_ENABLED": "False", "BROWSER": "true"}
    started = time.perf_counter()
    board = subprocess.Popen([cli, "webui"], cwd=workdir, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_answer(url, seconds=300)
        answers = time.perf_counter() - started
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url)
        page.get_by_role("button", name="Start", exact=True).first.wait_for(timeout=120_000)
        shown = time.perf_counter() - started
        idle = MemorySampler(board.pid, children=True)
        time.sleep(10)
        idle_rss = idle.stop()
        page.close()
        return {"answers_s": answers, "page_s": shown, "idle_rss_mib": statistics.median(idle_rss) / (1 << 20)}
    finally:
        os.killpg(board.pid, 15)
        board.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60, help="training steps of the run watched for memory")
    parser.add_argument("--llamafactory", metavar="CLI", help="llamafactory-cli to compare with")
    args = parser.parse_args()
    os.environ.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    from tunelab.model import build_tiny_model

    results = []
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as p:
        workdir = Path(tmp)
        model = build_tiny_model(workdir / "tiny", arch="llama")
        browser = p.chromium.launch(executable_path=CHROMIUM,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        for run in range(args.runs):
            config_path = workdir / f"run{run}.yaml"
            config = {"stage": "sft", "model_name_or_path": str(model), "template": "chatml",
                      "dataset": "alpaca_demo", "dataset_dir": str(REPO / "data"), "cutoff_len": 256,
                      "learning_rate": 0.01, "max_steps": args.steps, "logging_steps": 5, "save_steps": 30,
                      "report_to": "none", "output_dir": str(workdir / "saves" / f"run{run}")}
            config_path.write_text(yaml.safe_dump(config, sort_keys=False))
            results.append(one_run(browser, workdir, config_path))
            print(f"run {run + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in results[-1].items()), flush=True)
        theirs = []
        for run in range(args.runs if args.llamafactory else 0):
            theirs.append(llamafactory_run(browser, workdir, args.llamafactory))
            print(f"llamafactory run {run + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in theirs[-1].items()),
                  flush=True)
        browser.close()
    import gradio

    print(f"\npython {sys.version.split()[0]}, gradio {gradio.__version__}, {os.cpu_count()} cores; "
          f"median of {args.runs} runs:")
    for key in results[0]:
        ours = statistics.median(r[key] for r in results)
        line = f"  {key:14} {ours:8.2f}"
        if theirs and key in theirs[0]:
            other = statistics.median(r[key] for r in theirs)
            line += f"   LLaMA-Factory {other:8.2f}   ratio (theirs / ours) {other / ours:5.2f}"
        print(line)


if __name__ == "__main__":
    main()
