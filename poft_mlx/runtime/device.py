"""Backend policy: which dtype to compute in, and memory limits.

On the CPU backend only float32 matmuls reach the optimised BLAS; bf16/f16 run in
MLX's own kernels about 8x slower, so models are cast to float32 there. On Metal
(and CUDA) the model keeps its own dtype.
"""

from __future__ import annotations

import mlx.core as mx


def backend() -> str:
    """'metal', 'cuda' or 'cpu': where the default device computes."""
    if mx.default_device() == mx.cpu:
        return "cpu"
    if mx.metal.is_available():
        return "metal"
    return "cuda"


def compute_dtype(requested: str = "auto", model_dtype: mx.Dtype = mx.float32) -> mx.Dtype:
    """The dtype to compute in: float32 on CPU for 'auto', else the model's."""
    if requested != "auto":
        return getattr(mx, requested)
    return mx.float32 if backend() == "cpu" else model_dtype


def set_memory_limits(memory_limit_gb: float | None, cache_limit_gb: float | None) -> None:
    """Apply user memory/cache limits (bytes in MLX, GB here); None leaves the default."""
    if memory_limit_gb:
        mx.set_memory_limit(int(memory_limit_gb * 1e9))
    if cache_limit_gb is not None and cache_limit_gb >= 0:
        mx.set_cache_limit(int(cache_limit_gb * 1e9))

