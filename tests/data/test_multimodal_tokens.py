"""Vision-language samples through tokenizing and batching: parity with the real tokenizers' chat templates, masks,
cutoff_len, mixed batches, preference pairs and the preview.

    .venv/bin/python -m pytest tests/data/test_multimodal_tokens.py -q

The reference for the token ids is the Qwen2-VL and Qwen2.5-VL tokenizers' own `apply_chat_template` on messages
whose content is a list of image, video and text parts (as their processors take them). Those templates write one
pad token per image or video; each is expanded here to the count LLaMA-Factory's rule gives (test_multimodal_media
checks those counts against an independent computation).
"""

import json
import re

import pytest
import torch
from helpers import LF_DATA, TOKENIZERS

from tunelab.config import load_config
from tunelab.data import DataCollator, DataError, PairwiseCollator, get_template, load_datasets, preview
from tunelab.data.media import VISION_FAMILIES, MediaLimits, MediaProcessor
from tunelab.data.processing import IGNORE_INDEX

DEMO = LF_DATA / "mllm_demo_data"
FOLDERS = {"qwen2_vl": TOKENIZERS / "qwen2-vl-instruct", "qwen2_5_vl": TOKENIZERS / "qwen2.5-vl-instruct"}
pytestmark = pytest.mark.skipif(not (DEMO.is_dir() and all(f.is_dir() for f in FOLDERS.values())),
                                reason="needs ../shared/lf_data and the Qwen-VL tokenizers in ../shared/tokenizers")


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


#: name -> (messages, images, videos): placeholders at the start, the end and the middle of turns.
CONVERSATIONS = {
    "an image per turn": ([user("<image>Who are they?"), assistant("They're Kane and Gretzka."),
                           user("What are they doing?<image>"), assistant("Celebrating.")], ["1.jpg", "1.jpg"], []),
    "a video and an image in one turn": ([user("<video>What happens? And here: <image> ?"), assistant("A baby reads.")],
                                         ["3.jpg"], ["1.mp4"]),
    "two videos": ([user("Compare <video> with <video>."), assistant("The second is shorter.")], [],
                   ["2.avi", "4.mp4"]),
    "text only": ([user("Hi"), assistant("Hello!")], [], []),
}


@pytest.fixture(scope="module")
def tokenizers():
    from transformers import AutoTokenizer

    return {name: AutoTokenizer.from_pretrained(folder) for name, folder in FOLDERS.items()}


@pytest.fixture(scope="module")
def medias(tokenizers):
    from transformers import Qwen2VLImageProcessorPil

    return {name: MediaProcessor(VISION_FAMILIES[name], Qwen2VLImageProcessorPil.from_pretrained(FOLDERS[name]),
                                 tokenizers[name], MediaLimits())
            for name in FOLDERS}


def reference_ids(tokenizer, messages: list[dict], image_tokens: list[int], video_tokens: list[int]) -> list[int]:
    """The tokenizer's own template on structured content, each single pad token expanded to its count."""
    structured = []
    for message in messages:
        parts = [{"type": "image"} if piece == "<image>" else {"type": "video"} if piece == "<video>"
                 else {"type": "text", "text": piece} for piece in re.split("(<image>|<video>)", message["content"])
                 if piece]
        structured.append({"role": message["role"], "content": parts})
    text = tokenizer.apply_chat_template(structured, tokenize=False)
    ids = tokenizer.encode(text, add_special_tokens=False)
    counts = {tokenizer.convert_tokens_to_ids("<|image_pad|>"): iter(image_tokens),
              tokenizer.convert_tokens_to_ids("<|video_pad|>"): iter(video_tokens)}
    return [expanded for i in ids for expanded in ([i] * next(counts[i]) if i in counts else [i])]


def our_ids(media, tokenizer, template, messages, images, videos) -> tuple[list[int], list[int], list[int]]:
    image_tokens = [media.image_tokens(str(DEMO / name)) for name in images]
    video_tokens = [media.plan_video(str(DEMO / name)).tokens for name in videos]
    pairs = template.encode_turns(tokenizer, media.expand(messages, image_tokens, video_tokens))
    return [i for prompt, reply in pairs for i in prompt + reply], image_tokens, video_tokens


@pytest.mark.parametrize("template_name", ["qwen2_vl", None])   # the table template, and the tokenizer's own
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("name", sorted(FOLDERS))
def test_vision_conversations_tokenize_as_the_official_template(name, conversation, template_name, tokenizers, medias):
    pytest.importorskip("av")
    tokenizer = tokenizers[name]
    template = get_template(load_config({"model_name_or_path": "m", "template": template_name}), tokenizer)
    messages, images, videos = CONVERSATIONS[conversation]
    ids, image_tokens, video_tokens = our_ids(medias[name], tokenizer, template, messages, images, videos)
    assert ids == reference_ids(tokenizer, messages, image_tokens, video_tokens)
    assert medias[name].blocks(ids) == (image_tokens, video_tokens)


# ---------------------------------------------------------------- through the loader


def vl_config(tmp_path, dataset: str, dataset_dir=LF_DATA, **keys):
    return load_config({"model_name_or_path": str(FOLDERS["qwen2_5_vl"]), "dataset_dir": str(dataset_dir),
                        "dataset": dataset, "cache_dir": str(tmp_path / "cache"), "template": "qwen2_vl",
                        "cutoff_len": 2048, **keys})


def load(config, tokenizers, medias, name="qwen2_5_vl"):
    tokenizer = tokenizers[name]
    own = tokenizer.chat_template
    template = get_template(config, tokenizer)
    template.prepare_tokenizer(tokenizer)
    try:
        return load_datasets(config, tokenizer, template, media=medias[name]), tokenizer
    finally:
        tokenizer.chat_template = own  # the references render with the tokenizer's own template


def test_loaded_rows_equal_the_official_template_and_never_train_vision_tokens(tmp_path, tokenizers, medias):
    config = vl_config(tmp_path, "mllm_demo", train_on_prompt=True)
    splits, tokenizer = load(config, tokenizers, medias)
    row = splits.train[0]
    messages, images, _ = CONVERSATIONS["an image per turn"]
    demo = json.loads((LF_DATA / "mllm_demo.json").read_text())[0]
    assert [m["content"] for m in demo["messages"]][::2] == ["<image>Who are they?", "What are they doing?<image>"]
    image_tokens = [medias["qwen2_5_vl"].image_tokens(str(DEMO / "1.jpg"))] * 2
    assert row["input_ids"] == reference_ids(tokenizer, demo["messages"], image_tokens, [])
    assert row["images"] == [str(LF_DATA / p) for p in demo["images"]] and row["videos"] == []
    vision = medias["qwen2_5_vl"].vision_ids
    # train_on_prompt trains every prompt token, but never a vision token.
    assert all((label == IGNORE_INDEX) == (i in vision) for i, label in zip(row["input_ids"], row["labels"]))


def test_a_sample_cutoff_len_would_cut_through_a_vision_block_is_skipped_and_named(tmp_path, tokenizers, medias):
    # Sample 0's second image sits in its second turn, which does not fit in 150 tokens: kept, its first turn would
    # show the model one image block for two images. Samples 1 and 2 fit whole.
    config = vl_config(tmp_path, "mllm_demo", cutoff_len=150, max_samples=3)
    splits, tokenizer = load(config, tokenizers, medias)
    (report,) = [r.validation for r in splits.reports]
    assert report.kept == 2 and list(report.skipped) == ["vision tokens cut by cutoff_len"]
    cut = report.skipped["vision tokens cut by cutoff_len"]
    assert cut.first.startswith(f"{LF_DATA / 'mllm_demo.json'}, sample 0 (line 2)")
    assert "do not fit" in cut.detail
    assert all(len(medias["qwen2_5_vl"].blocks(row["input_ids"])[0]) == len(row["images"]) for row in splits.train)
    with pytest.raises(DataError, match=r"mllm_demo.json, sample 0 \(line 2\): vision tokens cut by cutoff_len: .*"
                                        r"raise cutoff_len, or lower image_max_pixels"):
        load(vl_config(tmp_path, "mllm_demo", cutoff_len=150, max_samples=3, strict_data=True, overwrite_cache=True),
             tokenizers, medias)


@pytest.mark.parametrize("name", sorted(FOLDERS))
def test_images_videos_and_text_share_a_dataset_list_and_a_batch(name, tmp_path, tokenizers, medias):
    pytest.importorskip("av")
    config = vl_config(tmp_path, "mllm_demo,mllm_video_demo,identity", model_name_or_path=str(FOLDERS[name]))
    splits, tokenizer = load(config, tokenizers, medias, name)
    media = medias[name]
    train = splits.train
    assert len(train) == 6 + 3 + 91 and train.features["images"] == train.features["videos"]
    rows = [train[0], train[6], train[7], train[10]]   # two images; a video; a video; text only
    batch = DataCollator(tokenizer, media=media)(rows)
    expected = {"input_ids", "attention_mask", "labels", "pixel_values", "image_grid_thw", "pixel_values_videos",
                "video_grid_thw", "mm_token_type_ids"} | ({"second_per_grid_ts"} if name == "qwen2_5_vl" else set())
    assert set(batch) == expected
    image_tokens, video_tokens = [], []
    for row in rows:
        images, videos = media.blocks(row["input_ids"])
        image_tokens += images
        video_tokens += videos
    assert batch["image_grid_thw"].tolist() == [[1, 12, 22], [1, 12, 22]]             # 1.jpg twice: 66 tokens each
    assert (batch["image_grid_thw"].prod(-1) // 4).tolist() == image_tokens == [66, 66]
    assert (batch["video_grid_thw"].prod(-1) // 4).tolist() == video_tokens
    assert batch["pixel_values"].shape == (batch["image_grid_thw"].prod(-1).sum(), 1176)
    assert batch["pixel_values_videos"].shape == (batch["video_grid_thw"].prod(-1).sum(), 1176)
    types = batch["mm_token_type_ids"]
    assert types.shape == batch["input_ids"].shape and types.dtype == torch.long
    assert int((types == 1).sum()) == sum(image_tokens) and int((types == 2).sum()) == sum(video_tokens)
    assert not types[3].any() and not types[batch["attention_mask"] == 0].any()
    if name == "qwen2_5_vl":
        assert batch["second_per_grid_ts"].shape == (2,) and batch["second_per_grid_ts"].dtype == torch.float32
    text_only = DataCollator(tokenizer, media=media)([train[10], train[11]])
    assert set(text_only) == {"input_ids", "attention_mask", "labels", "mm_token_type_ids"}
    assert not text_only["mm_token_type_ids"].any()


def test_preference_pairs_show_both_sides_the_pairs_images(tmp_path, tokenizers, medias):
    folder = tmp_path / "data"
    folder.mkdir()
    rows = [{"conversations": [{"from": "human", "value": "<image>Who is he?"}],
             "chosen": {"from": "gpt", "value": "Thomas Muller."}, "rejected": {"from": "gpt", "value": "No idea."},
             "images": [str(DEMO / "2.jpg")]},
            {"conversations": [{"from": "human", "value": "Hi"}],
             "chosen": {"from": "gpt", "value": "Hello!"}, "rejected": {"from": "gpt", "value": "Go away."}}]
    (folder / "pairs.json").write_text(json.dumps(rows))
    (folder / "dataset_info.json").write_text(json.dumps({"pairs": {
        "file_name": "pairs.json", "formatting": "sharegpt", "ranking": True,
        "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected", "images": "images"}}}))
    splits, tokenizer = load(vl_config(tmp_path, "pairs", folder, stage="dpo"), tokenizers, medias)
    media = medias["qwen2_5_vl"]
    pair = splits.train[0]
    tokens = media.image_tokens(str(DEMO / "2.jpg"))
    assert media.blocks(pair["chosen_input_ids"]) == media.blocks(pair["rejected_input_ids"]) == ([tokens], [])
    batch = PairwiseCollator(tokenizer, media=media)([splits.train[0], splits.train[1]])
    assert batch["input_ids"].shape[0] == 4 and batch["image_grid_thw"].shape == (2, 3)   # chosen, then rejected
    assert (batch["mm_token_type_ids"] == 1).sum(-1).tolist() == [tokens, 0, tokens, 0]


def test_the_preview_says_how_many_tokens_each_image_and_video_got(tmp_path, tokenizers, medias):
    pytest.importorskip("av")
    config = vl_config(tmp_path, "mllm_video_demo,mllm_demo")
    tokenizer = tokenizers["qwen2_5_vl"]
    shown = preview(config, tokenizer, get_template(config, tokenizer), n=1, color=False)  # loads the processor
    video = medias["qwen2_5_vl"].plan_video(str(DEMO / "1.mp4")).tokens
    assert f"1 video ({video} tokens) ─" in shown
    assert f"<|vision_start|><|video_pad|>×{video}<|vision_end|>Why is this video funny?" in shown
    assert "<|video_pad|><|video_pad|>" not in shown
