"""Load an optimised BLAS into the process before MLX is imported.

The Linux ``mlx-cpu`` wheel links the netlib reference BLAS, which runs a float32
matmul about 40x slower than OpenBLAS. Loading an optimised ``libblas.so.3`` with
RTLD_GLOBAL before ``import mlx`` makes MLX's BLAS calls resolve to it
(../shared/docs/platform.md). This module must not import mlx.

``POFT_MLX_BLAS`` overrides the search: a path to a BLAS shared library, or ``off``.

OpenBLAS's idle worker threads spin (sched_yield) for 2^28 cycles after each call by default.
Between MLX's matmuls, which run on one thread with the elementwise ops, that spinning takes
the core the Python thread needs to build the next part of the graph: a LoRA step of
SmolLM2-135M took 10.5 s instead of 8.5 s on 2 cores. Unless the user set it, poft-mlx sets
``OPENBLAS_THREAD_TIMEOUT=4`` (the minimum, 2^4 cycles) before the library loads.
"""

from __future__ import annotations

import ctypes
import glob
import os
import platform
import sys

_CANDIDATES = (
    "/usr/lib/{arch}-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/{arch}-linux-gnu/openblas-openmp/libblas.so.3",
    "/usr/lib/{arch}-linux-gnu/openblas-serial/libblas.so.3",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

#: The library that was loaded, or None.
LOADED: str | None = None


def _candidates() -> list[str]:
    arch = platform.machine()
    paths = [p.format(arch=arch) for p in _CANDIDATES]
    # A conda or venv prefix may carry its own OpenBLAS.
    paths += sorted(glob.glob(os.path.join(sys.prefix, "lib", "libopenblas*.so*")))
    return paths


def preload() -> str | None:
    """Load an optimised BLAS globally on Linux; return its path or None."""
    global LOADED
    if LOADED or not sys.platform.startswith("linux"):
        return LOADED
    if "mlx.core" in sys.modules:
        # Too late: MLX already resolved its BLAS symbols.
        return None
    choice = os.environ.get("POFT_MLX_BLAS", "").strip()
    if choice.lower() == "off":
        return None
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")  # read when the library loads
    for path in [choice] if choice else _candidates():
        if path and os.path.exists(path):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                continue
            LOADED = path
            return path
    if not os.environ.get("POFT_MLX_QUIET_BLAS"):
        print(
            "poft-mlx: no optimised BLAS found; MLX will use its slow reference BLAS "
            "on the CPU (apt-get install libopenblas0-pthread, or set POFT_MLX_BLAS).",
            file=sys.stderr,
        )
    return None
