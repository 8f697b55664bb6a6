"""Bad vision-language inputs: each is refused or skipped with a message naming the dataset, the sample and the file,
before any model loads (or, for a file that changes after tokenizing, when its batch is built).

    .venv/bin/python -m pytest tests/data/test_multimodal_errors.py -q
"""

import json
import logging
import shutil

import pytest
from helpers import LF_DATA, TOKENIZERS

from tunelab.config import load_config
from tunelab.data import DataCollator, DataError, get_template, load_datasets
from tunelab.data.media import VISION_FAMILIES, MediaLimits, MediaProcessor

DEMO = LF_DATA / "mllm_demo_data"
FOLDER = TOKENIZERS / "qwen2.5-vl-instruct"
pytestmark = pytest.mark.skipif(not (DEMO.is_dir() and FOLDER.is_dir()),
                                reason="../shared/lf_data and ../shared/tokenizers/qwen2.5-vl-instruct are needed")
TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(FOLDER)


@pytest.fixture(scope="module")
def media(tokenizer):
    from transformers import Qwen2VLImageProcessorPil

    return MediaProcessor(VISION_FAMILIES["qwen2_5_vl"], Qwen2VLImageProcessorPil.from_pretrained(FOLDER), tokenizer,
                          MediaLimits())


def dataset_dir(tmp_path, samples: list[dict], files: dict | None = None):
    """A dataset_dir holding dataset `d` (openai-style messages, every other key of its samples a column) and the
    named media files (their bytes, or a function giving them)."""
    folder = tmp_path / "data"
    (folder / "media").mkdir(parents=True, exist_ok=True)
    for name, content in (files or {}).items():
        (folder / "media" / name).write_bytes(content() if callable(content) else content)
    (folder / "d.json").write_text(json.dumps(samples, indent=1))
    columns = {key for row in samples for key in row}
    info = {"file_name": "d.json", "formatting": "sharegpt", "tags": TAGS,
            "columns": {column: column for column in sorted(columns)}}
    (folder / "dataset_info.json").write_text(json.dumps({"d": info}))
    return folder


def sample(text: str, **media) -> dict:
    return {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "An answer."}], **media}


def config(folder, tmp_path, model=FOLDER, **keys):
    return load_config({"model_name_or_path": str(model), "dataset_dir": str(folder), "dataset": "d",
                        "cache_dir": str(tmp_path / "cache"), "template": "qwen2_vl", "cutoff_len": 1024, **keys})


def load(cfg, tokenizer, media):
    return load_datasets(cfg, tokenizer, get_template(cfg, tokenizer), media=media)


def jpg() -> bytes:
    return (DEMO / "1.jpg").read_bytes()


GOOD = sample("<image>What is this?", images=["media/ok.jpg"])
SAMPLE_1 = r"d.json, sample 1 \(line \d+\)"


#: case -> (the bad sample, files, the rule it breaks, what the message says about it)
SKIPPED = {
    "a missing image": (sample("<image>Hm?", images=["media/gone.jpg"]), {},
                        "media file not found", r"media/gone.jpg"),
    "a file that is no image": (sample("<image>Hm?", images=["media/bad.jpg"]), {"bad.jpg": b"not an image"},
                                "unreadable media", r"media/bad.jpg: not an image PIL can read"),
    "a truncated image": (sample("<image>Hm?", images=["media/cut.jpg"]), {"cut.jpg": lambda: jpg()[:3000]},
                          "unreadable media", r"media/cut.jpg: the image cannot be decoded \(image file is truncated"),
    "a corrupt video": (sample("<video>Hm?", videos=["media/bad.mp4"]), {"bad.mp4": b"\0" * 64},
                        "unreadable media", r"media/bad.mp4: not a video PyAV can read"),
    "a remote image": (sample("<image>Hm?", images=["https://example.com/a.jpg"]), {},
                       "unreadable media", r"https://example.com/a.jpg: remote files are not fetched"),
    "more placeholders than images": (sample("<image><image>Hm?", images=["media/ok.jpg"]), {},
                                      "placeholder count mismatch", r"2 <image> in the text, 1 images"),
    "fewer placeholders than images": (sample("Hm?", images=["media/ok.jpg"]), {},
                                       "placeholder count mismatch", r"0 <image> in the text, 1 images"),
}


@pytest.mark.parametrize("case", sorted(SKIPPED))
def test_a_bad_sample_is_skipped_with_its_file_named_and_strict_data_refuses_it(case, tmp_path, tokenizer, media,
                                                                                caplog):
    if "video" in case:
        pytest.importorskip("av")
    bad, files, rule, detail = SKIPPED[case]
    folder = dataset_dir(tmp_path, [GOOD, bad], {"ok.jpg": jpg, **files})
    caplog.set_level(logging.WARNING, logger="tunelab.data")
    splits = load(config(folder, tmp_path), tokenizer, media)
    assert len(splits.train) == 1 and splits.train[0]["images"] == [str(folder / "media/ok.jpg")]
    (report,) = splits.reports
    assert list(report.validation.skipped) == [rule]
    assert f"1 skipped: {rule} (first at" in caplog.text and str(folder / "d.json") in caplog.text
    with pytest.raises(DataError, match=rf"dataset 'd': .*{SAMPLE_1}: {rule}: .*{detail}"):
        load(config(folder, tmp_path, strict_data=True, overwrite_cache=True), tokenizer, media)


#: case -> (samples, files, config keys, what the refusal says)
REFUSED = {
    "audio": ([GOOD, sample("<audio>What is that sound?", audios=[str(DEMO / "1.mp3")])], {}, {},
              rf"dataset 'd': .*{SAMPLE_1} has audio \(.*1.mp3\): tunelab cannot train on audio yet"),
    "images for stage kto": ([{**GOOD, "kto_tag": True}], {}, {"stage": "kto"},
                             r"sample 0 \(line 2\) has images \(.*ok.jpg\), which stage kto cannot take yet"),
    "images for stage ppo": ([GOOD], {}, {"stage": "ppo", "reward_model": "unused"},
                             r"sample 0 \(line 2\) has images \(.*ok.jpg\), which stage ppo cannot take yet"),
    "packing": ([GOOD], {}, {"packing": True}, r"`packing` and `neat_packing` cannot pack the samples of a "
                                               r"vision-language model"),
    "padding_free": ([GOOD], {}, {"padding_free": True}, r"`padding_free` cannot batch the samples of a "
                                                         r"vision-language model"),
    "streaming": ([GOOD], {}, {"streaming": True, "max_steps": 10},
                  r"`streaming` cannot feed a vision-language model yet"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_what_cannot_train_at_all_is_refused_before_any_model_loads(case, tmp_path, tokenizer, media):
    samples, files, keys, message = REFUSED[case]
    folder = dataset_dir(tmp_path, samples, {"ok.jpg": jpg, **files})
    with pytest.raises(DataError, match=message):
        load(config(folder, tmp_path, **keys), tokenizer, media)


def test_images_for_a_text_only_model_are_refused_naming_its_model_type(tmp_path, tokenizer):
    model = tmp_path / "llama"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    folder = dataset_dir(tmp_path, [GOOD], {"ok.jpg": jpg()})
    with pytest.raises(DataError, match=r"sample 0 \(line 2\) has images \(.*media/ok.jpg\), but the model .*llama is "
                                        r"not a vision-language model tunelab can feed \(its model_type is 'llama'; "
                                        r"tunelab feeds qwen2_vl, qwen2_5_vl\)"):
        load(config(folder, tmp_path, model=model), tokenizer, None)


def test_videos_without_pyav_name_the_extra_to_install(tmp_path, tokenizer, media, monkeypatch):
    import tunelab.data.media.checks as checks

    monkeypatch.setattr(checks, "has_pyav", lambda: False)
    folder = dataset_dir(tmp_path, [sample("<video>Hm?", videos=[str(DEMO / "1.mp4")])])
    with pytest.raises(DataError, match=r"sample 0 \(line 2\) has videos \(.*1.mp4\), which need PyAV to decode: "
                                        r"pip install 'tunelab\[video\]'"):
        load(config(folder, tmp_path), tokenizer, media)


def test_media_paths_start_at_media_dir_when_it_is_set(tmp_path, tokenizer, media):
    elsewhere = tmp_path / "pictures"
    (elsewhere / "media").mkdir(parents=True)
    shutil.copy(DEMO / "1.jpg", elsewhere / "media" / "ok.jpg")
    folder = dataset_dir(tmp_path, [GOOD])   # no media/ok.jpg beside the data
    splits = load(config(folder, tmp_path, media_dir=str(elsewhere)), tokenizer, media)
    assert splits.train[0]["images"] == [str(elsewhere / "media" / "ok.jpg")]


def test_an_image_replaced_after_tokenizing_is_named_when_its_batch_is_built(tmp_path, tokenizer, media):
    folder = dataset_dir(tmp_path, [GOOD], {"ok.jpg": jpg()})
    splits = load(config(folder, tmp_path), tokenizer, media)
    shutil.copy(DEMO / "2.jpg", folder / "media" / "ok.jpg")   # 300 x 199 instead of 300 x 168: more tokens
    with pytest.raises(DataError, match=r"images .*media/ok.jpg was tokenized with 66 image tokens, but the files make "
                                        r"77 now: .*`overwrite_cache: true`"):
        DataCollator(tokenizer, media=media)([splits.train[0]])
    (folder / "media" / "ok.jpg").write_bytes(b"gone bad")
    with pytest.raises(DataError, match=r"media/ok.jpg: not an image PIL can read"):
        DataCollator(tokenizer, media=media)([splits.train[0]])
