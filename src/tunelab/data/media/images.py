"""Images: read with PIL, checked whole, and resized by LLaMA-Factory's rule before the model's processor sees them.

    width, height = image_size(path)                      # the header only; MediaError when it is no image
    check_image(path)                                     # decodes it all: a truncated file fails here
    fitted_size(1920, 1080, 262144, 1024, family)         # (682, 384): LLaMA-Factory's resize, computed
    image = load_image(path, 262144, 1024, family)        # RGB PIL image of that size

LLaMA-Factory resizes every image itself (mm_plugin `_preprocess_image`): over `image_max_pixels` it is scaled by
sqrt(max / (w * h)), under `image_min_pixels` likewise up, each side truncated to an integer; then the family's plugin
adds its own limits (Qwen-VL: sides at least 28, an aspect ratio over 200 squeezed to 180). The processor then applies
its own size limits on top. Token counts, and so sequence lengths, match LLaMA-Factory's only when the same steps run
in the same order, which is why each step is a resize of its own here too.

PIL is imported inside the functions (importing `tunelab.data` stays light).
"""

import math
from typing import Any

from tunelab.data.media.families import VisionFamily


#: A file path, or a PIL image already in memory (a chat upload, an API data URL).
ImageSource = Any


class MediaError(Exception):
    """A media file that cannot be used; the message says why (the caller adds the dataset, sample and file)."""


def pixel_steps(width: int, height: int, max_pixels: int, min_pixels: int) -> list[tuple[int, int]]:
    """The sizes LLaMA-Factory resizes an image to for the pixel limits (none, one or two resizes).

    Written as in LLaMA-Factory, float for float: the factor is sqrt(limit / area) and each side is truncated. A side
    that would truncate to 0 (an extreme aspect ratio) stays 1 pixel, where LLaMA-Factory's resize would fail.
    """
    steps = []
    if width * height > max_pixels:
        width, height = _scaled(width, height, max_pixels)
        steps.append((width, height))
    if width * height < min_pixels:
        width, height = _scaled(width, height, min_pixels)
        steps.append((width, height))
    return steps


def _scaled(width: int, height: int, pixels: int) -> tuple[int, int]:
    factor = math.sqrt(pixels / (width * height))
    return max(1, int(width * factor)), max(1, int(height * factor))


def shape_steps(width: int, height: int, family: VisionFamily) -> list[tuple[int, int]]:
    """The sizes the family's own limits resize to after the pixel steps (Qwen-VL: sides >= 28, aspect <= 200)."""
    steps = []
    if family.min_side and min(width, height) < family.min_side:
        width, height = max(width, family.min_side), max(height, family.min_side)
        steps.append((width, height))
    if family.max_aspect and width / height > family.max_aspect:
        width = height * family.aspect_to
        steps.append((width, height))
    if family.max_aspect and height / width > family.max_aspect:
        height = width * family.aspect_to
        steps.append((width, height))
    return steps


def fitted_size(width: int, height: int, max_pixels: int, min_pixels: int, family: VisionFamily) -> tuple[int, int]:
    """(width, height) of an image of this size after LLaMA-Factory's resize (before the processor's own)."""
    sizes = [(width, height), *pixel_steps(width, height, max_pixels, min_pixels)]
    sizes += shape_steps(*sizes[-1], family)
    return sizes[-1]


def image_size(path: ImageSource) -> tuple[int, int]:
    """(width, height) from the file's header, without decoding the pixels."""
    with _opened(path) as image:
        return image.size


def check_image(path: ImageSource) -> tuple[int, int]:
    """(width, height) of an image that decodes completely; MediaError for a missing, foreign or truncated file.

    JPEGs decode at 1/8 scale (`draft`), which still reads every byte of the file (so truncation is found) in a
    third of the time.
    """
    with _opened(path) as image:
        size = image.size
        if isinstance(path, str):  # never on a caller's image object: a draft would shrink it for good
            image.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
        try:
            image.load()
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ... for damaged files
            raise MediaError(f"the image cannot be decoded ({err})") from None
    return size


def load_image(path: ImageSource, max_pixels: int, min_pixels: int, family: VisionFamily) -> Any:
    """The image as LLaMA-Factory hands it to the processor: resized by the pixel limits, RGB, then by the family's
    shape limits (each step its own resize, in LLaMA-Factory's order)."""
    with _opened(path) as image:
        try:
            image.load()
        except Exception as err:
            raise MediaError(f"the image cannot be decoded ({err})") from None
        return prepare_image(image, max_pixels, min_pixels, family)


def prepare_image(image: Any, max_pixels: int, min_pixels: int, family: VisionFamily) -> Any:
    """A PIL image (a file's, or a decoded video frame) resized and converted as `load_image` describes."""
    for size in pixel_steps(*image.size, max_pixels, min_pixels):
        image = image.resize(size)
    if image.mode != "RGB":
        image = image.convert("RGB")
    for size in shape_steps(*image.size, family):
        image = image.resize(size)
    return image


def _opened(path: ImageSource) -> Any:
    """The image opened lazily (a context manager); MediaError when it is missing or not an image. An image already
    in memory (a PIL image: a chat upload, a data URL) is used as it is, and left open."""
    from contextlib import nullcontext

    from PIL import Image

    if isinstance(path, Image.Image):
        return nullcontext(path)
    try:
        return Image.open(path)
    except FileNotFoundError:
        raise MediaError("the file does not exist") from None
    except Exception as err:  # UnidentifiedImageError, DecompressionBombError, permission errors, ...
        raise MediaError(f"not an image PIL can read ({err})") from None
