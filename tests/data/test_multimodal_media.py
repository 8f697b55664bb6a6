"""Images and videos of vision-language models: token counts, frame sampling and patches, against independent
references.

    .venv/bin/python -m pytest tests/data/test_multimodal_media.py -q

The references are written here from their sources, not taken from tunelab: LLaMA-Factory's resize and frame
sampling (mm_plugin.py: `_preprocess_image`, `Qwen2VLPlugin._preprocess_image`, `_get_video_sample_indices`,
`Qwen2VLPlugin._regularize_videos`), Qwen2-VL's `smart_resize` (transformers), the processor limits read from the
model folder's preprocessor_config.json as plain JSON, video headers read with PyAV directly, and the patch layout
of transformers' Qwen2VLVideoProcessor.patchify (which needs torchvision here) transcribed to numpy.
"""

import json
import math

import numpy as np
import pytest
from helpers import LF_DATA, TOKENIZERS
from PIL import Image

from tunelab.data.media import (VISION_FAMILIES, MediaLimits, MediaProcessor, family_for, fitted_size,
                                load_media_processor, model_type)
from tunelab.data.media.families import paired_frame_patches
from tunelab.data.media.video import VideoInfo, sample_indices

DEMO = LF_DATA / "mllm_demo_data"
FOLDERS = {"qwen2_vl": TOKENIZERS / "qwen2-vl-instruct", "qwen2_5_vl": TOKENIZERS / "qwen2.5-vl-instruct"}
pytestmark = pytest.mark.skipif(not (DEMO.is_dir() and all(f.is_dir() for f in FOLDERS.values())),
                                reason="needs ../shared/lf_data and the Qwen-VL tokenizers in ../shared/tokenizers")

#: LLaMA-Factory's defaults; the seed document's multimodal config; limits that scale up and sample sparsely.
LIMITS = {
    "defaults": MediaLimits(),
    "seed config": MediaLimits(image_max_pixels=262144, video_max_pixels=16384),
    "upscaling, sparse frames": MediaLimits(image_max_pixels=1024 * 1024, image_min_pixels=400 * 400,
                                            video_max_pixels=128 * 128, video_min_pixels=100 * 100,
                                            video_fps=0.5, video_maxlen=3),
}


# ---------------------------------------------------------------- the references


def lf_resize(width: int, height: int, max_pixels: int, min_pixels: int) -> tuple[int, int]:
    """LLaMA-Factory's MMPluginMixin._preprocess_image, then Qwen2VLPlugin._preprocess_image, on sizes."""
    if width * height > max_pixels:
        factor = math.sqrt(max_pixels / (width * height))
        width, height = int(width * factor), int(height * factor)
    if width * height < min_pixels:
        factor = math.sqrt(min_pixels / (width * height))
        width, height = int(width * factor), int(height * factor)
    if min(width, height) < 28:
        width, height = max(width, 28), max(height, 28)
    if width / height > 200:
        width, height = height * 180, height
    if height / width > 200:
        width, height = width, width * 180
    return width, height


def smart_resize(height: int, width: int, min_pixels: int, max_pixels: int, factor: int = 28) -> tuple[int, int]:
    """Qwen2-VL's processor resize (transformers, image_processing_qwen2_vl.smart_resize)."""
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def processor_limits(folder) -> tuple[int, int]:
    config = json.loads((folder / "preprocessor_config.json").read_text())
    return config["min_pixels"], config["max_pixels"]


def tokens_of(width: int, height: int, folder) -> int:
    """Tokens of one image (or temporal slice) already resized by LLaMA-Factory: 14-pixel patches, 2 x 2 merged."""
    height, width = smart_resize(height, width, *processor_limits(folder))
    return (height // 14) * (width // 14) // 4


def lf_video(path, limits: MediaLimits, folder) -> tuple[int, float]:
    """(tokens, second_per_grid_ts) of a video as LLaMA-Factory's Qwen2VLPlugin makes them, headers read with PyAV."""
    import av

    with av.open(str(path)) as container:
        stream = next(s for s in container.streams if s.type == "video")
        total, duration = stream.frames, float(stream.duration * stream.time_base)
        width, height = stream.width, stream.height
    sampled = min(total, limits.video_maxlen, max(1, math.floor(duration * limits.video_fps)))
    frames = sampled + sampled % 2                                   # an odd count repeats its last frame
    size = lf_resize(width, height, limits.video_max_pixels, limits.video_min_pixels)
    return frames // 2 * tokens_of(*size, folder), 2 / (sampled / duration)


@pytest.fixture(scope="module")
def tokenizers():
    from transformers import AutoTokenizer

    return {name: AutoTokenizer.from_pretrained(folder) for name, folder in FOLDERS.items()}


def processor(name: str, tokenizers, limits: MediaLimits = MediaLimits()) -> MediaProcessor:
    from transformers import Qwen2VLImageProcessorPil

    return MediaProcessor(VISION_FAMILIES[name], Qwen2VLImageProcessorPil.from_pretrained(FOLDERS[name]),
                          tokenizers[name], limits)


# ---------------------------------------------------------------- token counts


def test_the_issue_example_resizes_as_llama_factory_not_as_the_processor_alone():
    # A 1920 x 1080 image under image_max_pixels 262144: LLaMA-Factory's own resize first gives 336 tokens; handing
    # the limit to the processor alone would give 312.
    family = VISION_FAMILIES["qwen2_5_vl"]
    assert fitted_size(1920, 1080, 262144, 1024, family) == (682, 384)
    assert family.image_tokens(_Processor(), 384, 682) == 336
    height, width = smart_resize(1080, 1920, 3136, 262144)
    assert (height // 14) * (width // 14) // 4 == 312


class _Processor:
    """The Qwen2.5-VL processor's limits, for the token rule alone."""

    merge_size = 2

    def get_number_of_image_patches(self, height: int, width: int) -> int:
        height, width = smart_resize(height, width, *processor_limits(FOLDERS["qwen2_5_vl"]))
        return (height // 14) * (width // 14)


@pytest.mark.parametrize("limits", sorted(LIMITS))
@pytest.mark.parametrize("name", sorted(FOLDERS))
def test_every_demo_image_gets_llama_factorys_token_count(name, limits, tokenizers):
    media = processor(name, tokenizers, LIMITS[limits])
    images = sorted(DEMO.glob("*.jpg"))
    assert images
    for path in images:
        size = lf_resize(*Image.open(path).size, LIMITS[limits].image_max_pixels, LIMITS[limits].image_min_pixels)
        assert media.image_tokens(str(path)) == tokens_of(*size, FOLDERS[name]), path.name


@pytest.mark.parametrize("limits", sorted(LIMITS))
@pytest.mark.parametrize("name", sorted(FOLDERS))
def test_every_demo_video_gets_llama_factorys_token_count_and_seconds_per_grid(name, limits, tokenizers):
    pytest.importorskip("av")
    media = processor(name, tokenizers, LIMITS[limits])
    videos = sorted([*DEMO.glob("*.mp4"), *DEMO.glob("*.avi")])
    assert len(videos) == 4
    for path in videos:
        plan = media.plan_video(str(path))
        tokens, seconds = lf_video(path, LIMITS[limits], FOLDERS[name])
        assert plan.tokens == tokens, path.name
        assert plan.seconds_per_grid == pytest.approx(seconds), path.name
        assert plan.frames % 2 == 0 and plan.frames - len(plan.indices) in (0, 1)


def test_frames_are_sampled_as_llama_factory_samples_them():
    clip = VideoInfo(frames=243, duration=9.72, width=640, height=360)
    assert sample_indices(clip, fps=2.0, maxlen=128) == np.linspace(0, 242, 19).astype(np.int32).tolist()
    assert len(sample_indices(clip, fps=30.0, maxlen=128)) == 128           # video_maxlen caps it
    assert len(sample_indices(clip, fps=50.0, maxlen=1000)) == 243          # never more than the clip holds
    assert sample_indices(clip, fps=0.01, maxlen=128) == [0]                # at least one frame


# ---------------------------------------------------------------- patches


def video_processor_patchify(frames: np.ndarray, patch: int = 14, merge: int = 2, temporal: int = 2) -> np.ndarray:
    """transformers' Qwen2VLVideoProcessor.patchify for one video (T, C, H, W), transcribed from torch to numpy."""
    t, c, h, w = frames.shape
    gh, gw = h // patch, w // patch
    patches = frames.reshape(t // temporal, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
    patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return patches.reshape(t // temporal * gh * gw, c * temporal * patch * patch)


def test_a_clip_of_one_repeated_image_patches_exactly_like_the_image(tokenizers):
    media = processor("qwen2_5_vl", tokenizers)
    image = Image.open(DEMO / "1.jpg").convert("RGB")
    single = media.image_processor(images=[image], return_tensors="np")
    patches, grid = paired_frame_patches(media.image_processor, [image] * 4)
    assert grid == [2, *single["image_grid_thw"][0][1:].tolist()]
    np.testing.assert_array_equal(patches, np.concatenate([single["pixel_values"]] * 2))


def test_distinct_frames_pair_up_in_the_video_processors_layout(tokenizers):
    media = processor("qwen2_vl", tokenizers)
    rng = np.random.default_rng(0)
    # 56 x 84 is a multiple of 28 inside the processor's limits: it is not resized, so the reference can normalize
    # the pixels itself.
    pixels = rng.integers(0, 256, size=(4, 56, 84, 3), dtype=np.uint8)
    patches, grid = paired_frame_patches(media.image_processor, [Image.fromarray(frame) for frame in pixels])
    mean, std = np.array(media.image_processor.image_mean), np.array(media.image_processor.image_std)
    normalized = ((pixels / 255.0 - mean) / std).transpose(0, 3, 1, 2).astype(np.float32)
    assert grid == [2, 4, 6]
    np.testing.assert_allclose(patches, video_processor_patchify(normalized), atol=1e-5)


# ---------------------------------------------------------------- the family table


def test_each_family_serves_its_model_type_and_names_what_its_model_takes(tokenizers):
    assert family_for("qwen2_vl") is VISION_FAMILIES["qwen2_vl"] and family_for("llama") is None
    for name, family in VISION_FAMILIES.items():
        assert family_for(family.model_types[0]) is family
        media = processor(name, tokenizers)  # every token of the row is one token of the family's tokenizer
        assert len(media.vision_ids) == len(family.tokens) == 4
        assert {"pixel_values", "image_grid_thw", "mm_token_type_ids"} <= set(family.model_inputs)
        assert family.vision_tower and family.projector and family.language_model
    assert VISION_FAMILIES["qwen2_5_vl"].seconds_per_grid and not VISION_FAMILIES["qwen2_vl"].seconds_per_grid


def test_the_family_comes_from_the_model_folders_config_json(tokenizers, tmp_path):
    from tunelab.config import load_config

    vl = load_config({"model_name_or_path": str(FOLDERS["qwen2_5_vl"]), "image_max_pixels": 262144})
    assert model_type(vl) == "qwen2_5_vl"
    media = load_media_processor(vl, tokenizers["qwen2_5_vl"])
    assert media.family.name == "qwen2_5_vl" and media.limits.image_max_pixels == 262144
    assert media.image_processor.size["longest_edge"] == processor_limits(FOLDERS["qwen2_5_vl"])[1]
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    for text_model in (str(tmp_path), "tunelab:smollm2-135m-instruct"):
        assert load_media_processor(load_config({"model_name_or_path": text_model}), tokenizers["qwen2_vl"]) is None
