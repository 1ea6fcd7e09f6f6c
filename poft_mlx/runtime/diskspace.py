"""A full disk as one clear error: which file, how much it needed, how much was free (issue 18).

Writers (checkpoints, the score cache, fuse, convert) wrap their writes in `writing(path, need,
hint)`: an OSError with ENOSPC or EDQUOT, or mlx's own "[write] Unable to write ..." (its
save functions report no errno), becomes DiskFull naming the file, the bytes the write needed
and the bytes free on that file system, plus what is still intact and how to go on. The caller
removes what it had half written before the error leaves it (or writes into a temporary name
that is never trusted), so a later run never reads a partial file. DiskFull and its message
live in errors.py with every other user error; this module decides when a write ran out of space.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator

from ..errors import DiskFull, free_bytes

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(e: BaseException) -> bool:
    """ENOSPC/EDQUOT, or mlx's errno-less write failure (treated as one: mlx gives no reason), or the
    tokenizers library's."""
    if isinstance(e, DiskFull):
        return True
    if isinstance(e, OSError):
        return e.errno in FULL_ERRNOS
    text = str(e)
    # mlx: "[write] Unable to write N bytes to file."; tokenizers (Rust): "... (os error 28)".
    return text.startswith("[write] Unable to write") or f"(os error {errno.ENOSPC})" in text \
        or f"(os error {errno.EDQUOT})" in text


def message(path: str | os.PathLike[str], need: int | None, hint: str = "", free: int | None = None) -> str:
    """DiskFull's message for writing `need` bytes (None: unknown) to `path`."""
    return DiskFull.writing(path, need, hint, free).message


def check_space(path: str | os.PathLike[str], need: int, hint: str = "") -> None:
    """DiskFull before writing anything when the file system of `path` has less than `need` free."""
    free = free_bytes(path)
    if free is not None and free < need:
        raise DiskFull.writing(path, need, hint, free)


@contextlib.contextmanager
def writing(path: str | os.PathLike[str], need: int | None, hint: str = "") -> Iterator[None]:
    """Turn a full disk inside the block into DiskFull(path, need, free, hint); other errors pass."""
    try:
        yield
    except DiskFull:
        raise
    except Exception as e:
        if not is_disk_full(e):
            raise
        target = getattr(e, "filename", None) or path
        raise DiskFull.writing(target, need, hint) from e


def nbytes(arrays) -> int:
    """The bytes a dict or list of arrays takes in a safetensors file (plus a header's worth)."""
    values = arrays.values() if isinstance(arrays, dict) else arrays
    return sum(int(getattr(v, "nbytes", 0)) for v in values) + 64 * 1024


__all__ = ["DiskFull", "check_space", "free_bytes", "is_disk_full", "message", "nbytes", "writing"]
