"""One process per run folder: an flock on RUN_DIR/.poft-lock, with who holds it (issue 18).

`lock_run(run_dir)` takes an exclusive fcntl.flock on RUN_DIR/.poft-lock and writes the holder
(pid, host, start time, command) into it. The kernel releases the flock when the process ends,
however it ends (kill -9 included), so a lock left by a dead process is simply taken over; its
last holder is named in the log. A second process finds the lock held and gets RunLocked
naming the holder. Where flock is not available (some network file systems), the recorded
holder decides: a live pid on this host keeps the folder, anything else is taken over.

The lock is held until the process exits (or `release_run`); taking it again in the same
process is a no-op, so a library caller may open the same run twice.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import time
from pathlib import Path

from ..errors import RunLocked
from ..rundir import LOCK_FILE, RunDir

_held: dict[str, int] = {}  # resolved run folder -> the open, locked file descriptor


def lock_run(run_dir: str | os.PathLike[str], log=None) -> None:
    """Hold RUN_DIR's lock for this process, or raise RunLocked naming the process that holds it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    key = str(run_dir.resolve())
    if key in _held:
        return
    path = RunDir(run_dir).lock
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        previous = _read(fd)
        if not _flock(fd, run_dir) and previous and _alive(previous):
            # No flock here (or it failed): trust a live recorded holder on this host.
            raise RunLocked(_message(run_dir, previous))
        previous = _read(fd)  # re-read under the lock: the last holder's record
        if previous and previous.get("pid") is not None:
            if log is not None:
                log(f"{run_dir}: taking over the lock of {_describe(previous)}, which is no longer running")
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder()) + "\n").encode(), 0)
        with contextlib.suppress(OSError):
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        raise
    _held[key] = fd


def release_run(run_dir: str | os.PathLike[str]) -> None:
    """Give the lock up (clearing the holder record); a no-op when this process does not hold it."""
    fd = _held.pop(str(Path(run_dir).resolve()), None)
    if fd is not None:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # closing the descriptor releases the flock


def holder() -> dict:
    """This process, as the lock records it."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "started_unix": time.time(), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300]}


def _flock(fd: int, run_dir: Path) -> bool:
    """True when the flock is ours; RunLocked when another process holds it; False without flock."""
    import fcntl  # lazy: POSIX only

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise RunLocked(_message(run_dir, _read(fd))) from None
        return False  # ENOLCK, EOPNOTSUPP...: fall back on the record


def _read(fd: int) -> dict | None:
    try:
        raw = os.pread(fd, 4096, 0)
        record = json.loads(raw.decode()) if raw.strip() else None
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _alive(record: dict) -> bool:
    if record.get("host") != socket.gethostname():
        return True  # another machine's process: cannot tell, keep out
    pid = record.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(record: dict | None) -> str:
    if not record:
        return "another process (it has not recorded itself yet)"
    return (f"pid {record.get('pid')} on {record.get('host')}, started {record.get('started')}"
            + (f" ({record['command']})" if record.get("command") else ""))


def _message(run_dir: Path, record: dict | None) -> str:
    return (f"{run_dir} is in use by {_describe(record)}: two runs in one folder would write the same checkpoints "
            "and metrics. Wait for it to finish or stop it (a killed run's lock is taken over), or choose "
            "another run_dir")


__all__ = ["LOCK_FILE", "RunLocked", "holder", "lock_run", "release_run"]
