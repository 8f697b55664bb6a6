"""`tunelab webui` driven in a real browser (Debian's chromium through Playwright), as a user would drive it.

One board runs for the whole module, started with the real command (`python -m tunelab webui`) on a free port, with
its output root in a temporary folder; the tests run in file order, each building on the last: bad values are
refused with the CLI's message, a LoRA run on a tiny model goes to the end, a YAML saved from the board trains the
same losses from the command line, a run is aborted and resumed, the page follows a run across a reload, the labels
switch to Chinese, a method's closed section opens on its keys, the trained adapter chats, predicts and exports, and
the Runs tab overlays two runs.

Screenshots of every tab land in `build/board-screenshots/` (or $TUNELAB_SCREENSHOTS) for a person to look at.
"""

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import LF_DATA, REPO

playwright = pytest.importorskip("playwright.sync_api", reason="browser tests need `pip install playwright`")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip("browser tests need Debian's chromium (apt-get install chromium)", allow_module_level=True)

pytestmark = pytest.mark.browser

# LLaMA-Factory's own demo data when it sits beside the repository, else tunelab's.
DATA_DIR, DATASET = (LF_DATA, "alpaca_en_demo") if (LF_DATA / "dataset_info.json").exists() else (REPO / "data",
                                                                                                   "alpaca_demo")
SCREENSHOTS = Path(os.environ.get("TUNELAB_SCREENSHOTS", REPO / "build" / "board-screenshots"))
TIMEOUT_MS = 120_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_board(workdir: Path, port: int, **env: str) -> subprocess.Popen:
    environment = {**os.environ, "GRADIO_SERVER_PORT": str(port), "TUNELAB_SAVES_DIR": str(workdir / "saves"),
                   "PYTHONUNBUFFERED": "1", **env}
    return subprocess.Popen([sys.executable, "-m", "tunelab", "webui"], cwd=workdir, env=environment,
                            stdout=open(workdir / f"board-{port}.log", "w"), stderr=subprocess.STDOUT)


def wait_for_http(url: str, process: subprocess.Popen, seconds: float = 60) -> None:
    import urllib.error
    import urllib.request

    deadline = time.time() + seconds
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the board exited with status {process.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return  # it answers (a login page or an error is an answer)
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer in {seconds} s")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_model_dir) -> Path:
    folder = tmp_path_factory.mktemp("board")
    return folder


@pytest.fixture(scope="module")
def board_url(workdir):
    port = free_port()
    process = start_board(workdir, port)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(url, process)
        yield url
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def page(browser, board_url):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    open_board(page, board_url)
    return page


def open_board(page, url: str) -> None:
    page.goto(url)
    # gradio builds the page in JavaScript: wait for a component, then for the page's first data to arrive.
    page.wait_for_selector("#tl-start", timeout=TIMEOUT_MS)
    page.wait_for_function("document.querySelector('#tl-status') && "
                           "document.querySelector('#tl-status').innerText.trim().length > 0", timeout=TIMEOUT_MS)


def shot(page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


# -- filling widgets, as a user types -----------------------------------------------------------------------------

def fill_text(page, key: str, value: str) -> None:
    box = page.locator(f"#tl-{key} textarea, #tl-{key} input[type=number]").first
    box.fill(str(value))
    box.press("Tab")


def choose(page, key: str, *values: str) -> None:
    """Type values into a dropdown (a combo, or a multiselect after clearing it), each confirmed with Enter."""
    box = page.locator(f"#tl-{key} input").first
    tokens = page.locator(f"#tl-{key} .token-remove")
    while tokens.count():
        tokens.first.click()
    for value in values:
        box.click()
        box.fill(value)
        box.press("Enter")
    box.press("Escape")
    page.locator("body").click(position={"x": 5, "y": 5})


def text_of(page, elem_id: str) -> str:
    """What the element shows: its text, and the values of its text boxes."""
    return page.locator(f"#{elem_id}").evaluate(
        "e => e.innerText + '\\n' + Array.from(e.querySelectorAll('textarea, input')).map(x => x.value).join('\\n')")


def wait_text(page, elem_id: str, *needles: str, timeout_ms: int = TIMEOUT_MS) -> str:
    """Wait until the element shows one of the needles; returns its text."""
    deadline = time.time() + timeout_ms / 1000
    while time.time() < deadline:
        shown = text_of(page, elem_id)
        if any(needle in shown for needle in needles):
            return shown
        time.sleep(0.25)
    raise AssertionError(f"#{elem_id} never showed {needles}; it shows:\n{text_of(page, elem_id)}")


def open_tab(page, name: str) -> None:
    page.locator("button[role=tab]", has_text=name).first.click()


def fill_run(page, tiny_model_dir: Path, output_dir: Path, max_steps: int, save_steps: int) -> None:
    choose(page, "model_name_or_path", str(tiny_model_dir))
    choose(page, "template", "chatml")
    fill_text(page, "dataset_dir", str(DATA_DIR))
    time.sleep(1)
    choose(page, "dataset", DATASET)
    fill_text(page, "learning_rate", "0.01")
    fill_text(page, "cutoff_len", "128")
    fill_text(page, "per_device_train_batch_size", "4")
    fill_text(page, "save_steps", str(save_steps))
    fill_text(page, "output_dir", str(output_dir))
    fill_text(page, "more-keys", f"max_steps: {max_steps}\nlogging_steps: 2\nmax_samples: 200\nreport_to: none")


def losses(folder: Path) -> list[tuple[int, float]]:
    return [(r["current_steps"], r["loss"]) for r in map(json.loads, (folder / "trainer_log.jsonl").open())
            if "loss" in r]


# -- the tests, in the order a user would go ----------------------------------------------------------------------

def test_bad_values_show_the_cli_message_and_start_nothing(page, workdir, tiny_model_dir):
    fill_run(page, tiny_model_dir, workdir / "saves" / "bad", max_steps=4, save_steps=2)
    fill_text(page, "learning_rate", "-1")
    page.click("#tl-start")
    message = wait_text(page, "tl-message", "learning_rate")
    assert page.locator("#tl-learning_rate.tl-invalid").count() == 1  # marked next to its field
    shot(page, "train-bad-value")

    # The same value in a YAML file, through the CLI: the same words after the file name.
    config = workdir / "bad.yaml"
    config.write_text(f"model_name_or_path: {tiny_model_dir}\nlearning_rate: -1\n")
    cli = subprocess.run([sys.executable, "-m", "tunelab", "train", str(config)], capture_output=True, text=True)
    assert cli.returncode == 2
    cli_words = cli.stderr.strip().split(f"{config}: ", 1)[1]
    assert cli_words.replace("`", "") in message, (cli_words, message)  # the page shows `key` as code

    fill_text(page, "learning_rate", "0.01")
    choose(page, "dataset", "alpaca_enn")
    page.click("#tl-start")
    message = wait_text(page, "tl-message", "alpaca_enn")
    assert "no dataset named 'alpaca_enn'" in message and "did you mean" in message
    assert page.locator("#tl-learning_rate.tl-invalid").count() == 0  # the old mark is gone
    assert not (workdir / "saves" / "bad").exists()  # nothing was started or written


#: Vega's first two series colours: the lines a plot draws, whether as svg (gradio 6) or on a canvas (gradio 5).
LINE_COLOURS = [(0x4C, 0x78, 0xA8), (0xF5, 0x85, 0x18)]


def wait_lines(page, elem_id: str, count: int) -> None:
    """Wait until the plot shows `count` lines: that many series colours, each over more pixels than its legend
    symbol (a circle of about 40 pixels) has."""
    import numpy as np
    from PIL import Image

    deadline = time.time() + TIMEOUT_MS / 1000
    while True:
        image = Image.open(io.BytesIO(page.locator(f"#{elem_id}").screenshot())).convert("RGB")
        pixels = np.asarray(image, dtype=np.int32).reshape(-1, 3)
        drawn = [int((np.abs(pixels - colour).sum(axis=1) < 60).sum()) for colour in LINE_COLOURS]
        if all(n > 80 for n in drawn[:count]):
            return
        assert time.time() < deadline, f"{elem_id}: line pixels {drawn}, expected {count} lines"
        time.sleep(1)


def test_a_run_goes_to_the_end_with_its_curve(page, workdir, tiny_model_dir):
    output = workdir / "saves" / "tiny" / "lora" / "first"
    fill_run(page, tiny_model_dir, output, max_steps=30, save_steps=10)
    page.click("#tl-start")
    wait_text(page, "tl-message", "started")
    wait_text(page, "tl-status", "finished", "failed")
    assert "**" not in text_of(page, "tl-status") and "finished" in text_of(page, "tl-status")
    wait_text(page, "tl-progress", "30/30")
    wait_text(page, "tl-log", "train_loss", "[tunelab]")
    wait_lines(page, "tl-loss-plot", 1)
    shot(page, "train-finished")
    assert (output / "adapter_model.safetensors").exists() and (output / "trainer_log.jsonl").exists()
    first, last = losses(output)[0][1], losses(output)[-1][1]
    assert last < first


def test_a_yaml_saved_from_the_board_trains_the_same_losses(page, workdir):
    saved = workdir / "saved.yaml"
    fill_text(page, "config-path", str(saved))
    page.click("#tl-save")
    wait_text(page, "tl-message", "saved")
    output = workdir / "cli-run"
    subprocess.run([sys.executable, "-m", "tunelab", "train", str(saved), f"output_dir={output}"], check=True,
                   capture_output=True)
    board_run = workdir / "saves" / "tiny" / "lora" / "first"
    assert losses(output) == losses(board_run)

    # Load gives the widgets back: change one, load, and it is restored.
    fill_text(page, "learning_rate", "0.5")
    page.click("#tl-load")
    wait_text(page, "tl-message", "loaded")
    assert float(page.locator("#tl-learning_rate input").input_value()) == 0.01


def test_abort_midway_then_resume_to_the_end(page, workdir, tiny_model_dir):
    output = workdir / "saves" / "tiny" / "lora" / "long"
    fill_run(page, tiny_model_dir, output, max_steps=400, save_steps=20)
    fill_text(page, "cutoff_len", "512")
    page.click("#tl-start")
    wait_text(page, "tl-message", "started")
    # A second Start while it runs is refused.
    page.click("#tl-start")
    wait_text(page, "tl-message", "one job at a time")

    while not list(output.glob("checkpoint-*")):
        time.sleep(0.5)
    # While it trains on both cores, the board still answers a click quickly.
    clicked = time.time()
    page.click("#tl-preview-command")
    wait_text(page, "tl-preview", "tunelab train")
    answer_seconds = time.time() - clicked
    # A reload re-attaches to the running job.
    open_board(page, page.url)
    wait_text(page, "tl-status", "running")
    shot(page, "train-running-after-reload")

    state = json.loads((output / "run_state.json").read_text())
    aborted_at = time.time()
    page.click("#tl-abort")
    wait_text(page, "tl-message", "aborted")
    abort_seconds = time.time() - aborted_at
    wait_text(page, "tl-status", "aborted")
    import psutil

    assert not psutil.pid_exists(state["pid"]) or psutil.Process(state["pid"]).status() == psutil.STATUS_ZOMBIE
    done = max(step for step, _ in losses(output))
    assert done < 400 and list(output.glob("checkpoint-*"))
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    (SCREENSHOTS / "timings.json").write_text(json.dumps({"click_answer_s_while_training": answer_seconds,
                                                          "abort_s": abort_seconds}))

    page.click("#tl-resume")
    wait_text(page, "tl-message", "resuming from checkpoint-")
    wait_text(page, "tl-status", "finished", "failed")
    assert "finished" in text_of(page, "tl-status")
    steps = [step for step, _ in losses(output)]
    assert steps == sorted(set(steps)) and steps[-1] == 400  # one uninterrupted log


def test_chinese_labels_use_the_seed_terms(page):
    choose(page, "lang", "中文")
    for label in ("模型名称或路径", "适配器名称或路径", "微调方法", "学习率", "训练轮数", "最大样本数", "学习率调度器",
                  "最大梯度范数", "验证步数", "保存步数", "优化器", "量化比特数", "LoRA/QLoRA 配置", "开始"):
        # The first one shown: gradio 5 also keeps the texts of closed accordions in the page, hidden.
        page.locator(f"text={label} >> visible=true").first.wait_for(timeout=10_000)
    shot(page, "train-zh")
    choose(page, "lang", "English")
    page.get_by_text("Learning rate", exact=False).first.wait_for(timeout=10_000)


def test_method_sections_are_closed_until_opened(page):
    """Each training method's keys wait in a closed section; GaLore's, opened, show with their labels in both
    languages."""
    # Closed: gradio 6 draws no widget of a closed section, gradio 5 draws it hidden.
    for name, first_key in (("oft", "oft_rank"), ("galore", "use_galore"), ("apollo", "use_apollo"),
                            ("badam", "use_badam"), ("method", "use_adam_mini")):
        assert page.locator(f"#tl-sec-{name}").is_visible() and not page.locator(f"#tl-{first_key}").is_visible()
    header = page.locator("#tl-sec-galore button.label-wrap").first
    header.click()
    page.locator("#tl-galore_rank").wait_for(state="visible", timeout=10_000)
    for label in ("Use GaLore", "GaLore rank", "GaLore update interval", "GaLore proj type"):
        assert label in text_of(page, "tl-sec-galore"), label
    assert not page.locator("#tl-apollo_rank").is_visible()  # opening one section opens no other
    shot(page, "train-galore")
    choose(page, "lang", "中文")
    wait_text(page, "tl-sec-galore", "GaLore 秩")
    assert "GaLore 配置" in text_of(page, "tl-sec-galore") and "使用 GaLore" in text_of(page, "tl-sec-galore")
    shot(page, "train-galore-zh")
    choose(page, "lang", "English")
    wait_text(page, "tl-sec-galore", "GaLore rank")
    header.click()
    page.locator("#tl-galore_rank").wait_for(state="hidden", timeout=10_000)


def test_chat_with_the_trained_adapter_streams(page, workdir, tiny_model_dir):
    adapter = workdir / "saves" / "tiny" / "lora" / "first"
    choose(page, "adapter_name_or_path", str(adapter))
    open_tab(page, "Chat")
    fill_text(page, "max_new_tokens", "200")
    # Greedy, and a repetition penalty: 30 steps of a tiny model otherwise answer with blanks, which show as nothing.
    page.locator("#tl-do_sample input").uncheck()
    fill_text(page, "repetition_penalty", "3")
    page.click("#tl-load-model")
    wait_text(page, "tl-chat-info", "loaded", "⚠")
    assert str(adapter) in text_of(page, "tl-chat-info")
    # Every change of the reply on the page is recorded, to see it grow while it streams.
    page.evaluate("""() => {
        window.replyLengths = [];
        const chat = document.querySelector('#tl-chatbot');
        new MutationObserver(() => {
            const replies = chat.querySelectorAll('[data-testid=bot]');
            if (replies.length) window.replyLengths.push(replies[replies.length - 1].innerText.length);
        }).observe(chat, {subtree: true, childList: true, characterData: true});
    }""")
    page.locator("#tl-message-box textarea").fill("Who are you?")
    page.click("#tl-send")
    page.wait_for_function("window.replyLengths.length > 0", timeout=60_000)
    time.sleep(3)
    lengths = page.evaluate("window.replyLengths")
    grown = sorted({n for n in lengths if n > 0})
    assert len(grown) >= 2, lengths  # seen at two lengths at least: streamed, not sent whole
    shot(page, "chat")


def test_predict_and_export(page, workdir):
    open_tab(page, "Evaluate")
    choose(page, "predict-dataset", DATASET)
    fill_text(page, "predict-dir", str(workdir / "saves" / "tiny" / "lora" / "predict"))
    page.click("#tl-predict")
    wait_text(page, "tl-eval-status", "finished", "failed")
    wait_text(page, "tl-eval-results", "predict_bleu-4")
    shot(page, "evaluate")

    open_tab(page, "Export")
    export_dir = workdir / "exported"
    fill_text(page, "export_dir", str(export_dir))
    page.click("#tl-export")
    wait_text(page, "tl-export-status", "finished", "failed")
    wait_text(page, "tl-written", "model.safetensors")
    shot(page, "export")
    assert (export_dir / "config.json").exists() and (export_dir / "model.safetensors").exists()


def test_runs_tab_overlays_two_runs(page):
    open_tab(page, "Runs")
    page.click("#tl-runs-refresh")
    table = wait_text(page, "tl-runs-table", "first")
    assert "long" in table and "finished" in table
    choose(page, "runs-pick", "tiny/lora/first")
    wait_lines(page, "tl-runs-plot", 1)
    # A second run picked later gets its own line: the plot is drawn anew with the new series.
    choose(page, "runs-pick", "tiny/lora/first", "tiny/lora/long")
    wait_lines(page, "tl-runs-plot", 2)
    wait_text(page, "tl-runs-config", "model_name_or_path")
    shot(page, "runs")


def test_chat_about_an_uploaded_picture(page, picture_adapter):
    """A vision-language adapter loaded in the Chat tab answers about the picture uploaded with the message."""
    from helpers import PICTURE_ANSWERS, PICTURE_QUESTION

    open_tab(page, "Train")
    choose(page, "model_name_or_path", picture_adapter["model_name_or_path"])
    choose(page, "template", "qwen2_vl")
    choose(page, "adapter_name_or_path", picture_adapter["adapter_name_or_path"])
    fill_text(page, "more-keys", f"image_max_pixels: {picture_adapter['image_max_pixels']}\nreport_to: none")
    open_tab(page, "Chat")
    fill_text(page, "max_new_tokens", "12")
    page.locator("#tl-do_sample input").uncheck()   # greedy: the adapter's answers are its greedy replies
    fill_text(page, "repetition_penalty", "1")
    page.click("#tl-clear")
    page.click("#tl-unload-model")
    wait_text(page, "tl-chat-info", "model unloaded")
    page.click("#tl-load-model")
    wait_text(page, "tl-chat-info", "template: qwen2_vl", "⚠")
    assert picture_adapter["adapter_name_or_path"] in text_of(page, "tl-chat-info")
    page.locator("#tl-chat-image input[type=file]").set_input_files(str(LF_DATA / "mllm_demo_data" / "1.jpg"))
    page.locator("#tl-chat-image img").first.wait_for(timeout=30_000)
    page.locator("#tl-message-box textarea").fill(PICTURE_QUESTION)
    page.click("#tl-send")
    wait_text(page, "tl-chatbot", PICTURE_ANSWERS["1.jpg"], "rror", timeout_ms=60_000)
    assert PICTURE_ANSWERS["1.jpg"] in text_of(page, "tl-chatbot")
    assert page.locator("#tl-chatbot img").count() >= 1   # the picture shows in the conversation
    shot(page, "chat-picture")
