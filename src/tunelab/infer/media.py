"""Images and videos in a chat with a vision-language model: where they sit in the messages, and the model inputs
they become.

    text, images, videos = read_content(parts, "messages[0]")    # parts -> text with <image> / <video>
    messages = place_media(messages, images, videos)              # LLaMA-Factory's ChatModel(images=...) rule
    image_tokens, video_tokens = media_tokens(media, images, videos)    # then media.expand(...), as in training

A message's content is a string or a list of parts: `{"type": "text", "text": ...}`, `{"type": "image", "image":
PATH or PIL image}`, `{"type": "video", "video": PATH}`. Parts become the data layer's form, the text with an `<image>`
or `<video>` placeholder where each file goes (text parts joined by newlines, a placeholder joined with nothing, as
the training data writes `<image>What is in the picture?`), so a chat prompt is built by exactly the steps that built
the training samples: each placeholder expanded to the family's vision block, then the template.

Files given beside the messages (`images=[...]`, as LLaMA-Factory's ChatModel takes them) go where the messages'
placeholders are; with none, in front of the first message's text, as LLaMA-Factory puts them.
"""

from typing import Any

from tunelab.data.validation import MEDIA_PLACEHOLDERS

IMAGE, VIDEO = MEDIA_PLACEHOLDERS["images"], MEDIA_PLACEHOLDERS["videos"]


class MediaRequestError(ValueError):
    """Media a request cannot use as given (the engine turns it into its RequestError)."""


def read_content(content: str | list[Any], where: str) -> tuple[str, list[Any], list[Any]]:
    """(text with placeholders, images, videos) of a message's content: a string, or a list of parts."""
    if isinstance(content, str):
        return content, [], []
    if not isinstance(content, list):
        raise MediaRequestError(f"{where}: `content` must be a string or a list of parts")
    pieces: list[str] = []
    images: list[Any] = []
    videos: list[Any] = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            # Consecutive text parts read as lines; text after a placeholder follows it directly.
            joins_text = pieces and pieces[-1] not in (IMAGE, VIDEO)
            pieces.append(("\n" if joins_text else "") + part["text"])
        elif kind == "image" and part.get("image") is not None:
            images.append(part["image"])
            pieces.append(IMAGE)
        elif kind == "video" and isinstance(part.get("video"), str):
            videos.append(part["video"])
            pieces.append(VIDEO)
        else:
            raise MediaRequestError(f"{where}.content[{j}]: expected {{\"type\": \"text\", \"text\": ...}}, "
                                    f"{{\"type\": \"image\", \"image\": path or PIL image}} or "
                                    f"{{\"type\": \"video\", \"video\": path}}")
    return "".join(pieces), images, videos


def place_media(messages: list[dict], images: list[Any], videos: list[Any]) -> list[dict]:
    """The messages with a placeholder for every file: those already in the text must match the files in number;
    when the text holds none of a kind, the files' placeholders go in front of the first message."""
    found = {marker: sum(message["content"].count(marker) for message in messages if isinstance(message["content"],
                                                                                                  str))
             for marker in (IMAGE, VIDEO)}
    prefix = ""
    for marker, files, kind in ((IMAGE, images, "images"), (VIDEO, videos, "videos")):
        if found[marker] == 0:
            prefix += marker * len(files)
        elif found[marker] != len(files):
            raise MediaRequestError(f"the messages hold {found[marker]} {marker} but {len(files)} {kind} were given: "
                                    f"one {marker} per file, or none to put them all before the first message")
    if not prefix:
        return messages
    first = messages[0]
    return [{**first, "content": prefix + first["content"]}, *messages[1:]]


def media_tokens(media: Any, images: list[Any], videos: list[Any]) -> tuple[list[int], list[int]]:
    """The token count of every image and video; MediaRequestError naming the file that cannot be used."""
    from tunelab.data.media import PYAV_INSTALL, MediaError, has_pyav

    if videos and not has_pyav():
        raise MediaRequestError(f"videos need PyAV to decode: {PYAV_INSTALL}")

    def measured(kind: str, index: int, file: Any, measure: Any) -> int:
        name = file if isinstance(file, str) else f"{kind} {index + 1}"
        try:
            return measure(file)
        except MediaError as err:
            raise MediaRequestError(f"{name}: {err}") from None

    image_tokens = [measured("image", i, image, media.image_tokens) for i, image in enumerate(images)]
    video_tokens = [measured("video", i, video, lambda path: media.plan_video(path).tokens)
                    for i, video in enumerate(videos)]
    return image_tokens, video_tokens
