"""float32 matmul rate (OpenBLAS through MLX, 2 cores) at SmolLM2-135M's training shapes vs the 2048^2 square."""
import time, poft_mlx
import mlx.core as mx
def rate(m, k, n, reps=None):
    a = mx.random.normal((m, k)); b = mx.random.normal((k, n)); mx.eval(a, b)
    reps = reps or max(3, int(2e10 / (2 * m * k * n)))
    mx.eval(a @ b)
    best = 0
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps): mx.eval(a @ b)
        best = max(best, 2 * m * k * n * reps / (time.perf_counter() - t0) / 1e9)
    return best
T = 2048  # 4 x 512 tokens
rows = [("square 2048^2", 2048, 2048, 2048), ("q/o proj x W^T", T, 576, 576), ("k/v proj", T, 576, 192),
        ("gate/up", T, 576, 1536), ("down", T, 1536, 576), ("down, input grad", T, 576, 1536),
        ("attention QK^T (head 64, 64-query block)", 64 * 3, 64, 512), ("LoRA x@A (r 8)", T, 576, 8), ("LoRA z@B", T, 8, 1536),
        ("output layer, 1,150 supervised x 49,152", 1150, 576, 49152)]
for name, m, k, n in rows:
    print(f"{name:45s} [{m}x{k}]x[{k}x{n}]  {rate(m, k, n):6.1f} GFLOP/s", flush=True)
