"""poft-mlx: Preference-Oriented Supervised Fine-Tuning (arXiv 2412.12865) on MLX."""

from .runtime.blas import preload as _preload_blas
from .runtime.malloc import tune as _tune_malloc

# Must happen before anything imports mlx (see runtime/blas.py) or allocates much (see runtime/malloc.py).
_preload_blas()
_tune_malloc()

from ._version import __version__  # noqa: E402

# The Python API (poft_mlx/api.py: configure, score, train, evaluate, compare, generate, fuse, push),
# imported on first use so that `poft-mlx --help` and `import poft_mlx` stay fast.
_API = ("Config", "Callback", "configure", "run_config", "score", "train", "evaluate", "compare", "table", "generate",
        "fuse", "push")


def __getattr__(name: str):
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'poft_mlx' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_API))
