"""A LoRA fwd+bwd of SmolLM2-135M (poft-mlx's model path, CPU kernels on), batch 4 x 512:
one stream (OpenBLAS 2 threads, today) vs two CPU streams with 2 sequences each (OpenBLAS 1 or 2 threads)."""
import ctypes, sys, time
import numpy as np
import poft_mlx
from poft_mlx.runtime import blas
import mlx.core as mx
import mlx.nn as nn
from poft_mlx.models import modeling
from poft_mlx.config import AdapterConfig
from poft_mlx.data.render import Encoded
lib = ctypes.CDLL(blas.LOADED)
set_threads = lib.openblas_set_num_threads
loaded = modeling.load(str(modeling.resolve("pypi:smollm2-135m-instruct")))
model = loaded.model
mx.random.seed(0)
modeling.apply_adapters(model, AdapterConfig(rank=8, scale=20.0, num_layers=16))
model.train()
rng = np.random.default_rng(0)
encs = []
for i in range(4):
    t = rng.integers(10, 40000, 513).astype(np.int32)
    m = np.zeros(513, bool); m[200:] = True
    encs.append(Encoded(t, m))
def batch(idx): return modeling.make_batch([encs[i] for i in idx], idx)
def loss(model, b):
    lp, n = modeling.batch_logprobs(model, b)
    return -(lp / n).sum()
vg = nn.value_and_grad(model, loss)
full, h1, h2 = batch([0, 1, 2, 3]), batch([0, 1]), batch([2, 3])
s1, s2 = mx.new_stream(mx.cpu), mx.new_stream(mx.cpu)
def one():
    l, g = vg(model, full); mx.eval(l, g); return l, g
from mlx.utils import tree_map, tree_flatten
def two():
    with mx.stream(s1):
        l1, g1 = vg(model, h1)
    with mx.stream(s2):
        l2, g2 = vg(model, h2)
    mx.eval(l1, g1, l2, g2)
    return l1 + l2, tree_map(lambda a, b: a + b, g1, g2)
variants = {"one stream, BLAS 2 threads": (one, 2), "two streams, BLAS 1 thread": (two, 1), "two streams, BLAS 2 threads": (two, 2)}
ref = None
for name, (f, th) in variants.items():
    set_threads(th); l, g = f(); mx.eval(g)
    flat = dict(tree_flatten(g))
    if ref is None: ref = (l.item(), flat)
    else:
        d = max(float(mx.abs(flat[k] - ref[1][k]).max()) for k in flat)
        print(f"{name}: loss {l.item():.6f} vs {ref[0]:.6f}, max grad diff {d:.2e}", flush=True)
times = {k: [] for k in variants}
for rnd in range(4):
    for name in (list(variants) if rnd % 2 == 0 else list(variants)[::-1]):
        f, th = variants[name]; set_threads(th)
        t0 = time.perf_counter(); f(); times[name].append(round(time.perf_counter() - t0, 2))
for k, v in times.items(): print(f"{k:32s} s/step {v}  best {min(v)}", flush=True)
