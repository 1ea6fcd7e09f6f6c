"""poft-mlx: Preference-Oriented Supervised Fine-Tuning (arXiv 2412.12865) on MLX."""

from .runtime.blas import preload as _preload_blas
from .runtime.malloc import tune as _tune_malloc

# Must happen before anything imports mlx (see runtime/blas.py) or allocates much (see runtime/malloc.py).
_preload_blas()
_tune_malloc()

__version__ = "0.1.0"
