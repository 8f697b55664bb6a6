"""The board's parts that need no browser: its form read from the schema, its jobs, its run listing, its login rule.

The browser tests (`test_webui_browser.py`) drive the whole page; these pin the pieces it stands on.
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
import yaml

from tunelab.config import ConfigError, load_config
from tunelab.config.schema import public_fields
from tunelab.training.output_dir import BOARD_FILES, prepare_output_dir
from tunelab.webui.app import read_logins
from tunelab.webui.fields import (FIELDS, JOB_KEYS, SECTION_TAB, SECTIONS, config_from_widgets, keys_named,
                                  validate, widgets_from_config)
from tunelab.webui.jobs import Job, last_lines, progress_of, start_job
from tunelab.webui.locales import KEY_TEXTS, TEXTS, key_text
from tunelab.webui.runs import curves, find_runs
from helpers import REPO



# -- the form is the schema ----------------------------------------------------------------------------------------

def test_every_schema_key_has_a_widget_a_section_and_a_label_in_every_language():
    keys = {f.name for f in public_fields()} - set(JOB_KEYS)
    assert set(FIELDS) == keys
    for spec in FIELDS.values():
        assert spec.section in SECTIONS and spec.section in SECTION_TAB
        assert spec.help
    for lang, table in KEY_TEXTS.items():
        assert set(table) >= keys, f"{lang} lacks labels for {sorted(keys - set(table))}"
    for lang, texts in TEXTS.items():
        assert set(texts) == set(TEXTS["en"]), lang


def test_each_method_has_its_section_as_on_llama_board():
    section = {key: spec.section for key, spec in FIELDS.items()}
    for method in ("oft", "galore", "apollo", "badam"):
        own = [key for key in FIELDS if key.startswith(f"{method}_") or key == f"use_{method}"]
        assert len(own) >= 3 and {section[key] for key in own} == {method}, method
    assert section["module_dropout"] == "oft"
    assert {section[key] for key in ("loraplus_lr_ratio", "pissa_init", "pissa_convert")} == {"lora"}
    # What no method claims sits in the "extra" section, as in LLaMA Board.
    assert {section[key] for key in ("use_adam_mini", "use_muon", "use_llama_pro", "use_dft_loss", "eaft_alpha",
                                     "moe_aux_loss_coef", "pure_bf16", "enable_liger_kernel", "fp8")} == {"method"}
    # LoRA's own keys come first in its section, LoRA+ and PiSSA after them.
    lora = [key for key in FIELDS if section[key] == "lora"]
    assert lora[:4] == ["lora_rank", "lora_alpha", "lora_dropout", "lora_target"]
    assert lora.index("create_new_adapter") < lora.index("loraplus_lr_ratio")
    for lang, texts in TEXTS.items():
        assert {f"sec_{name}" for name in SECTIONS if name != "head"} <= set(texts), lang


def test_english_labels_spell_method_names_as_their_authors():
    assert [key_text(key, "", "en")[0] for key in ("galore_rank", "use_badam", "loraplus_lr_ratio", "oft_rank",
                                                   "vllm_maxlen", "learning_rate")] == \
        ["GaLore rank", "Use BAdam", "LoRA+ LR ratio", "OFT rank", "vLLM maxlen", "Learning rate"]


def test_widget_kinds_and_ranges_come_from_the_schema():
    assert FIELDS["stage"].widget == "dropdown" and "dpo" in FIELDS["stage"].choices
    assert set(FIELDS["finetuning_type"].choices) == {"full", "freeze", "lora", "qlora", "oft"}
    assert FIELDS["lora_rank"].widget == "number" and FIELDS["lora_rank"].integer and FIELDS["lora_rank"].minimum == 1
    assert FIELDS["learning_rate"].widget == "number" and not FIELDS["learning_rate"].integer
    assert FIELDS["quantization_bit"].widget == "dropdown" and None in FIELDS["quantization_bit"].choices
    assert FIELDS["dataset"].widget == "multiselect"
    assert FIELDS["do_sample"].widget == "checkbox"


@pytest.mark.parametrize("example", ["llama3_lora_sft.yaml", "llama3_lora_dpo.yaml", "qwen2.5_lora_grpo.yaml",
                                     "llama3_qlora_sft.yaml", "smollm2_lora_predict.yaml"])
def test_a_yaml_loaded_into_the_board_comes_back_the_same(example):
    written = yaml.safe_load((REPO / "examples" / example).read_text())
    values, rest = widgets_from_config(written)
    back = config_from_widgets(values, rest)
    # The board writes only what differs from the defaults; loaded, both are the same config.
    assert load_config(back) == load_config({k: v for k, v in written.items() if k not in JOB_KEYS} |
                                            {k: written[k] for k in JOB_KEYS if k in written and k in back})
    assert all(key in written for key in back)


def test_unreadable_widget_values_name_their_keys():
    values, _ = widgets_from_config({})
    values |= {"lora_rank": "eight", "learning_rate": 0.001}
    with pytest.raises(ConfigError, match="`lora_rank`"):
        config_from_widgets(values)


def test_the_board_checks_with_the_cli_words(tiny_model_dir):
    with pytest.raises(ConfigError) as board:
        validate({"model_name_or_path": str(tiny_model_dir), "learning_rate": -1})
    with pytest.raises(ConfigError) as cli:
        load_config({"model_name_or_path": str(tiny_model_dir), "learning_rate": -1})
    assert str(board.value) == str(cli.value)
    assert keys_named(str(board.value)) == ["learning_rate"]
    with pytest.raises(ConfigError, match="no dataset named 'alpaca_enn'"):
        validate({"model_name_or_path": str(tiny_model_dir), "dataset": ["alpaca_enn"],
                  "dataset_dir": str(REPO / "data")})


def test_a_broken_dataset_info_is_an_error_not_an_empty_list(tmp_path):
    (tmp_path / "dataset_info.json").write_text("{ not json")
    with pytest.raises(ConfigError, match="dataset_info.json"):
        validate({"model_name_or_path": "m", "dataset": ["x"], "dataset_dir": str(tmp_path)})


# -- jobs and runs ---------------------------------------------------------------------------------------------------

def test_progress_is_read_from_the_trainers_bar_not_the_tokenizers():
    log = ("Running tokenizer on dataset: 100%|██████████| 200/200 [00:01<00:00]\n"
           " 40%|████      | 12/30 [00:04<00:06,  2.9it/s]\r 43%|████▎     | 13/30 [00:04<00:05,  2.9it/s]\n"
           " 50%|█████     | 2/4 [00:00<00:00]\n")
    assert progress_of(log) == (13, 30)
    assert progress_of("[tunelab] step 3/8 reward 0.5") == (3, 8)
    assert progress_of("nothing yet") == (None, None)
    assert last_lines("a\rb\rc\n\nd\n", 2) == "c\nd"


def test_a_failing_job_leaves_its_exit_code_and_error_in_its_folder(tmp_path):
    job = start_job(tmp_path / "job", ["train", str(tmp_path / "missing.yaml")])
    deadline = time.time() + 60
    while job.is_running() and time.time() < deadline:
        time.sleep(0.2)
    later = Job(tmp_path / "job")  # another board, reading the same folder
    status = later.status()
    assert status.state == "failed" and status.exit_code == 2
    assert "missing.yaml" in status.log_tail


def test_a_job_trains_to_the_end_and_is_listed_with_its_curve(tmp_path, tiny_model_dir):
    output = tmp_path / "saves" / "tiny" / "lora" / "run"
    output.mkdir(parents=True)
    config = {"stage": "sft", "do_train": True, "model_name_or_path": str(tiny_model_dir), "template": "chatml",
              "dataset": "alpaca_demo", "dataset_dir": str(REPO / "data"), "output_dir": str(output), "max_steps": 6,
              "logging_steps": 2, "cutoff_len": 64, "learning_rate": 0.01, "report_to": "none", "max_samples": 40}
    (output / "run_config.yaml").write_text(yaml.safe_dump(config))
    job = start_job(output, ["train", str(output / "run_config.yaml")])
    deadline = time.time() + 180
    while job.is_running() and time.time() < deadline:
        time.sleep(0.5)
    status = job.status()
    assert status.state == "finished", status.log_tail
    assert (status.step, status.total) == (6, 6)
    (run,) = find_runs(tmp_path / "saves")
    assert run.folder == output and run.status == "finished" and run.stage == "sft" and run.step == 6
    table = curves({"run": output}, "loss")
    assert list(table["step"]) == [2, 4, 6] and set(table["series"]) == {"train"}
    assert set(curves({"a": output, "b": output}, "loss")["series"]) == {"a: train", "b: train"}


def test_board_files_do_not_make_an_output_dir_busy(tmp_path, tiny_model_dir):
    for name in BOARD_FILES:
        (tmp_path / name).write_text("x")
    config = load_config({"model_name_or_path": str(tiny_model_dir), "do_train": True, "dataset": "alpaca_demo",
                          "dataset_dir": str(REPO / "data"), "output_dir": str(tmp_path)})
    assert prepare_output_dir(config) is None  # a fresh start, not "holds other files"
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="output_dir"):
        prepare_output_dir(config)


# -- starting the board ------------------------------------------------------------------------------------------------

def test_logins_are_read_from_a_setting_or_a_file(tmp_path):
    assert read_logins("me:s3cret:with:colons") == [("me", "s3cret:with:colons")]
    path = tmp_path / "logins"
    path.write_text("# team\nann:one\n\nbob:two\n")
    assert read_logins(str(path)) == [("ann", "one"), ("bob", "two")]
    path.write_text("ann:one\nbob\n")
    with pytest.raises(ConfigError, match=f"{path}:2: expected `user:password`"):
        read_logins(str(path))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_board_imports_no_model_code_to_start(tmp_path):
    pytest.importorskip("gradio")
    probe = ("import sys; from pathlib import Path; from tunelab.webui.page import build_board; "
             f"build_board(Path({str(tmp_path)!r})); "
             "print(sorted(m for m in ('torch', 'transformers', 'peft', 'datasets') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_on_all_interfaces_the_board_needs_a_login(tmp_path):
    pytest.importorskip("gradio")
    env = {**os.environ, "GRADIO_SERVER_NAME": "0.0.0.0", "TUNELAB_SAVES_DIR": str(tmp_path / "saves")}
    env.pop("TUNELAB_WEBUI_AUTH", None)
    refused = subprocess.run([sys.executable, "-m", "tunelab", "webui"], env=env, capture_output=True, text=True,
                             timeout=60)
    assert refused.returncode == 2
    assert "TUNELAB_WEBUI_AUTH" in refused.stderr and "0.0.0.0" in refused.stderr

    port = _free_port()
    env |= {"TUNELAB_WEBUI_AUTH": "ann:s3cret", "GRADIO_SERVER_PORT": str(port)}
    board = subprocess.Popen([sys.executable, "-m", "tunelab", "webui"], env=env, cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f"{url}/config", timeout=2)
                pytest.fail("the board answered /config without a login")
            except urllib.error.HTTPError as err:
                assert err.code == 401
                break
            except OSError:
                assert board.poll() is None and time.time() < deadline, "the board did not start"
                time.sleep(0.3)
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
        with pytest.raises(urllib.error.HTTPError):
            opener.open(f"{url}/login", urllib.parse.urlencode({"username": "ann", "password": "wrong"}).encode())
        opener.open(f"{url}/login", urllib.parse.urlencode({"username": "ann", "password": "s3cret"}).encode())
        config = json.loads(opener.open(f"{url}/config").read())
        assert config["components"]
    finally:
        board.terminate()
        board.wait(10)
