"""Writing to disk without losing anything when it fills up: checkpoints, exports and the tokenized-data cache.

    with room_for(folder, "checkpoint-7", needed_bytes, then="checkpoint-6 is intact: ..."):
        ...write...                 # a full disk here becomes one NoSpaceError naming the folder and the space

NoSpaceError is a ConfigError, so the command line reports it as one message with exit status 2.
"""

import errno
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tunelab.config import ConfigError

#: A write that failed with less than this left on its filesystem is taken for a full disk (see `disk_full`).
NEARLY_FULL = 2**20


class NoSpaceError(ConfigError):
    """A save that does not fit on its disk: a ConfigError, so that the command line reports it as one message with
    exit status 2."""


@contextmanager
def room_for(folder: Path, what: str, needed: int, then: str, check_first: bool = True) -> Iterator[None]:
    """Write `what` (about `needed` bytes) under `folder`: refused before anything is written when its disk has less
    free (`check_first`), and a full disk met while writing is raised as one NoSpaceError. `then` says what was left
    intact and what to do."""
    free = free_bytes(folder)
    message = (f"no space left in {folder} for {what}: it needs about {human_bytes(needed)}, {human_bytes(free)} "
               f"free. {then}")
    if check_first and free < needed:
        raise NoSpaceError(message)
    try:
        yield
    except NoSpaceError:
        raise
    except Exception as err:
        if not disk_full(err, folder):
            raise
        raise NoSpaceError(message) from err


def disk_full(err: BaseException, folder: Path) -> bool:
    """Whether `err`, raised while writing under `folder`, comes from a full disk. An OSError says so by its errno and
    safetensors in its message, but torch.save only says "unexpected pos": a failure with (nearly) nothing left on
    the filesystem counts too."""
    cause: BaseException | None = err
    for _ in range(8):   # a cause chain can loop; a full disk shows within a few links
        if cause is None:
            break
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(cause):
            return True
        cause = cause.__cause__ or cause.__context__
    return free_bytes(folder) < NEARLY_FULL


def free_bytes(folder: Path) -> int:
    """The space this user may still write on the filesystem of `folder` (of its nearest existing parent)."""
    folder = Path(folder).absolute()
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())


def tensor_bytes(tensors: Iterable[Any]) -> int:
    """The bytes these tensors take when saved, each once (tied weights share one storage and are saved once)."""
    return sum({(t.data_ptr(), t.numel()): t.numel() * t.element_size() for t in tensors}.values())


def human_bytes(count: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} bytes"
