"""Every error poft-mlx raises for a problem the user can fix, under one root: PoftError.

The CLI turns a PoftError (and nothing else) into a one-line message; any other exception
is a bug and keeps its traceback. Each class also derives from the builtin that code
catching it generically would expect (a missing file is a FileNotFoundError, a bad value a
ValueError), so `except FileNotFoundError` and the like keep working.

Messages name what to fix: the file, the record and the field, or the config key.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class PoftError(Exception):
    """A problem with the user's input, files, machine or peers, stated in one line."""


class ConfigError(PoftError, ValueError):
    """A config key, a command-line option or a combination of settings that cannot work."""


class DataError(PoftError, ValueError):
    """A data record or data file that cannot be used (names the file, record and field).

    Built from the problems found in a file (data/records.Problem: file, line, field,
    message), all of them at once: str() lists the first 20. A single problem may be given as
    its message; `problems` is then empty.
    """

    def __init__(self, problems: str | Sequence[Any]):
        if isinstance(problems, str):
            self.problems: Sequence[Any] = []
            super().__init__(problems)
            return
        self.problems = problems
        shown = "\n  ".join(str(p) for p in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        super().__init__(f"{len(problems)} problem(s) in the data:\n  {shown}{more}")


class TemplateError(PoftError, ValueError):
    """A chat template that cannot render a record the way training needs."""


class ModelFileError(PoftError, ValueError):
    """A model file (safetensors, GGUF, JSON side file, template) that is malformed or hostile,
    or that describes a model poft-mlx cannot convert (an unsupported GGUF architecture)."""


class ModelRefError(PoftError, RuntimeError):
    """A model reference that cannot be resolved or converted."""


class ModelMismatch(PoftError, ValueError):
    """Weights (adapters, a checkpoint) that do not belong to the model they are loaded into."""


class InputMissing(PoftError, FileNotFoundError):
    """A file or folder the user named (or that a run folder should hold) does not exist."""


class WouldOverwrite(PoftError, FileExistsError):
    """A command would replace something already done (a run, an output folder)."""


class RunLocked(WouldOverwrite):
    """Another process holds this run folder."""


class MissingScores(PoftError, RuntimeError):
    """Aligned-model scores that `poft-mlx score` has not computed yet."""


class PeerLost(PoftError, RuntimeError):
    """Another rank died, or stopped answering, during a collective operation."""


class DiskFull(PoftError, OSError):
    """A write that found no space; what was written before is intact (runtime/diskspace.py).

    str() is the whole message: the file, the bytes the write needed, the bytes free there and
    what to do next (`hint`). `need` is None where the size of the write is not known.
    """

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None, need: int | None = None) -> None:
        super().__init__(errno.ENOSPC, message, None if path is None else str(path))
        self.message, self.need = message, need

    @classmethod
    def writing(cls, path: str | os.PathLike[str], need: int | None, hint: str = "",
                free: int | None = None) -> DiskFull:
        """The error for writing `need` bytes to `path`, stating the space free there (`free`:
        measured already) and `hint`."""
        free = free_bytes(path) if free is None else free
        needs = f"it needs {human_bytes(need)}, " if need is not None else ""
        text = f"no space left on device writing {path}: {needs}{human_bytes(free)} free there"
        return cls(f"{text}; {hint}" if hint else text, path, need)

    def at(self, path: str | os.PathLike[str], hint: str) -> DiskFull:
        """The same shortage told as writing `path` (what the user asked for, not a scratch file)."""
        return DiskFull.writing(path, self.need, hint)

    def __str__(self) -> str:
        return self.message


class NonFiniteLoss(PoftError, RuntimeError):
    """A NaN or infinite loss or gradient with train.nan_policy=stop."""


class Interrupted(Exception):
    """Training stopped by SIGINT/SIGTERM after saving a checkpoint. Not a PoftError: nothing
    went wrong; the CLI prints how to resume and exits 130."""


class ExportError(PoftError):
    """A run or model folder that cannot be exported as asked."""


class FuseCheckError(ExportError):
    """A fused model that does not compute what the adapters computed; `report` holds the
    measurements (export/fuse.CheckReport)."""

    def __init__(self, message: str, report: Any) -> None:
        super().__init__(message)
        self.report = report


class HubError(PoftError):
    """A Hugging Face Hub operation that failed, said without the token."""


class MissingExtra(PoftError, ImportError):
    """An optional dependency (an extra of poft-mlx) that is not installed."""


# ---------------------------------------------------------------------------- what DiskFull states


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


def human_bytes(n: int | None) -> str:
    """A byte count for DiskFull's message: 1.5 GiB, 873 bytes, "an unknown amount" for None."""
    if n is None:
        return "an unknown amount"
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"
