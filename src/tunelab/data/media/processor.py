"""`MediaProcessor`: a vision-language model's images and videos, from files to tokens (when tokenizing) and to
model inputs (when batching).

    media = MediaProcessor(VISION_FAMILIES["qwen2_5_vl"], image_processor, tokenizer, MediaLimits.from_config(cfg))
    tokens = media.image_tokens(path)                    # checks the file whole; its token count
    plan = media.plan_video(path)                        # frames sampled, their size, tokens, seconds per grid
    messages = media.expand(messages, [84], [840])       # each <image> / <video> -> its vision block
    inputs = media.batch_inputs(rows, input_ids)         # pixel_values, image_grid_thw, ..., mm_token_type_ids

Token counts are computed from the file's size alone (LLaMA-Factory's resize, then the processor's own limits), so
tokenizing never decodes more than a check needs; pixels are made when a batch is built, as LLaMA-Factory's collator
does. Kept in the tokenized data, a 768 x 768 image would be 2,916 patches of 1,176 floats (13.7 MB) on disk, slower
to read back than to recompute, and the batch check below catches a file that changed since it was tokenized.
"""

import re
from dataclasses import asdict, dataclass, fields
from itertools import accumulate
from typing import Any

from tunelab.data.media.families import VisionFamily
from tunelab.data.media.images import ImageSource, MediaError, check_image, fitted_size, load_image, prepare_image
from tunelab.data.media.video import decode_frames, probe_video, sample_indices
from tunelab.data.spec import DataError
from tunelab.data.validation import MEDIA_PLACEHOLDERS

IMAGE, VIDEO = MEDIA_PLACEHOLDERS["images"], MEDIA_PLACEHOLDERS["videos"]
PLACEHOLDER = re.compile(f"{re.escape(IMAGE)}|{re.escape(VIDEO)}")
#: mm_token_type_ids values: what the Qwen-VL models read to place their 3D positions.
TEXT_TYPE, IMAGE_TYPE, VIDEO_TYPE = 0, 1, 2


@dataclass(frozen=True)
class MediaLimits:
    """The config keys that size images and videos (LLaMA-Factory's names and defaults)."""

    image_max_pixels: int = 768 * 768
    image_min_pixels: int = 32 * 32
    video_max_pixels: int = 256 * 256
    video_min_pixels: int = 16 * 16
    video_fps: float = 2.0
    video_maxlen: int = 128

    @classmethod
    def from_config(cls, config: Any) -> "MediaLimits":
        return cls(**{field.name: getattr(config, field.name) for field in fields(cls)})


@dataclass(frozen=True)
class VideoPlan:
    """How one video becomes tokens: the frames sampled, their count after padding, their size, its tokens."""

    indices: list[int]          # frames decoded (LLaMA-Factory's sampling)
    frames: int                 # frames patched: odd counts repeat the last frame (frames pair up in time)
    width: int                  # each frame's size after LLaMA-Factory's resize
    height: int
    tokens: int
    seconds_per_grid: float     # seconds one temporal slice spans (Qwen2.5-VL's `second_per_grid_ts`)


class MediaProcessor:
    """One family's image processor, the tokenizer's ids of its vision tokens, and the config's size limits."""

    def __init__(self, family: VisionFamily, image_processor: Any, tokenizer: Any,
                 limits: MediaLimits = MediaLimits()) -> None:
        self.family, self.image_processor, self.limits = family, image_processor, limits
        ids = {}
        for token in family.tokens:
            encoded = tokenizer.encode(token, add_special_tokens=False)
            if len(encoded) != 1:
                raise DataError(f"the tokenizer does not read {token} as one token, so it is not the tokenizer of a "
                                f"{family.name} model")
            ids[token] = encoded[0]
        self.image_id = ids[family.image_token]
        self.video_id = ids.get(family.video_token)
        self.vision_ids = frozenset(ids.values())

    # ------------------------------------------------------------ tokenizing

    def image_tokens(self, path: ImageSource) -> int:
        """Tokens the image (a file, or a PIL image) becomes; MediaError when it is missing, foreign or does not
        decode completely."""
        width, height = fitted_size(*check_image(path), self.limits.image_max_pixels, self.limits.image_min_pixels,
                                    self.family)
        return self.family.image_tokens(self.image_processor, height, width)

    def plan_video(self, path: str) -> VideoPlan:
        """Frames, size and tokens of a video, from its headers; MediaError when PyAV cannot read them."""
        if self.family.video_token is None:
            raise MediaError(f"{self.family.name} models take no video")
        info = probe_video(path)
        indices = sample_indices(info, self.limits.video_fps, self.limits.video_maxlen)
        step = self.image_processor.temporal_patch_size
        frames = -(-len(indices) // step) * step   # LLaMA-Factory repeats the last frame of an odd count
        width, height = fitted_size(info.width, info.height, self.limits.video_max_pixels,
                                    self.limits.video_min_pixels, self.family)
        slices = self.family.video_slices(self.image_processor, frames)
        tokens = slices * self.family.image_tokens(self.image_processor, height, width)
        # LLaMA-Factory: temporal_patch_size / (frames sampled per second of the clip).
        return VideoPlan(indices, frames, width, height, tokens, step * info.duration / len(indices))

    def expand(self, messages: list[dict], image_tokens: list[int], video_tokens: list[int]) -> list[dict]:
        """The messages with each <image> and <video> replaced by its vision block, files taken in order."""
        if not image_tokens and not video_tokens:
            return messages
        counts = {IMAGE: iter(image_tokens), VIDEO: iter(video_tokens)}
        pads = {IMAGE: self.family.image_token, VIDEO: self.family.video_token}

        def block(match: re.Match) -> str:
            return self.family.block(pads[match.group()], next(counts[match.group()]))

        return [{**message, "content": PLACEHOLDER.sub(block, message["content"])} for message in messages]

    def count_vision(self, ids: list[int]) -> int:
        """How many of the ids belong to vision blocks (markers and pads)."""
        return sum(1 for i in ids if i in self.vision_ids)

    def mask_labels(self, input_ids: list[int], labels: list[int], ignore: int) -> list[int]:
        """Labels with every vision token ignored: they are inputs, never something to predict."""
        return [ignore if i in self.vision_ids else label for i, label in zip(input_ids, labels)]

    def blocks(self, ids: list[int]) -> tuple[list[int], list[int]]:
        """The token count of each image block and each video block in a sequence, in order."""
        runs: dict[int, list[int]] = {self.image_id: [], self.video_id: []}
        previous = None
        for i in ids:
            if i in runs:
                if i == previous:
                    runs[i][-1] += 1
                else:
                    runs[i].append(1)
            previous = i
        return runs[self.image_id], runs[self.video_id]

    # ------------------------------------------------------------ batching

    def batch_inputs(self, rows: list[dict[str, Any]], input_ids: Any) -> dict[str, Any]:
        """The model inputs of a padded batch besides the text: pixel values and grids of the rows' images and videos
        (in row order), `second_per_grid_ts` where the family takes it, and `mm_token_type_ids`, in every batch.

        `rows` hold each row's `images` (paths or PIL images) and `videos` (paths); `input_ids` is the padded
        LongTensor [rows, length].
        DataError when a file cannot be read, or gives other token counts than the row was tokenized with."""
        import torch

        inputs: dict[str, Any] = {}
        images = [[*(row.get("images") or [])] for row in rows]
        videos = [[*(row.get("videos") or [])] for row in rows]
        if any(images):
            unique = {_file_key(p): p for paths in images for p in paths}
            patches, grids, tokens = self._images(list(unique.values()))
            self._check_rows(images, tokens, input_ids, self.image_id, "image")
            keys = [_file_key(p) for paths in images for p in paths]
            inputs["pixel_values"] = torch.from_numpy(_concat([patches[key] for key in keys]))
            inputs["image_grid_thw"] = torch.tensor([grids[key] for key in keys])
        if any(videos):
            patches, grids, plans = self._videos(list(dict.fromkeys(p for paths in videos for p in paths)))
            self._check_rows(videos, {p: plan.tokens for p, plan in plans.items()}, input_ids, self.video_id, "video")
            inputs["pixel_values_videos"] = torch.from_numpy(_concat([patches[p] for paths in videos for p in paths]))
            inputs["video_grid_thw"] = torch.tensor([grids[p] for paths in videos for p in paths])
            if self.family.seconds_per_grid:
                inputs["second_per_grid_ts"] = torch.tensor(
                    [plans[p].seconds_per_grid for paths in videos for p in paths], dtype=torch.float32)
        types = torch.full_like(input_ids, TEXT_TYPE)
        types[input_ids == self.image_id] = IMAGE_TYPE
        if self.video_id is not None:
            types[input_ids == self.video_id] = VIDEO_TYPE
        inputs["mm_token_type_ids"] = types
        return inputs

    def _images(self, paths: list[ImageSource]) -> tuple[dict, dict, dict]:
        limits = self.limits
        loaded = [_read(load_image, path, limits.image_max_pixels, limits.image_min_pixels, self.family)
                  for path in paths]
        out = self.image_processor(images=loaded, return_tensors="np")
        grids = out["image_grid_thw"].tolist()
        ends = list(accumulate(grid[0] * grid[1] * grid[2] for grid in grids))
        keys = [_file_key(path) for path in paths]
        patches = {key: out["pixel_values"][start:end] for key, start, end in zip(keys, [0, *ends], ends)}
        tokens = {key: self.family.image_tokens(self.image_processor, image.height, image.width)
                  for key, image in zip(keys, loaded)}
        return patches, dict(zip(keys, grids)), tokens

    def _videos(self, paths: list[str]) -> tuple[dict, dict, dict]:
        patches, grids, plans = {}, {}, {}
        for path in paths:
            plan = plans[path] = _read(self.plan_video, path)
            frames = [prepare_image(frame, self.limits.video_max_pixels, self.limits.video_min_pixels, self.family)
                      for frame in _read(decode_frames, path, plan.indices)]
            frames += frames[-1:] * (plan.frames - len(frames))
            patches[path], grids[path] = self.family.video_patches(self.image_processor, frames)
        return patches, grids, plans

    def _check_rows(self, files: list[list[str]], tokens: dict[str, int], input_ids: Any, token_id: int,
                    kind: str) -> None:
        """Each row holds exactly the tokens its files make now (a file replaced after tokenizing would not)."""
        for row, paths in enumerate(files):
            found, expected = int((input_ids[row] == token_id).sum()), sum(tokens[_file_key(p)] for p in paths)
            if found != expected:
                raise DataError(f"a sample with {kind}s {', '.join(map(str, paths))} was tokenized with {found} {kind} "
                                f"tokens, but the files make {expected} now: a file changed after the data was "
                                f"tokenized; run again with `overwrite_cache: true`")

    def fingerprint(self) -> dict[str, Any]:
        """What changes the tokens this processor gives (for the cache key of tokenized data)."""
        return {"family": self.family.name, "limits": asdict(self.limits),
                "image_processor": self.image_processor.to_dict()}


def _file_key(source: ImageSource) -> Any:
    """What identifies a file in a batch: its path, or the image object itself (PIL images are not hashable)."""
    return source if isinstance(source, str) else id(source)


def _read(read: Any, path: str, *args: Any) -> Any:
    """`read(path, *args)`, a MediaError turned into a DataError naming the file."""
    try:
        return read(path, *args)
    except MediaError as err:
        raise DataError(f"{path}: {err}") from None


def _concat(arrays: list[Any]) -> Any:
    import numpy as np

    return np.ascontiguousarray(np.concatenate(arrays, axis=0), dtype=np.float32)
