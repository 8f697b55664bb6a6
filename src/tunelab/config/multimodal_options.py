"""Keys of vision-language training, with LLaMA-Factory's names, defaults and meanings: how images and videos are
sized before the model's processor sees them, and which parts of a vision-language model train."""

from dataclasses import dataclass

from tunelab.config.option import option


@dataclass
class MultimodalOptions:
    media_dir: str | None = option(
        None, "Folder the `images` and `videos` paths of the datasets are relative to (default: dataset_dir).")
    image_max_pixels: int = option(768 * 768, "Images larger than this many pixels are scaled down (aspect kept).",
                                   minimum=1)
    image_min_pixels: int = option(32 * 32, "Images smaller than this many pixels are scaled up (aspect kept).",
                                   minimum=1)
    video_max_pixels: int = option(256 * 256, "Video frames larger than this many pixels are scaled down.", minimum=1)
    video_min_pixels: int = option(16 * 16, "Video frames smaller than this many pixels are scaled up.", minimum=1)
    video_fps: float = option(2.0, "Frames sampled per second of video.", minimum=0, exclusive_minimum=True)
    video_maxlen: int = option(128, "Most frames sampled from one video.", minimum=1)
    freeze_vision_tower: bool = option(True, "Vision-language models: keep the vision encoder frozen.")
    freeze_multi_modal_projector: bool = option(
        True, "Vision-language models: keep the projector from vision features to the language model frozen.")
    freeze_language_model: bool = option(False, "Vision-language models: keep the language model frozen.")
