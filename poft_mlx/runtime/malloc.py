"""Keep freed memory for reuse on Linux (glibc), where MLX's CPU backend allocates with malloc.

MLX's CPU allocator has no buffer cache (Metal and CUDA have one): every array is a fresh
malloc, and glibc serves large requests (above 32 MiB at most) with a new mmap whose pages
fault in one by one on first touch, then returns them with munmap on free. A training step
allocates and frees gigabytes of activations, logits and gradients, so on our Linux VMs an
elementwise op over a 240 MB array ran ~6x slower than over reused memory (2.1 vs 0.32 ns
per element; scripts/benchmark.py measures the step-level effect). Turning off mmap for
allocations and never trimming the heap makes glibc hand freed blocks to the next request,
as MLX's GPU allocators do: the process keeps its high-water mark of memory until it exits.

``POFT_MLX_MALLOC=off`` leaves glibc's defaults; so does a GLIBC_TUNABLES that sets malloc
parameters itself. This module must not import mlx.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

#: Whether the settings were applied.
APPLIED = False


def tune() -> bool:
    """Apply the settings once (glibc on Linux only); return whether they are in effect."""
    global APPLIED
    if APPLIED or not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return APPLIED
    if os.environ.get("POFT_MLX_MALLOC", "").strip().lower() in ("off", "0", "no", "false"):
        return False
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False  # the user's own malloc settings win
    try:
        libc = ctypes.CDLL(None)
        # mallopt returns 1 on success; -1 as the trim threshold is SIZE_MAX: never trim.
        APPLIED = bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, -1))
    except (OSError, AttributeError):
        APPLIED = False
    return APPLIED
