"""The Evaluate & Predict tab: generate replies for an evaluation set and score them (BLEU, ROUGE), or run a
multiple-choice benchmark (`tunelab eval`); both run as jobs, like training."""

import json
from pathlib import Path
from typing import Any

import gradio as gr

from tunelab.training.output_dir import RUN_CONFIG
from tunelab.webui import models
from tunelab.webui.board import REFRESH_SECONDS, Board, status_markdown
from tunelab.webui.locales import text
from tunelab.webui.runs import read_config
from tunelab.webui.tab_train import write_yaml

PREDICTIONS = "generated_predictions.jsonl"
PREDICT_RESULTS = "predict_results.json"
SCORES = "results.json"
#: Rows of the predictions table.
SHOWN_PREDICTIONS = 50


def build(board: Board) -> None:
    with gr.Row():
        dataset = board.t(gr.Dropdown(choices=[], multiselect=True, allow_custom_value=True, scale=2,
                                      label=text("predict_dataset", "en"), elem_id="tl-predict-dataset"),
                          "predict_dataset")
        folder = board.t(gr.Textbox(label=text("predict_dir", "en"), elem_id="tl-predict-dir", scale=2),
                         "predict_dir")
        predict = board.t(gr.Button(text("predict", "en"), variant="primary", elem_id="tl-predict", scale=1),
                          "predict", "value")
    board.section("evaluation", keys_per_row=6, open=True)
    benchmark = board.t(gr.Button(text("run_benchmark", "en"), elem_id="tl-run-benchmark"), "run_benchmark",
                        "value")
    message = gr.Markdown(elem_id="tl-eval-message")
    status = gr.Markdown(elem_id="tl-eval-status")
    results = board.t(gr.JSON(label=text("results", "en"), elem_id="tl-eval-results"), "results")
    table = board.t(gr.Dataframe(headers=["prompt", "predict", "label"], label=text("predictions", "en"),
                                 elem_id="tl-predictions", wrap=True), "predictions")

    def wire() -> None:
        def on_open(dataset_dir: str, model: str, method: str) -> tuple[Any, str]:
            return (gr.update(choices=board.dataset_choices(dataset_dir)[0]),
                    models.new_run_folder(board.saves, model, method, kind="predict"))

        board.loaders.append((on_open, [board.widgets[k] for k in ("dataset_dir", "model_name_or_path",
                                                                    "finetuning_type")], [dataset, folder]))

        def on_predict(names: list[str], output: str, *args: Any) -> list[Any]:
            config, error, updates = board.checked(
                args, eval_dataset=names or None, output_dir=output or None, do_train=False, do_predict=True,
                predict_with_generate=True, dataset=None, val_size=None, do_eval=None, eval_strategy=None)
            if config is None:
                return [f"⚠ {error}", *updates]
            target = Path(output)
            if target.is_dir() and any(target.iterdir()):
                return [f"⚠ {target} already holds files; choose a new prediction folder", *updates]
            target.mkdir(parents=True, exist_ok=True)
            write_yaml(target / RUN_CONFIG, config)
            refusal = board.start("predict", target, ["train", str(target / RUN_CONFIG)])
            return [f"⚠ {refusal}" if refusal else f"predicting into {target}", *updates]

        def on_benchmark(*args: Any) -> list[Any]:
            job_folder = Path(models.new_run_folder(board.saves, *_model_and_method(board, args), kind="eval"))
            # A benchmark reads its own questions: the training data keys do not apply.
            config, error, updates = board.checked(args, dataset=None, eval_dataset=None, val_size=None)
            if config is not None and not config.get("task"):
                config, error = None, "`task` is required: the benchmark and split, e.g. mmlu_test or sample_test"
            if config is None:
                return [f"⚠ {error}", *updates]
            config.setdefault("save_dir", str(job_folder / "scores"))
            job_folder.mkdir(parents=True, exist_ok=True)
            write_yaml(job_folder / RUN_CONFIG, config)
            refusal = board.start("eval", job_folder, ["eval", str(job_folder / RUN_CONFIG)])
            return [f"⚠ {refusal}" if refusal else f"scoring into {config['save_dir']}", *updates]

        def on_tick(lang: str) -> list[Any]:
            job_status = board.status_of("predict", "eval")
            if job_status is None:
                return [status_markdown(None, lang), gr.update(), gr.update()]
            job_folder = board.job.folder
            if board.job_kind == "eval":
                scores = Path(read_config(job_folder).get("save_dir", "")) / SCORES
                return [status_markdown(job_status, lang), _read_json(scores), gr.update()]
            return [status_markdown(job_status, lang), _read_json(job_folder / PREDICT_RESULTS),
                    _predictions(job_folder / PREDICTIONS)]

        marks = list(board.widgets.values())
        predict.click(on_predict, [dataset, folder, *board.inputs], [message, *marks])
        benchmark.click(on_benchmark, board.inputs, [message, *marks])
        monitor = [status, results, table]
        gr.Timer(REFRESH_SECONDS).tick(on_tick, board.lang, monitor)
        board.loaders.append((on_tick, [board.lang], monitor))

    board.after_layout.append(wire)


def _model_and_method(board: Board, args: tuple) -> tuple[str, str]:
    values = dict(zip(board.widgets, args))
    return values["model_name_or_path"], values["finetuning_type"]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
    except json.JSONDecodeError:
        return None


def _predictions(path: Path) -> Any:
    if not path.exists():
        return gr.update()
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines()[:SHOWN_PREDICTIONS]:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break
        rows.append([record.get("prompt", ""), record.get("predict", ""), record.get("label", "")])
    return rows
