"""The vision-language families tunelab feeds: what differs from one family to the next, one `VisionFamily` row each.

    family = family_for("qwen2_5_vl")        # the row serving that `model_type` (config.json), or None
    family.block(family.image_token, 84)     # "<|vision_start|>" + 84 x "<|image_pad|>" + "<|vision_end|>"

A row names the model types it serves, the image processor class that runs without torchvision, the text that stands
for an image or a video in the token sequence, LLaMA-Factory's resize limits for the family, how many tokens an image
(or a video) of a given size becomes, the inputs its model takes beside input_ids, and the module names of its vision
tower, projector and language model (for the model layer's freezing and LoRA targets).

Adding a family (LLaVA, Gemma 3, InternVL, ...) is a row here, with its token-count functions when its processor
counts differently, plus a parity test against its tokenizer's `apply_chat_template` (tests/data/test_multimodal_*).
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any


def merged_patches(image_processor: Any, height: int, width: int) -> int:
    """Tokens of one image (or one temporal slice of a video) in the Qwen-VL families: the processor's own patch
    count for that size (its `smart_resize` to multiples of patch x merge), each merge_size x merge_size patches
    becoming one token."""
    return image_processor.get_number_of_image_patches(height, width) // image_processor.merge_size ** 2


def temporal_slices(image_processor: Any, frames: int) -> int:
    """How many temporal slices a clip of `frames` frames makes: consecutive frames are patched in pairs."""
    return math.ceil(frames / image_processor.temporal_patch_size)


def paired_frame_patches(image_processor: Any, frames: list[Any]) -> tuple[Any, list[int]]:
    """(patches, [t, h, w] grid) of a clip, in the layout of Qwen2-VL's video processor, made with the image processor.

    The torchvision-free image processor patches each frame as a clip of that frame repeated `temporal_patch_size`
    times (its temporal axis is a broadcast). Keeping one copy of every frame and putting consecutive frames on that
    axis instead gives exactly the video processor's patches: a clip of one repeated image patches like the image.
    The frame count must be a multiple of the temporal patch size (`plan_video` pads it).
    """
    step = image_processor.temporal_patch_size
    out = image_processor(images=frames, return_tensors="np")
    grid = out["image_grid_thw"][0]
    per_frame = int(grid[1] * grid[2])
    channels = len(image_processor.image_mean)
    # (frames, patches, channels, temporal copies, patch_size**2): one frame's patches, each `step` equal copies.
    patches = out["pixel_values"].reshape(len(frames), per_frame, channels, step, -1)[:, :, :, 0, :]
    slices = len(frames) // step
    # Frames f0..f(step-1) fill the temporal axis of slice 0, and so on.
    paired = patches.reshape(slices, step, per_frame, channels, -1).transpose(0, 2, 3, 1, 4)
    return paired.reshape(slices * per_frame, -1), [slices, int(grid[1]), int(grid[2])]


@dataclass(frozen=True)
class VisionFamily:
    """What one family of vision-language models needs from the data layer, and where its vision parts live."""

    name: str
    model_types: tuple[str, ...]          # config.json `model_type` values served by this row
    image_processor: str                  # a transformers class that needs no torchvision (from_pretrained)
    image_token: str                      # one per image token in the sequence
    video_token: str | None               # one per video token; None: the family takes no video
    vision_start: str = ""                # opens every image or video block
    vision_end: str = ""                  # closes it
    # LLaMA-Factory's resize before the processor (mm_plugin `_preprocess_image` of the family's plugin): sides at
    # least `min_side` pixels; a side over `max_aspect` times the other is cut to `aspect_to` times it (0: no cap).
    min_side: int = 0
    max_aspect: int = 0
    aspect_to: int = 0
    image_tokens: Callable[[Any, int, int], int] = merged_patches    # (processor, height, width) -> tokens
    video_slices: Callable[[Any, int], int] = temporal_slices        # (processor, frames) -> temporal slices
    video_patches: Callable[[Any, list[Any]], tuple[Any, list[int]]] = paired_frame_patches   # (patches, grid)
    #: Batch keys the model's forward takes beside input_ids, attention_mask and labels (the collator makes them).
    model_inputs: tuple[str, ...] = ()
    # Module names (prefixes of parameter names inside the model), for the model layer.
    vision_tower: tuple[str, ...] = ()
    projector: tuple[str, ...] = ()
    language_model: tuple[str, ...] = ()

    @property
    def tokens(self) -> tuple[str, ...]:
        """Every special token of a vision block (none of them is ever trained)."""
        return tuple(t for t in (self.vision_start, self.vision_end, self.image_token, self.video_token) if t)

    @property
    def seconds_per_grid(self) -> bool:
        """Whether videos carry `second_per_grid_ts` (Qwen2.5-VL spaces its temporal positions by real time)."""
        return "second_per_grid_ts" in self.model_inputs

    def block(self, token: str, count: int) -> str:
        """The text that stands for one image or video of `count` tokens."""
        return self.vision_start + token * count + self.vision_end


_QWEN2_VL = VisionFamily(
    name="qwen2_vl",
    model_types=("qwen2_vl",),
    image_processor="Qwen2VLImageProcessorPil",
    image_token="<|image_pad|>",
    video_token="<|video_pad|>",
    vision_start="<|vision_start|>",
    vision_end="<|vision_end|>",
    min_side=28,            # Qwen2VLPlugin: one 28 x 28 merged patch at least
    max_aspect=200,         # the processor refuses an aspect ratio over 200; LLaMA-Factory squeezes it to 180
    aspect_to=180,
    model_inputs=("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "mm_token_type_ids"),
    vision_tower=("visual.patch_embed", "visual.blocks"),
    projector=("visual.merger",),
    language_model=("language_model", "lm_head"),
)

#: The families, by name. Qwen2.5-VL differs from Qwen2-VL (for the data) only in `second_per_grid_ts`.
VISION_FAMILIES: dict[str, VisionFamily] = {family.name: family for family in (
    _QWEN2_VL,
    replace(_QWEN2_VL, name="qwen2_5_vl", model_types=("qwen2_5_vl",),
            model_inputs=(*_QWEN2_VL.model_inputs, "second_per_grid_ts")),
)}


def family_for(model_type: str | None) -> VisionFamily | None:
    """The family serving a `model_type`, or None (a text-only model, or a family tunelab cannot feed yet)."""
    return next((f for f in VISION_FAMILIES.values() if model_type in f.model_types), None)
