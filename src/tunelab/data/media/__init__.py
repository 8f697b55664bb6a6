"""Images and videos for vision-language models (Qwen2-VL, Qwen2.5-VL), without torchvision.

    from tunelab.data.media import load_media_processor
    media = load_media_processor(config, tokenizer)            # None for a text-only model
    splits = load_datasets(config, tokenizer, template, media=media)
    collator = DataCollator(tokenizer, media=media)            # pixel values, grids, mm_token_type_ids

One module per job:

    families.py   `VisionFamily` and `VISION_FAMILIES`: what differs per model family (tokens, token counts, model
                  inputs, module names of the vision tower and projector); adding a family is a row there
    images.py     reading and checking images, and LLaMA-Factory's resize rule
    video.py      PyAV: probing, LLaMA-Factory's frame sampling, decoding (`pip install 'tunelab[video]'`)
    processor.py  `MediaProcessor`: token counts per file, placeholder expansion, label masking, batch inputs
    loading.py    `load_media_processor`: the family of the configured model and its image processor
    checks.py     the loader's steps: refusals, measuring every file, skipping samples cutoff_len would cut

A sample names its files in its `images` / `videos` columns and marks where each goes with `<image>` / `<video>` in
its text (validation.py counts them). Tokenizing expands each placeholder to the family's block, e.g.
`<|vision_start|>` + `<|image_pad|>` x n + `<|vision_end|>` with n = (resized height / 14) x (resized width / 14) / 4.
"""

from tunelab.data.media.families import VISION_FAMILIES, VisionFamily, family_for
from tunelab.data.media.images import MediaError, fitted_size
from tunelab.data.media.loading import load_media_processor, model_type
from tunelab.data.media.processor import MediaLimits, MediaProcessor, VideoPlan
from tunelab.data.media.video import PYAV_INSTALL, has_pyav

__all__ = ["PYAV_INSTALL", "VISION_FAMILIES", "MediaError", "MediaLimits", "MediaProcessor", "VideoPlan",
           "VisionFamily", "family_for", "fitted_size", "has_pyav", "load_media_processor", "model_type"]
