"""A LoRA layer ([2048x576] -> 1536, rank 8, scale 20) forward and forward + backward: mlx-lm's form
(y + scale * (x A) B) against one addmm, alternating rounds; and the gradients of both."""
import time, poft_mlx
import mlx.core as mx
import mlx.nn as nn
mx.random.seed(0)
T, din, dout, r, scale = 2048, 576, 1536, 8, 20.0
x = mx.random.normal((T, din)); W = mx.random.normal((dout, din)) * 0.02
A = mx.random.normal((din, r)) * 0.02; B = mx.random.normal((r, dout)) * 0.02
cot = mx.random.normal((T, dout))
def ref(x, A, B):
    y = x @ W.T
    z = (x @ A) @ B
    return y + (scale * z).astype(x.dtype)
def fused(x, A, B):
    return mx.addmm(x @ W.T, x @ A, B, alpha=scale)
def step(f):
    def loss(x, A, B): return (f(x, A, B) * cot).sum()
    return mx.value_and_grad(loss, argnums=(0, 1, 2))
for name, f in (("ref", ref), ("addmm", fused)):
    g = step(f)
    out = g(x, A, B); mx.eval(out)
res = {}
for rnd in range(6):
    for name, f in (("ref", ref), ("addmm", fused)) if rnd % 2 == 0 else (("addmm", fused), ("ref", ref)):
        g = step(f)
        t0 = time.perf_counter()
        for _ in range(10):
            out = g(x, A, B); mx.eval(out)
        res.setdefault(name, []).append(round((time.perf_counter() - t0) / 10 * 1e3, 2))
print(res)
a = step(ref)(x, A, B); b = step(fused)(x, A, B)
print("loss diff", abs(a[0] - b[0]).item(), [mx.abs(p - q).max().item() for p, q in zip(a[1], b[1])])
# forward only
for name, f in (("ref", ref), ("addmm", fused)):
    t0 = time.perf_counter()
    for _ in range(20): mx.eval(f(x, A, B))
    print(name, "fwd ms", round((time.perf_counter() - t0) / 20 * 1e3, 2))
