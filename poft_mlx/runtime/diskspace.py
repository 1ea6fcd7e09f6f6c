"""A full disk as one clear error: which file, how much it needed, how much was free (issue 18).

Writers (checkpoints, the score cache, fuse, convert) wrap their writes in `writing(path, need,
hint)`: an OSError with ENOSPC or EDQUOT, or mlx's own "[write] Unable to write ..." (its
save functions report no errno), becomes DiskFull naming the file, the bytes the write needed
and the bytes free on that file system, plus what is still intact and how to go on. The caller
removes what it had half written before the error leaves it (or writes into a temporary name
that is never trusted), so a later run never reads a partial file.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class DiskFull(OSError):
    """A write ran out of space; str() is the whole message."""

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None, need: int | None = None) -> None:
        super().__init__(errno.ENOSPC, message, None if path is None else str(path))
        self.message, self.need = message, need

    def at(self, path: str | os.PathLike[str], hint: str) -> DiskFull:
        """The same shortage told as writing `path` (what the user asked for, not a scratch file)."""
        return DiskFull(message(path, self.need, hint), path, self.need)

    def __str__(self) -> str:
        return self.message


def free_bytes(path: str | os.PathLike[str]) -> int | None:
    """Bytes available to this user on the file system holding `path` (or its nearest parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        st = os.statvfs(p)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def human(n: int | None) -> str:
    if n is None:
        return "an unknown amount"
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


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
    free = free_bytes(path) if free is None else free
    needs = f"it needs {human(need)}, " if need is not None else ""
    text = f"no space left on device writing {path}: {needs}{human(free)} free there"
    return f"{text}; {hint}" if hint else text


def check_space(path: str | os.PathLike[str], need: int, hint: str = "") -> None:
    """DiskFull before writing anything when the file system of `path` has less than `need` free."""
    free = free_bytes(path)
    if free is not None and free < need:
        raise DiskFull(message(path, need, hint, free), path, need)


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
        raise DiskFull(message(target, need, hint), target, need) from e


def nbytes(arrays) -> int:
    """The bytes a dict or list of arrays takes in a safetensors file (plus a header's worth)."""
    values = arrays.values() if isinstance(arrays, dict) else arrays
    return sum(int(getattr(v, "nbytes", 0)) for v in values) + 64 * 1024


__all__ = ["DiskFull", "check_space", "free_bytes", "is_disk_full", "message", "nbytes", "writing"]
