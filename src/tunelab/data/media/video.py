"""Videos through PyAV (`pip install 'tunelab[video]'`): what a file holds, which frames are sampled, the frames.

    info = probe_video(path)                        # frames, duration, width, height (headers only)
    indices = sample_indices(info, fps=2.0, maxlen=128)
    frames = decode_frames(path, indices)           # RGB PIL images

The sampling is LLaMA-Factory's (mm_plugin `_get_video_sample_indices`): n = min(frames, video_maxlen,
floor(duration * video_fps)), at least 1, spread evenly over the clip (`np.linspace(0, frames - 1, n)`, truncated).
Where LLaMA-Factory would fail, tunelab measures instead: a stream without a duration takes the container's, and a
stream whose header does not count its frames has its packets counted. torchvision is never needed.

`av` and numpy are imported inside the functions: a run without videos never loads them.
"""

import importlib.util
import math
from dataclasses import dataclass
from typing import Any

from tunelab.data.media.images import MediaError

PYAV_INSTALL = "pip install 'tunelab[video]'"


def has_pyav() -> bool:
    """Whether PyAV (the `av` package) is installed."""
    return importlib.util.find_spec("av") is not None


@dataclass(frozen=True)
class VideoInfo:
    """What the headers of a video file say about its (first) video stream."""

    frames: int
    duration: float     # seconds
    width: int
    height: int


def probe_video(path: str) -> VideoInfo:
    """The frame count, duration and frame size of a video; MediaError when PyAV cannot read it."""
    with _opened(path) as container:
        stream = _video_stream(container)
        if stream.duration is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration:
            duration = container.duration / 1_000_000  # the container's duration is in microseconds
        else:
            raise MediaError("the video states no duration")
        frames = stream.frames
        if frames == 0:  # some containers (webm, mkv) do not count frames in their headers
            frames = sum(1 for packet in container.demux(stream) if packet.size)
        if frames == 0 or duration <= 0:
            raise MediaError("the video holds no frames")
        return VideoInfo(frames, duration, stream.width, stream.height)


def sample_indices(info: VideoInfo, fps: float, maxlen: int) -> list[int]:
    """The frames LLaMA-Factory samples: `video_fps` per second of video, at most `video_maxlen`, evenly spread."""
    import numpy as np

    count = min(info.frames, maxlen, max(1, math.floor(info.duration * fps)))
    return np.linspace(0, info.frames - 1, count).astype(np.int32).tolist()


def decode_frames(path: str, indices: list[int]) -> list[Any]:
    """The frames at `indices` (increasing) as RGB PIL images; MediaError when the file ends before the last of them."""
    import av

    wanted, frames, decoded = set(indices), [], 0
    with _opened(path) as container:
        stream = _video_stream(container)
        try:
            for frame in container.decode(stream):
                if decoded in wanted:
                    frames.append(frame.to_image())
                decoded += 1
                if decoded > indices[-1]:
                    break
        except av.FFmpegError as err:
            raise MediaError(f"the video cannot be decoded ({err})") from None
    if len(frames) != len(indices):
        raise MediaError(f"the video ends after {decoded} frames, but its header promised {indices[-1] + 1} or more")
    return frames


def _opened(path: str) -> Any:
    import av

    try:
        return av.open(path)
    except FileNotFoundError:
        raise MediaError("the file does not exist") from None
    except (av.FFmpegError, OSError, ValueError) as err:
        raise MediaError(f"not a video PyAV can read ({err})") from None


def _video_stream(container: Any) -> Any:
    stream = next((s for s in container.streams if s.type == "video"), None)
    if stream is None:
        raise MediaError("the file holds no video stream")
    return stream
