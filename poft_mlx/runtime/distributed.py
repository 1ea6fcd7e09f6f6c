"""Data-parallel ranks on mx.distributed: the group, reductions, and what happens when a rank fails.

Every rank runs the same program on the same global batch and takes rows [rank::world] of
it (training/loop.py); losses are divided by a global normaliser, so gradients are *summed*
across ranks and equal the single-process gradient. Only rank 0 writes run files and logs.

When a rank fails (measured with MLX 0.32's ring backend; docs/distributed.md):

* it dies (an exception, kill -9, out of memory): its sockets close and the next
  collective on the other ranks raises ``RuntimeError("[ring] connection to a peer was
  lost")`` at once; `wait` turns that into `PeerLost`, naming the rank and what it was doing.
* it is alive but silent (stopped, swapping, deadlocked) or cut off (a pulled cable): the
  collective waits forever. `wait` runs it under a timer that ends the process with a
  message after `peer_timeout_s` (mx.eval releases the GIL while it waits, so the timer runs).
* it never starts: rank 0 blocks in ``init()``'s accept() holding the GIL, where no Python
  thread can run; faulthandler's C-level timer ends the process after the same timeout.

mlx.launch and mpirun also terminate the remaining ranks once one exits with an error.
"""

from __future__ import annotations

import ctypes.util
import faulthandler
import json
import os
import sys
import threading
import zlib

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from ..errors import ConfigError, PeerLost

DEFAULT_TIMEOUT_S = 600.0
GRADIENT_MESSAGE_BYTES = 32 * 2**20  # gradients are summed in messages of about this size

_state = {"group": None, "timeout": DEFAULT_TIMEOUT_S}


def set_timeout(seconds: float | None) -> None:
    """How long a rank waits for the others in one collective before giving up."""
    _state["timeout"] = float(seconds) if seconds else DEFAULT_TIMEOUT_S


def group() -> mx.distributed.Group:
    """The group of all ranks (size 1 when not launched distributed), initialised once."""
    if _state["group"] is None:
        expected = _launched_world()
        _find_libmpi()
        if expected > 1:  # rank 0 waits in accept() for peers that may never come
            faulthandler.dump_traceback_later(_state["timeout"], exit=True)
        try:
            g = mx.distributed.init()
        except RuntimeError as e:  # e.g. a later rank gives up connecting after about 30 s
            raise PeerLost(f"rank {os.environ.get('MLX_RANK', '?')}: could not reach the other ranks ({e}); "
                           f"check the addresses in MLX_HOSTFILE and start all ranks within ~30 s") from None
        finally:
            if expected > 1:
                faulthandler.cancel_dump_traceback_later()
        if expected > 1 and g.size() == 1:
            hint = ("mlx found no Open MPI library: set MLX_MPI_LIBNAME to its path and pass it "
                    "with mpirun -x MLX_MPI_LIBNAME"
                    if "OMPI_COMM_WORLD_SIZE" in os.environ else
                    f"check MLX_HOSTFILE={os.environ.get('MLX_HOSTFILE')} and MLX_RANK")
            raise ConfigError(f"launched as one of {expected} ranks, but mx.distributed.init() "
                             f"gave a group of 1: {hint}")
        _state["group"] = g
    return _state["group"]


def _find_libmpi() -> None:
    """Under mpirun, point mlx at libmpi: it opens "libmpi.so", which Linux distributions
    ship only in their -dev packages (Debian's openmpi-bin has libmpi.so.40)."""
    if "OMPI_COMM_WORLD_SIZE" in os.environ and "MLX_MPI_LIBNAME" not in os.environ:
        lib = ctypes.util.find_library("mpi")
        if lib:
            os.environ["MLX_MPI_LIBNAME"] = lib


def _launched_world() -> int:
    """How many ranks the launcher's environment announces (1 when not launched)."""
    if "OMPI_COMM_WORLD_SIZE" in os.environ:
        return int(os.environ["OMPI_COMM_WORLD_SIZE"])
    path = os.environ.get("MLX_HOSTFILE")
    if path and "MLX_RANK" in os.environ:
        try:
            with open(path) as fh:
                return max(len(json.load(fh)), 1)
        except (OSError, ValueError):
            return 1  # mx.distributed.init() reports the problem
    return 1


def is_main() -> bool:
    return group().rank() == 0


def wait(arrays, what: str) -> None:
    """mx.eval `arrays` (which hold collectives) under the watchdog; see the module docstring."""
    g = group()
    if g.size() == 1:
        mx.eval(arrays)
        return
    timer = threading.Timer(_state["timeout"], _give_up, args=(what,))
    timer.daemon = True
    timer.start()
    try:
        mx.eval(arrays)
    except RuntimeError as e:
        if "[ring]" not in str(e):
            raise
        raise PeerLost(f"rank {g.rank()} of {g.size()}: lost the connection to another rank while "
                       f"{what} ({e}); that rank died or was stopped, its own output says why") from None
    finally:
        timer.cancel()


def _give_up(what: str) -> None:
    g = _state["group"]
    sys.stderr.write(f"\nError: rank {g.rank()} of {g.size()}: no answer from the other ranks for "
                     f"{_state['timeout']:.0f} s while {what}; a rank hangs, was stopped or cannot be "
                     "reached. Exiting (system.peer_timeout_s sets this limit).\n")
    sys.stderr.flush()
    os._exit(1)


def sum_gradients(grads, g: mx.distributed.Group):
    """all_sum every gradient over the ranks, concatenated into a few large messages (lazy)."""
    flat = tree_flatten(grads)
    out, bucket, size = [], [], 0

    def flush():
        big = mx.distributed.all_sum(mx.concatenate([v.reshape(-1) for _, v in bucket]), group=g)
        parts = mx.split(big, np.cumsum([v.size for _, v in bucket])[:-1].tolist())
        out.extend((k, p.reshape(v.shape)) for (k, v), p in zip(bucket, parts))

    for k, v in flat:
        if bucket and (v.dtype != bucket[0][1].dtype or size >= GRADIENT_MESSAGE_BYTES):
            flush()
            bucket, size = [], 0
        bucket.append((k, v))
        size += v.nbytes
    if bucket:
        flush()
    return tree_unflatten(out)


_REDUCE = {"sum": (0.0, np.sum), "min": (np.inf, np.min), "max": (-np.inf, np.max)}


def reduce_metrics(sums: dict, reductions: dict, what: str) -> dict:
    """Metric sums over all ranks, each reduced as `reductions` says ("sum", "min" or "max";
    an objective's reductions), the same on every rank.

    One all_gather in float64; every rank reduces the gathered values in rank order, so
    all ranks take identical decisions from them (best checkpoint, early stopping).
    """
    g = group()
    keys = sorted(reductions)
    local = np.array([sums.get(k, _REDUCE[reductions[k]][0]) for k in keys], np.float64)
    gathered = mx.distributed.all_gather(mx.array(local[None]), group=g, stream=mx.cpu)
    wait(gathered, what)
    table = np.array(gathered, np.float64)
    return {k: float(_REDUCE[reductions[k]][1](table[:, i])) for i, k in enumerate(keys)}


def broadcast(tree, what: str):
    """Rank 0's arrays (a dict or list of them) on every rank; the others pass a tree of
    the same structure, shapes and dtypes.

    An all_sum where every rank but 0 contributes zeros: x + 0 == x, so the copy is exact.
    """
    g = group()
    if g.size() == 1:
        return tree
    flat = sorted(tree_flatten(tree), key=lambda kv: kv[0])  # dicts may list their keys in any order
    # Mismatched collectives hang rather than fail: compare the layouts first.
    layout = zlib.crc32(repr([(k, v.shape, str(v.dtype)) for k, v in flat]).encode())
    layouts = mx.distributed.all_gather(mx.array([layout], mx.int64), group=g, stream=mx.cpu)
    wait(layouts, what)
    if len(set(np.array(layouts).tolist())) > 1:
        raise RuntimeError(f"rank {g.rank()}: the ranks hold differently shaped data while {what}")
    summed = [(k, mx.distributed.all_sum(v if g.rank() == 0 else mx.zeros_like(v), group=g, stream=mx.cpu))
              for k, v in flat]
    wait([v for _, v in summed], what)
    return tree_unflatten(summed)


def broadcast_json(obj, what: str):
    """A JSON-serialisable object from rank 0 on every rank."""
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8) if is_main() else np.zeros(0, np.uint8)
    n = int(broadcast([mx.array([len(data)], mx.int64)], what)[0].item())
    buf = data if is_main() else np.zeros(n, np.uint8)
    return json.loads(bytes(np.array(broadcast([mx.array(buf)], what)[0], np.uint8)))
