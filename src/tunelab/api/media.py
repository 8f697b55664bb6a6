"""Images and videos in API requests: OpenAI's `image_url` parts (and vLLM's `video_url`) turned into what the
engine takes, under the rule that the server reads nothing a client merely names.

    image = media_from_url(url, "image", media_dir)    # a PIL image (data URL) or a checked local path (file://)

- `data:image/...;base64,...` (what OpenAI's clients send for a local picture): decoded in memory and checked whole,
  and refused when it holds more pixels than PIL's decompression-bomb limit (PIL.Image.MAX_IMAGE_PIXELS);
- `file:///path`: only when the server was started with API_MEDIA_DIR and the path, symbolic links resolved, lies
  inside that folder (a client naming /etc/passwd gets 400, not a probe of the server's files);
- anything else (http(s) URLs, bare paths): refused; tunelab's server fetches nothing from the network.

Videos come as `file://` paths only (a video in a data URL would have to be written to disk to decode).
"""

import base64
import binascii
import io
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse


class MediaURLError(ValueError):
    """A media URL the server will not use; the message says why (the caller adds the request field)."""


def media_from_url(url: str, kind: str, media_dir: Path | None) -> Any:
    """The engine's form of an image or video URL: a PIL image or a local path. MediaURLError when refused."""
    if url.startswith("data:"):
        if kind != "image":
            raise MediaURLError("a video must be a file:// URL under the server's API_MEDIA_DIR, not a data URL")
        return _image_from_data_url(url)
    if url.startswith("file://"):
        return _allowed_path(url, media_dir)
    shown = url if len(url) <= 80 else url[:77] + "..."
    raise MediaURLError(f"{shown!r}: the server fetches no URLs; send the {kind} as "
                        + ("a base64 data URL (data:image/png;base64,...)" if kind == "image" else
                           "a file:// path under the server's API_MEDIA_DIR"))


def _image_from_data_url(url: str) -> Any:
    from PIL import Image

    header, comma, payload = url.partition(",")
    if not comma or not header.startswith("data:image/") or not header.endswith(";base64"):
        raise MediaURLError("expected a data URL of the form data:image/<type>;base64,<data>")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise MediaURLError("the data URL's payload is not valid base64") from None
    try:
        image = Image.open(io.BytesIO(data))   # the header only
        # A few hundred kB of PNG can hold a 10,000 x 10,000 image: PIL's bomb limit refuses it before it is decoded
        # (PIL itself only warns up to twice that limit).
        oversized = Image.MAX_IMAGE_PIXELS is not None and image.width * image.height > Image.MAX_IMAGE_PIXELS
        if not oversized:
            image.load()
    except Exception as err:  # PIL raises many types for data that is no image, or a damaged one
        raise MediaURLError(f"the data URL holds no image PIL can decode ({err})") from None
    if oversized:
        raise MediaURLError(f"the image is {image.width} x {image.height} pixels, more than the "
                            f"{Image.MAX_IMAGE_PIXELS:,} PIL decodes (PIL.Image.MAX_IMAGE_PIXELS)")
    return image


def _allowed_path(url: str, media_dir: Path | None) -> str:
    if media_dir is None:
        raise MediaURLError("file:// URLs are refused: start the server with API_MEDIA_DIR=<folder> to let clients "
                            "name files in that folder")
    parsed = urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise MediaURLError(f"file:// URLs name a file on this machine; {parsed.netloc!r} is another host")
    path = Path(unquote(parsed.path)).resolve()
    if not path.is_relative_to(media_dir.resolve()):
        raise MediaURLError(f"{path} is outside the folder the server allows (API_MEDIA_DIR)")
    if not path.is_file():
        raise MediaURLError(f"{path} does not exist")
    return str(path)
