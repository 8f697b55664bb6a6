"""Vision-language fine-tuning end to end: the seed guide's Qwen2.5-VL config trains through the CLI on tiny random
Qwen2-VL / Qwen2.5-VL models (real tokenizers and processors from ../shared/tokenizers) and LLaMA-Factory's demo data,
with images, videos and text-only samples mixed; and a mixed batch scores each sample as it scores alone.
"""

import json
import subprocess
import sys

import pytest
import torch
from helpers import LF_DATA, losses, read_log
from safetensors.torch import load_file

import tunelab
from tunelab.config import load_config
from tunelab.data import DataCollator, load_datasets, load_media_processor, prepare_template
from tunelab.model import load_model, load_tokenizer

pytestmark = pytest.mark.skipif(not LF_DATA.is_dir(), reason="../shared/lf_data (LLaMA-Factory's demo data) is absent")

#: The multimodal YAML of the user's second seed document, its keys and values as written there.
SEED_VL_YAML = """\
model_name_or_path: Qwen/Qwen2.5-VL-7B-Instruct
image_max_pixels: 262144
video_max_pixels: 16384
trust_remote_code: true
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all
dataset: mllm_demo,identity,alpaca_en_demo
template: qwen2_vl
cutoff_len: 2048
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 16
dataloader_num_workers: 4
output_dir: saves/qwen2_5vl-7b/lora/sft
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true
save_only_model: false
report_to: none
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000
val_size: 0.1
per_device_eval_batch_size: 1
eval_strategy: steps
eval_steps: 500
"""


def seed_config_file(tmp_path, model_dir, out):
    """The seed YAML with only the model and the data folder pointed at local files."""
    text = (SEED_VL_YAML.replace("Qwen/Qwen2.5-VL-7B-Instruct", str(model_dir))
            .replace("saves/qwen2_5vl-7b/lora/sft", str(out))
            .replace("dataset: mllm_demo,identity,alpaca_en_demo",
                     f"dataset: mllm_demo,identity,alpaca_en_demo\ndataset_dir: {LF_DATA}"))
    path = tmp_path / "qwen2_5vl_lora_sft.yaml"
    path.write_text(text)
    return path


def train_cli(path, *overrides):
    result = subprocess.run([sys.executable, "-m", "tunelab", "train", str(path), *overrides], capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]


def test_the_seed_vision_language_yaml_trains_unchanged(tiny_qwen2_5_vl_dir, tmp_path):
    out = tmp_path / "saves"
    # On the command line, to keep the test short: a step cap, fewer samples per dataset (mllm_demo has 6 in all),
    # and a learning rate at which a random 64-wide model with a 151k vocabulary moves within 12 steps.
    train_cli(seed_config_file(tmp_path, tiny_qwen2_5_vl_dir, out), "max_steps=12", "logging_steps=3",
              "eval_steps=6", "max_samples=40", "learning_rate=5e-2", "gradient_accumulation_steps=4",
              "warmup_ratio=0")
    values = losses(out)
    # A random model starts near ln(151k) = 11.9 on every sample, so samples barely differ (by a few hundredths
    # averaged over a logged step's 12 samples): a fall of 0.25 is learning. The loss is the mean over the trained
    # tokens of each accumulated batch (Qwen2.5-VL's own loss would average each micro-batch instead), under which
    # this run falls by about 0.38.
    assert len(values) == 4 and values[-1] < values[0] - 0.25, values
    assert any("eval_loss" in record for record in read_log(out))
    for name in ("adapter_model.safetensors", "preprocessor_config.json", "training_loss.png", "checkpoint-12"):
        assert (out / name).exists(), name
    adapter = load_file(out / "adapter_model.safetensors")
    assert adapter and not [key for key in adapter if "visual" in key], "the frozen vision tower got an adapter"


def test_a_video_dataset_trains(tiny_qwen2_vl_dir, tmp_path):
    out = tmp_path / "video"
    tunelab.train({"model_name_or_path": str(tiny_qwen2_vl_dir), "stage": "sft", "do_train": True,
                   "finetuning_type": "lora", "dataset": "mllm_video_demo", "dataset_dir": str(LF_DATA),
                   "template": "qwen2_vl", "video_max_pixels": 16384, "video_maxlen": 4, "output_dir": str(out),
                   "per_device_train_batch_size": 2, "learning_rate": 5e-3, "max_steps": 8, "logging_steps": 2,
                   "lr_scheduler_type": "constant", "report_to": "none", "save_steps": 100})
    values = losses(out)
    assert values[-1] < values[0] - 1.0, values   # from about ln(151k) = 11.9, falling every logged step


@pytest.mark.parametrize("fixture", ["tiny_qwen2_vl_dir", "tiny_qwen2_5_vl_dir"])
def test_a_mixed_batch_gives_each_sample_its_own_loss(fixture, request):
    """Image, video and text-only samples in one padded batch score exactly as each does alone."""
    model_dir = request.getfixturevalue(fixture)
    config = load_config({"model_name_or_path": str(model_dir), "stage": "sft", "do_train": True,
                          "dataset": "mllm_demo,mllm_video_demo,identity", "dataset_dir": str(LF_DATA),
                          "template": "qwen2_vl", "max_samples": 2, "video_max_pixels": 16384, "video_maxlen": 4,
                          "output_dir": "unused"})
    tokenizer = load_tokenizer(config)
    media = load_media_processor(config, tokenizer)
    rows = load_datasets(config, tokenizer, prepare_template(config, tokenizer), media=media).train
    kinds = {"image": None, "video": None, "text": None}
    for row in rows:
        kind = "image" if row["images"] else "video" if row["videos"] else "text"
        kinds[kind] = kinds[kind] or row
    assert all(kinds.values()), "the datasets give an image, a video and a text-only sample"
    collator = DataCollator(tokenizer, media=media)
    model = load_model(config, tokenizer, trainable=False).eval()

    def per_sample_losses(batch):
        labels = batch.pop("labels")
        with torch.no_grad():
            logits = model(**batch).logits.float()
        token_losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:],
                                                         reduction="none", ignore_index=-100)
        return (token_losses.sum(-1) / (labels[:, 1:] != -100).sum(-1)).tolist()

    together = per_sample_losses(collator(list(kinds.values())))
    alone = [per_sample_losses(collator([row]))[0] for row in kinds.values()]
    assert together == pytest.approx(alone, abs=1e-5)
    batch = collator(list(kinds.values()))
    assert {"pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "mm_token_type_ids"} <= set(
        batch)


def image_preference_data(folder):
    """Six preference pairs about LLaMA-Factory's demo images; the files are read from media_dir."""
    pairs = [{"conversations": [{"from": "human", "value": f"<image>Describe picture {i % 3 + 1}."}],
              "chosen": {"from": "gpt", "value": "A clear and accurate description."},
              "rejected": {"from": "gpt", "value": "no"},
              "images": [f"mllm_demo_data/{i % 3 + 1}.jpg"]} for i in range(6)]
    (folder / "image_pairs.json").write_text(json.dumps(pairs))
    (folder / "dataset_info.json").write_text(json.dumps({"image_pairs": {
        "file_name": "image_pairs.json", "formatting": "sharegpt", "ranking": True,
        "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected", "images": "images"}}}))
    return folder


@pytest.mark.parametrize("stage", ["rm", "dpo"])
def test_image_preference_pairs_train_rm_and_dpo(stage, tiny_qwen2_vl_dir, tmp_path):
    out = tmp_path / stage
    tunelab.train({"model_name_or_path": str(tiny_qwen2_vl_dir), "stage": stage, "do_train": True,
                   "finetuning_type": "lora", "dataset": "image_pairs",
                   "dataset_dir": str(image_preference_data(tmp_path)), "media_dir": str(LF_DATA),
                   "template": "qwen2_vl", "image_max_pixels": 65536, "output_dir": str(out),
                   "per_device_train_batch_size": 2, "learning_rate": 1e-2, "max_steps": 9, "logging_steps": 1,
                   "lr_scheduler_type": "constant", "report_to": "none", "save_steps": 100})
    records = [r for r in read_log(out) if "loss" in r]
    if stage == "dpo":  # the policy starts as its own reference: log 2 exactly
        assert records[0]["loss"] == pytest.approx(0.6931, abs=1e-3)
    assert records[-1]["loss"] < 0.5 * records[0]["loss"], records
    assert records[-1]["rewards/accuracies"] == 1.0
