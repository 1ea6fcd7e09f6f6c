"""poft-mlx: Preference-Oriented Supervised Fine-Tuning (arXiv 2412.12865) on MLX."""

from ._blas import preload as _preload_blas

# Must happen before anything imports mlx (see _blas.py).
_preload_blas()

__version__ = "0.1.0"
