"""After vision-language training: a run's folder and `tunelab export` keep the processor files, and the merged
export of a LoRA-trained Qwen2-VL / Qwen2.5-VL computes what the trained model computed, loaded by plain transformers.

    .venv/bin/python -m pytest tests/model/test_vision_language_export.py -q      # about 15 s on 2 CPU cores

The reference is transformers' own `AutoModelForImageTextToText` on the export folder, fed a batch built here from
the demo image with the folder's own image processor.
"""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoTokenizer, Qwen2VLImageProcessorPil

from tunelab.config import load_config
from tunelab.model import load_model, load_tokenizer
from tunelab.model.export import MARKER, export_model
from tunelab.model.processor_files import copy_processor_files
from helpers import train_steps
from vl_inputs import image_batch

FAMILIES = ["tiny_qwen2_vl_dir", "tiny_qwen2_5_vl_dir"]


@pytest.fixture(scope="module", params=FAMILIES)
def trained_run(request, tmp_path_factory):
    """(base folder, run folder, logits of the trained model): a LoRA run on the demo image, saved as a training run
    saves its output_dir (adapter, tokenizer, processor files)."""
    base = request.getfixturevalue(request.param)
    config = load_config({"model_name_or_path": str(base), "finetuning_type": "lora", "template": "qwen2_vl"})
    tokenizer = load_tokenizer(config)
    torch.manual_seed(0)
    model = load_model(config, tokenizer)
    batch = image_batch(base)
    losses = train_steps(model, batch, steps=3)
    assert losses[-1] < losses[0] - 0.5, losses
    run = tmp_path_factory.mktemp("run")
    model.save_pretrained(run)
    tokenizer.save_pretrained(run)
    copy_processor_files(config, run)
    model.eval()
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    return base, run, logits


def test_the_merged_export_loads_in_transformers_and_computes_the_trained_logits(trained_run, tmp_path):
    base, run, trained_logits = trained_run
    out = export_model(load_config({"model_name_or_path": str(base), "adapter_name_or_path": str(run),
                                    "template": "qwen2_vl", "export_dir": str(tmp_path / "export")}))
    merged = AutoModelForImageTextToText.from_pretrained(out)
    untrained = AutoModelForImageTextToText.from_pretrained(base)
    inputs = {k: v for k, v in image_batch(out).items() if k != "labels"}
    with torch.no_grad():
        got, before = merged(**inputs).logits, untrained(**inputs).logits
    torch.testing.assert_close(got, trained_logits, atol=1e-5, rtol=1e-5)
    assert (got - before).abs().max() > 0.1, "training must have changed the outputs"

    # A model folder again: its processor files, the tokenizer's chat template, loadable by tunelab itself.
    assert (out / "preprocessor_config.json").read_bytes() == (base / "preprocessor_config.json").read_bytes()
    assert (out / "chat_template.jinja").is_file() and not (out / "chat_template.json").exists()
    assert "preprocessor_config.json" in json.loads((out / MARKER).read_text())["files"]
    assert AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("<|image_pad|>") == merged.config.image_token_id
    reloaded = load_model(load_config({"model_name_or_path": str(out)}), AutoTokenizer.from_pretrained(out),
                          trainable=False)
    assert type(reloaded) is type(merged)


def test_a_run_folder_gets_the_base_processor_files(trained_run):
    base, run, _ = trained_run
    assert (run / "preprocessor_config.json").read_bytes() == (base / "preprocessor_config.json").read_bytes()
    assert Qwen2VLImageProcessorPil.from_pretrained(run).to_dict() == \
        Qwen2VLImageProcessorPil.from_pretrained(base).to_dict()


def test_processor_files_come_from_the_last_adapter_folder_first(tiny_qwen2_vl_dir, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    settings = json.loads((tiny_qwen2_vl_dir / "preprocessor_config.json").read_text())
    (adapter / "preprocessor_config.json").write_text(json.dumps({**settings, "max_pixels": 200704}))
    out = tmp_path / "out"
    out.mkdir()
    config = load_config({"model_name_or_path": str(tiny_qwen2_vl_dir), "adapter_name_or_path": str(adapter)})
    assert copy_processor_files(config, out) == ["preprocessor_config.json"]
    assert json.loads((out / "preprocessor_config.json").read_text())["max_pixels"] == 200704

    shutil.rmtree(adapter)
    adapter.mkdir()
    assert copy_processor_files(config, out) == ["preprocessor_config.json"]
    assert (out / "preprocessor_config.json").read_bytes() == \
        (tiny_qwen2_vl_dir / "preprocessor_config.json").read_bytes()


def test_a_text_model_has_no_processor_files(tiny_model_dir, tmp_path):
    assert copy_processor_files(load_config({"model_name_or_path": str(tiny_model_dir)}), tmp_path) == []
    assert list(tmp_path.iterdir()) == []
